"""Translation between the Claude Messages API and OpenAI Chat Completions, in both directions.

Fallback: Claude request -> OpenAI, OpenAI answer/stream -> Claude. Front door (/v1/chat/completions
served from Claude accounts): OpenAI request -> Claude, Claude answer/stream -> OpenAI.
"""

# Lossy mappings (each one is also noted where it happens):
# - Thinking blocks in Claude history are dropped (Chat Completions cannot take them back).
# - tool_result is_error becomes an "Error: " prefix on the tool message; the flag itself is lost.
# - Images inside a tool_result move to a user message right after the tool messages (OpenAI tool
#   messages carry text only), introduced by a short text part naming the call.
# - The order of text relative to tool calls inside one assistant turn is lost (OpenAI keeps content
#   and tool_calls apart); system blocks are joined into one string; cache_control and top_k are dropped.
# - Tool ids over 40 characters and user ids over 64 are replaced by stable hashes (OpenAI's limits).
# - Usage: Claude's input_tokens excludes cache reads, so it is prompt_tokens - cached_tokens.
# - Reasoning text from OpenAI-compatible servers (reasoning_content/reasoning) becomes a thinking block
#   with an empty signature; Anthropic would reject it, see claude.strip_foreign_thinking.
# - Front door: system/developer messages anywhere are hoisted into the top-level system; temperature is
#   clamped to Claude's 0..1 and dropped (with top_p) when reasoning_effort turns thinking on; Claude's
#   thinking goes out as the non-standard reasoning_content; frequency/presence penalties, seed, logit_bias
#   are ignored; n > 1, response_format json, audio and non-PDF files are refused.

import hashlib
import json
import re

from clproxy.translate.claude import (
    ClaudeStreamSerializer,
    EmptyStreamError,
    MALFORMED_CHUNK,
    TranslationError,
    malformed_chunk_end,
    content_blocks,
    document_text,
    make_usage,
    new_message_id,
    new_tool_use_id,
    stable_tool_use_id,
    system_text,
    tool_result_parts,
)

__all__ = [
    "claude_to_openai_request",
    "openai_to_claude_response",
    "OpenAIStreamToClaude",
    "openai_to_claude_request",
    "claude_to_openai_response",
    "ClaudeStreamToOpenAI",
    "openai_call_id",
    "reasoning_effort_for_budget",
    "REASONING_BUDGETS",
]

# OpenAI rejects tool call ids longer than 40 characters and `user` values longer than 64
# ("string too long"), both seen in the wild when ids come from another provider.
OPENAI_MAX_CALL_ID = 40
OPENAI_MAX_USER = 64
OPENAI_MAX_STOP = 4

# reasoning_effort -> Claude thinking budget for the front door; chosen inside the bands
# reasoning_effort_for_budget uses, so effort survives OpenAI -> Claude -> OpenAI.
REASONING_BUDGETS = {"low": 2048, "medium": 8192, "high": 24576, "xhigh": 32000}

CLAUDE_IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")

_DATA_URL = re.compile(r"^data:([^;,]+)(;[^,]*)?,(.*)$", re.DOTALL)

_FINISH_TO_STOP = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}

_STOP_TO_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def reasoning_effort_for_budget(budget_tokens):
    """Map a Claude thinking budget to an OpenAI reasoning_effort: low < 4096 <= medium < 16384 <= high."""
    budget = int(budget_tokens or 0)
    if budget < 4096:
        return "low"
    if budget < 16384:
        return "medium"
    return "high"


def openai_call_id(claude_id):
    """The OpenAI tool call id for a Claude tool_use id: kept when short enough, else a stable hash.

    Deterministic, so an assistant tool call and its later tool message always agree.
    """
    if len(claude_id) <= OPENAI_MAX_CALL_ID:
        return claude_id
    return "call_" + hashlib.sha256(claude_id.encode("utf-8")).hexdigest()[:32]


def _openai_user(user_id):
    if len(user_id) <= OPENAI_MAX_USER:
        return user_id
    # Claude Code's user_id is long; a stable hash still identifies the end user to OpenAI.
    return "u_" + hashlib.sha256(user_id.encode("utf-8")).hexdigest()[:48]


# --------------------------------------------------------------------------------------------
# Claude request -> OpenAI request (fallback)
# --------------------------------------------------------------------------------------------


def claude_to_openai_request(claude, model, *, send_reasoning_effort=True, max_tokens_cap=None):
    """Translate a Claude Messages request into an OpenAI Chat Completions request for ``model``.

    ``send_reasoning_effort=False`` leaves out reasoning_effort for models that reject it (gpt-4o);
    ``max_tokens_cap`` caps max_completion_tokens for models with a smaller output limit than Claude's.
    Raises TranslationError naming the block type and message index for content OpenAI cannot take.
    """
    messages = []
    system = system_text(claude.get("system"))
    if system:
        messages.append({"role": "system", "content": system})
    for i, message in enumerate(claude.get("messages") or []):
        role = message.get("role")
        blocks = content_blocks(message.get("content"))
        if role == "user":
            messages.extend(_user_to_openai(blocks, i))
        elif role == "assistant":
            assistant = _assistant_to_openai(blocks, i)
            if assistant is not None:
                messages.append(assistant)
        else:
            raise TranslationError("messages.%d: role %r is not supported" % (i, role))

    out = {"model": model, "messages": messages}
    tools = claude.get("tools") or []
    if tools:
        out["tools"] = [_tool_to_openai(t, i) for i, t in enumerate(tools)]
        choice = claude.get("tool_choice")
        if choice:
            out["tool_choice"] = _tool_choice_to_openai(choice)
            if choice.get("disable_parallel_tool_use") and choice.get("type") != "none":
                out["parallel_tool_calls"] = False

    if send_reasoning_effort:
        effort = _reasoning_effort(claude)
        if effort:
            out["reasoning_effort"] = effort
    max_tokens = claude.get("max_tokens")
    if max_tokens is not None:
        out["max_completion_tokens"] = min(max_tokens, max_tokens_cap) if max_tokens_cap else max_tokens
    stops = claude.get("stop_sequences")
    if stops:
        if len(stops) > OPENAI_MAX_STOP:
            raise TranslationError("stop_sequences: OpenAI accepts at most %d stop sequences" % OPENAI_MAX_STOP)
        out["stop"] = list(stops)
    for key in ("temperature", "top_p"):
        if claude.get(key) is not None:
            out[key] = claude[key]
    user_id = (claude.get("metadata") or {}).get("user_id")
    if user_id:
        out["user"] = _openai_user(str(user_id))
    if claude.get("stream"):
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out


def _reasoning_effort(claude):
    thinking = claude.get("thinking") or {}
    kind = thinking.get("type")
    if kind == "enabled":
        return reasoning_effort_for_budget(thinking.get("budget_tokens"))
    if kind == "adaptive":
        # Adaptive thinking lets Claude decide; the closest OpenAI setting is the default effort,
        # unless the request states an effort of its own.
        effort = (claude.get("output_config") or {}).get("effort")
        if effort in ("low", "medium", "high"):
            return effort
        if effort == "max":
            return "high"
        return "medium"
    return None


def _image_to_openai(block, where):
    source = block.get("source") or {}
    kind = source.get("type")
    if kind == "base64":
        url = "data:%s;base64,%s" % (source.get("media_type", "image/png"), source.get("data", ""))
    elif kind == "url":
        url = source.get("url", "")
    else:
        raise TranslationError("%s: image source type %r is not supported in translation" % (where, kind))
    return {"type": "image_url", "image_url": {"url": url}}


def _document_to_openai(block, where):
    text = document_text(block, where)
    if text is not None:
        return {"type": "text", "text": text}
    source = block.get("source") or {}
    if source.get("type") == "base64" and source.get("media_type") == "application/pdf":
        # Chat Completions takes PDFs as a `file` part with a data URL (vision-capable models).
        return {
            "type": "file",
            "file": {
                "filename": block.get("title") or "document.pdf",
                "file_data": "data:application/pdf;base64,%s" % source.get("data", ""),
            },
        }
    raise TranslationError(
        "%s: block type 'document' with source %r is not supported by OpenAI" % (where, source.get("type"))
    )


def _user_to_openai(blocks, i):
    tool_messages = []
    tool_images = []
    parts = []
    for j, block in enumerate(blocks):
        kind = block.get("type")
        where = "messages.%d.content.%d" % (i, j)
        if kind == "text":
            parts.append({"type": "text", "text": block.get("text", "")})
        elif kind == "image":
            parts.append(_image_to_openai(block, where))
        elif kind == "document":
            parts.append(_document_to_openai(block, where))
        elif kind == "tool_result":
            texts, images = tool_result_parts(block, where)
            if block.get("is_error"):
                # OpenAI has no error flag on tool messages; the prefix keeps the fact visible to the model.
                texts = ["Error: " + (texts[0] if texts else "")] + texts[1:]
            if len(texts) == 1:
                content = texts[0]
            elif texts:
                content = [{"type": "text", "text": t} for t in texts]
            else:
                content = ""
            call_id = openai_call_id(block.get("tool_use_id", ""))
            tool_messages.append({"role": "tool", "tool_call_id": call_id, "content": content})
            if images:
                # Tool messages are text-only, so images follow in a user message.
                tool_images.append({"type": "text", "text": "Images returned by tool call %s:" % call_id})
                tool_images.extend(_image_to_openai(img, where) for img in images)
        else:
            raise TranslationError(
                "%s: block type %r is not supported in translation to OpenAI" % (where, kind)
            )
    out = list(tool_messages)
    user_parts = tool_images + parts
    if user_parts:
        if len(user_parts) == 1 and user_parts[0]["type"] == "text":
            out.append({"role": "user", "content": user_parts[0]["text"]})
        else:
            out.append({"role": "user", "content": user_parts})
    return out


def _assistant_to_openai(blocks, i):
    texts = []
    tool_calls = []
    for j, block in enumerate(blocks):
        kind = block.get("type")
        if kind == "text":
            if block.get("text"):
                texts.append(block["text"])
        elif kind == "tool_use":
            tool_calls.append(
                {
                    "id": openai_call_id(block.get("id", "")),
                    "type": "function",
                    "function": {
                        "name": block.get("name", ""),
                        "arguments": json.dumps(block.get("input") or {}, ensure_ascii=False),
                    },
                }
            )
        elif kind in ("thinking", "redacted_thinking"):
            continue  # OpenAI cannot take reasoning back; dropping it is the documented loss.
        else:
            raise TranslationError(
                "messages.%d.content.%d: block type %r is not supported in translation to OpenAI" % (i, j, kind)
            )
    if not texts and not tool_calls:
        return None
    out = {"role": "assistant"}
    if len(texts) == 1:
        out["content"] = texts[0]
    elif texts:
        out["content"] = [{"type": "text", "text": t} for t in texts]
    else:
        out["content"] = None
    if tool_calls:
        out["tool_calls"] = tool_calls
    return out


def _tool_to_openai(tool, i):
    kind = tool.get("type")
    if kind not in (None, "custom"):
        raise TranslationError("tools.%d: tool type %r is not supported in translation to OpenAI" % (i, kind))
    function = {"name": tool.get("name", "")}
    if tool.get("description"):
        function["description"] = tool["description"]
    function["parameters"] = tool.get("input_schema") or {"type": "object", "properties": {}}
    return {"type": "function", "function": function}


def _tool_choice_to_openai(choice):
    kind = choice.get("type")
    if kind == "auto":
        return "auto"
    if kind == "any":
        return "required"
    if kind == "none":
        return "none"
    if kind == "tool":
        return {"type": "function", "function": {"name": choice.get("name", "")}}
    raise TranslationError("tool_choice: type %r is not supported" % (kind,))


# --------------------------------------------------------------------------------------------
# OpenAI response -> Claude response (fallback)
# --------------------------------------------------------------------------------------------


def _tool_input(arguments):
    """Parse tool call arguments into the object Claude's tool_use.input must be.

    Models sometimes emit invalid JSON; it is kept under ``_invalid_json_arguments`` so the
    client's tool validation reports the problem to the model instead of running with ``{}``.
    """
    if not arguments:
        return {}
    try:
        value = json.loads(arguments)
    except ValueError:
        return {"_invalid_json_arguments": arguments}
    if not isinstance(value, dict):
        return {"_invalid_json_arguments": arguments}
    return value


def _openai_usage_to_claude(usage):
    usage = usage or {}
    prompt = usage.get("prompt_tokens") or 0
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return make_usage(
        input_tokens=max(prompt - cached, 0),
        output_tokens=usage.get("completion_tokens") or 0,
        cache_read_input_tokens=cached,
    )


def _message_text(content):
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict))


def openai_to_claude_response(resp, requested_model):
    """Translate an OpenAI chat.completion into a Claude Message.

    ``model`` is the model that actually answered (``resp["model"]``), falling back to
    ``requested_model``. Raises ValueError when the response has no choices.
    """
    choices = resp.get("choices") or []
    if not choices:
        raise ValueError("OpenAI response has no choices")
    choice = choices[0]
    message = choice.get("message") or {}
    content = []
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    text = _message_text(message.get("content"))
    if text:
        content.append({"type": "text", "text": text})
    refusal = message.get("refusal")
    if refusal:
        content.append({"type": "text", "text": refusal})
    calls = list(message.get("tool_calls") or [])
    if message.get("function_call"):
        calls.append({"function": message["function_call"]})
    for call in calls:
        function = call.get("function") or {}
        call_id = call.get("id")
        content.append(
            {
                "type": "tool_use",
                "id": stable_tool_use_id(call_id) if call_id else new_tool_use_id(),
                "name": function.get("name", ""),
                "input": _tool_input(function.get("arguments")),
            }
        )
    stop_reason = _FINISH_TO_STOP.get(choice.get("finish_reason"), "end_turn")
    if refusal:
        stop_reason = "refusal"
    elif calls and stop_reason == "end_turn":
        # Some OpenAI-compatible servers report "stop" even when the turn ends in tool calls.
        stop_reason = "tool_use"
    return {
        "id": new_message_id(),
        "type": "message",
        "role": "assistant",
        "model": resp.get("model") or requested_model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": _openai_usage_to_claude(resp.get("usage")),
    }


def _is_json_object(text):
    """True when ``text`` is a whole JSON object (a tool call's arguments that are complete)."""
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


class OpenAIStreamToClaude:
    """Turn OpenAI chat.completion.chunk dicts into Claude SSE events, one chunk at a time.

    ``feed(chunk)`` takes each parsed ``data:`` JSON and returns ``(event, data)`` tuples; the first
    chunk yields ``message_start``. ``finish()`` is called at ``[DONE]``/end of body and returns the
    closing ``message_delta`` (stop reason, usage from the include_usage chunk) and ``message_stop``.

    ``finish()`` raises EmptyStreamError when no chunk arrived at all (nothing was sent to the client,
    so the caller can fail over). When chunks arrived but the stream ended before a finish_reason,
    it emits an ``error`` event (api_error) instead of pretending the answer was complete.
    An ``{"error": ...}`` chunk becomes an ``error`` event and ends the stream.
    """

    def __init__(self, requested_model):
        self.requested_model = requested_model
        self.serializer = None
        self.finish_reason = None
        self.refused = False
        self.usage = None
        self.done = False
        self._tools = {}  # key -> {"id", "name", "args" (all so far), "opened"}
        self._slots = {}  # OpenAI tool_calls index -> key of the call now using it
        self._open_tool = None  # key of the call whose tool_use block is open

    def feed(self, chunk):
        """Translate one parsed chunk; returns a list of ``(event_name, data)``."""
        if self.done:
            return []
        events = []
        try:
            self._feed(chunk, events)
        except MALFORMED_CHUNK as e:  # choices: [null], arguments as an object, usage as a list ...
            self.done = True
            self.serializer, ended = malformed_chunk_end(self.serializer, self.requested_model, e)
            events.extend(ended)
        return events

    def _feed(self, chunk, events):
        if self.serializer is None:
            model = chunk.get("model")
            # a non-string model would end up in message_start.model, which clients read as a string
            self.serializer = ClaudeStreamSerializer(model if isinstance(model, str) and model else self.requested_model)
            events.extend(self.serializer.start())
        if chunk.get("error"):
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else str(error)
            self.done = True
            events.extend(self.serializer.error("api_error", str(message or "upstream error")))
            return
        if chunk.get("usage"):
            _openai_usage_to_claude(chunk["usage"])  # checked now: finish() must not fail on it
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            events.extend(self._delta(choice.get("delta") or {}))
            if self.done:
                return
            if choice.get("finish_reason"):
                if not isinstance(choice["finish_reason"], str):
                    raise TypeError("finish_reason must be a string")
                self.finish_reason = choice["finish_reason"]

    def _close_tool(self):
        """Check the open tool call's arguments before its block is closed.

        The pieces were already streamed, so arguments that do not form a JSON object (a model's
        broken JSON, or two calls glued together) cannot be repaired: the stream ends with an error
        instead of a content_block_stop whose input Claude Code cannot parse.
        """
        key, self._open_tool = self._open_tool, None
        if key is None:
            return []
        args = self._tools[key]["args"]
        if args:
            try:
                value = json.loads(args)
            except ValueError:
                value = None
            if not isinstance(value, dict):
                self.done = True
                return self.serializer.error("api_error", "upstream sent tool call arguments that are not a JSON object")
        return []

    def _delta(self, delta):
        events = []
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        content, refusal = delta.get("content"), delta.get("refusal")
        if (isinstance(reasoning, str) and reasoning) or content or refusal:
            events.extend(self._close_tool())
            if self.done:
                return events
        if isinstance(reasoning, str) and reasoning:
            events.extend(self.serializer.thinking(reasoning))
        if content:
            events.extend(self.serializer.text(content))
        if refusal:
            self.refused = True
            events.extend(self.serializer.text(refusal))
        calls = list(delta.get("tool_calls") or [])
        if delta.get("function_call"):
            calls.append({"index": 0, "function": delta["function_call"]})
        for call in calls:
            events.extend(self._tool_delta(call))
            if self.done:
                return events
        return events

    def _tool_delta(self, call):
        index = call.get("index", 0)
        key = self._slots.get(index)
        call_id = call.get("id")
        function = call.get("function") or {}
        if key is not None and call_id and self._tools[key]["id"] and call_id != self._tools[key]["id"]:
            # Some OpenAI-compatible servers (Gemini's among them) send every call with index 0;
            # a new id on a used index is a new call, not more arguments for the old one.
            key = None
        elif key is not None and "index" not in call and function.get("name") \
                and _is_json_object(self._tools[key]["args"]):
            # Gemini's endpoint sends whole calls with no index and id "": a named entry after a
            # call whose arguments are already a whole object starts the next call.
            key = None
        if key is None:
            key = len(self._tools)
            self._slots[index] = key
            self._tools[key] = {"id": None, "name": None, "args": "", "opened": False}
        entry = self._tools[key]
        if call_id and not entry["id"]:
            entry["id"] = call_id
        if function.get("name") and not entry["name"]:
            entry["name"] = function["name"]
        args = function.get("arguments") or ""
        if not isinstance(args, str):
            raise TypeError("tool call arguments must be a string")
        entry["args"] += args
        if not entry["opened"]:
            if not entry["name"]:
                return []  # wait for the name: a Claude tool_use block must open with it
            events = self._close_tool()
            if self.done:
                return events
            entry["opened"] = True
            self._open_tool = key
            tool_id = stable_tool_use_id(entry["id"]) if entry["id"] else new_tool_use_id()
            events.extend(self.serializer.tool_start(tool_id, entry["name"]))
            events.extend(self.serializer.tool_args(entry["args"]))  # what came before the name too
            return events
        if self._open_tool != key:
            if not args:
                return []
            # Claude blocks cannot be reopened; arguments for an earlier call cannot be placed.
            self.done = True
            return self.serializer.error("api_error", "upstream sent tool call arguments out of order")
        return self.serializer.tool_args(args)

    @property
    def complete(self):
        """True once the stream has said all of its answer: the finish_reason and the usage chunk
        (clproxy always asks for it with stream_options.include_usage; it comes last)."""
        return self.finish_reason is not None and self.usage is not None

    def finish(self):
        """Close the message; see the class docstring for the empty and truncated cases."""
        if self.serializer is None:
            raise EmptyStreamError("OpenAI stream ended before any chunk")
        if self.done:
            return []
        if any(not t["opened"] for t in self._tools.values()):
            self.done = True
            return self.serializer.error("api_error", "upstream sent a tool call without a name")
        events = self._close_tool()
        self.done = True
        if events:
            return events
        if self.finish_reason is None:
            return self.serializer.error("api_error", "upstream stream ended before a finish_reason")
        stop_reason = _FINISH_TO_STOP.get(self.finish_reason, "end_turn")
        if self.refused:
            stop_reason = "refusal"
        elif self._tools and stop_reason == "end_turn":
            stop_reason = "tool_use"
        return self.serializer.stop(stop_reason, _openai_usage_to_claude(self.usage))


# --------------------------------------------------------------------------------------------
# OpenAI request -> Claude request (front door)
# --------------------------------------------------------------------------------------------

DEFAULT_MAX_TOKENS = 4096


def _parts_text(content, where):
    """Text of a system/developer/tool message: a string or a list of text parts."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    texts = []
    for j, part in enumerate(content):
        if part.get("type") != "text":
            raise TranslationError("%s.content.%d: part type %r is not supported here" % (where, j, part.get("type")))
        texts.append(part.get("text", ""))
    return texts


def _image_url_to_claude(part, where):
    image_url = part.get("image_url")
    url = image_url.get("url", "") if isinstance(image_url, dict) else (image_url or "")
    match = _DATA_URL.match(url)
    if match:
        media_type, params, data = match.group(1), match.group(2) or "", match.group(3)
        if ";base64" not in params:
            raise TranslationError("%s: only base64 data URLs are supported for images" % where)
        if media_type not in CLAUDE_IMAGE_TYPES:
            raise TranslationError("%s: image type %r is not supported by Claude" % (where, media_type))
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise TranslationError("%s: image_url must be a data URL or an http(s) URL" % where)


def _file_to_claude(part, where):
    file = part.get("file") or {}
    match = _DATA_URL.match(file.get("file_data") or "")
    if not match or match.group(1) != "application/pdf":
        raise TranslationError("%s: only inline PDF files (file_data data URLs) are supported" % where)
    block = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": match.group(3)}}
    if file.get("filename"):
        block["title"] = file["filename"]
    return block


def _user_parts_to_claude(content, where):
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks = []
    for j, part in enumerate(content):
        kind = part.get("type")
        here = "%s.content.%d" % (where, j)
        if kind == "text":
            if part.get("text"):
                blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            blocks.append(_image_url_to_claude(part, here))
        elif kind == "file":
            blocks.append(_file_to_claude(part, here))
        else:
            raise TranslationError("%s: content part type %r is not supported by Claude" % (here, kind))
    return blocks


def _claude_tool_id(call_id):
    # OpenAI ids ("call_...") already fit Anthropic's pattern; others are hashed the same way
    # for the assistant call and its tool message, so they still match.
    return stable_tool_use_id(call_id) if call_id else new_tool_use_id()


def openai_to_claude_request(openai_req):
    """Translate an OpenAI Chat Completions request into a Claude Messages request.

    System and developer messages (wherever they appear) are joined into the top-level system;
    tool messages become tool_result blocks in a user turn; consecutive turns of one role are
    merged. Raises TranslationError for what Claude cannot take (n > 1, response_format, audio ...).
    """
    if (openai_req.get("n") or 1) > 1:
        raise TranslationError("n: only one choice (n=1) is supported")
    response_format = (openai_req.get("response_format") or {}).get("type")
    if response_format not in (None, "text"):
        raise TranslationError("response_format: %r is not supported" % response_format)

    system_texts = []
    turns = []  # [role, blocks]

    def add(role, blocks):
        if not blocks:
            return
        if turns and turns[-1][0] == role:
            turns[-1][1].extend(blocks)
        else:
            turns.append([role, list(blocks)])

    for i, message in enumerate(openai_req.get("messages") or []):
        role = message.get("role")
        where = "messages.%d" % i
        if role in ("system", "developer"):
            system_texts.extend(t for t in _parts_text(message.get("content"), where) if t)
        elif role == "user":
            add("user", _user_parts_to_claude(message.get("content"), where))
        elif role == "assistant":
            blocks = []
            content = message.get("content")
            if isinstance(content, str):
                if content:
                    blocks.append({"type": "text", "text": content})
            elif content:
                for part in content:
                    text = part.get("text") or part.get("refusal")
                    if text:
                        blocks.append({"type": "text", "text": text})
            for call in message.get("tool_calls") or []:
                function = call.get("function") or {}
                arguments = function.get("arguments") or ""
                try:
                    parsed = json.loads(arguments) if arguments else {}
                except ValueError:
                    raise TranslationError("%s.tool_calls: arguments are not valid JSON" % where)
                if not isinstance(parsed, dict):
                    raise TranslationError("%s.tool_calls: arguments must be a JSON object" % where)
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": _claude_tool_id(call.get("id")),
                        "name": function.get("name", ""),
                        "input": parsed,
                    }
                )
            add("assistant", blocks)
        elif role == "tool":
            texts = [t for t in _parts_text(message.get("content"), where)]
            block = {"type": "tool_result", "tool_use_id": _claude_tool_id(message.get("tool_call_id"))}
            if len(texts) == 1:
                if texts[0]:
                    block["content"] = texts[0]
            elif texts:
                block["content"] = [{"type": "text", "text": t} for t in texts if t]
            add("user", [block])
        else:
            raise TranslationError("%s: role %r is not supported" % (where, role))

    claude = {
        "model": openai_req.get("model"),
        "messages": [{"role": role, "content": blocks} for role, blocks in turns],
    }
    max_tokens = openai_req.get("max_completion_tokens") or openai_req.get("max_tokens") or DEFAULT_MAX_TOKENS
    if system_texts:
        claude["system"] = "\n\n".join(system_texts)

    effort = openai_req.get("reasoning_effort")
    thinking = effort in REASONING_BUDGETS
    if thinking:
        budget = REASONING_BUDGETS[effort]
        if max_tokens <= budget:
            # Claude needs budget_tokens < max_tokens; the client's max_tokens stays the answer's allowance.
            max_tokens = budget + max_tokens
        claude["thinking"] = {"type": "enabled", "budget_tokens": budget}
    claude["max_tokens"] = max_tokens

    tools = openai_req.get("tools") or []
    if tools:
        claude["tools"] = [_tool_to_claude(t, i) for i, t in enumerate(tools)]
        choice = _tool_choice_to_claude(openai_req.get("tool_choice"))
        if openai_req.get("parallel_tool_calls") is False and (choice or {}).get("type") != "none":
            choice = dict(choice or {"type": "auto"}, disable_parallel_tool_use=True)
        if choice:
            claude["tool_choice"] = choice

    stop = openai_req.get("stop")
    if stop:
        claude["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if not thinking:
        # Claude rejects temperature/top_p changes while thinking; OpenAI's 0..2 range is clamped to 0..1.
        if openai_req.get("temperature") is not None:
            claude["temperature"] = min(max(float(openai_req["temperature"]), 0.0), 1.0)
        if openai_req.get("top_p") is not None:
            claude["top_p"] = openai_req["top_p"]
    if openai_req.get("user"):
        claude["metadata"] = {"user_id": str(openai_req["user"])}
    if openai_req.get("stream"):
        claude["stream"] = True
    return claude


def _tool_to_claude(tool, i):
    if tool.get("type", "function") != "function":
        raise TranslationError("tools.%d: tool type %r is not supported" % (i, tool.get("type")))
    function = tool.get("function") or {}
    out = {"name": function.get("name", "")}
    if function.get("description"):
        out["description"] = function["description"]
    out["input_schema"] = function.get("parameters") or {"type": "object", "properties": {}}
    return out


def _tool_choice_to_claude(choice):
    if choice is None:
        return None
    if choice == "auto":
        return {"type": "auto"}
    if choice == "required":
        return {"type": "any"}
    if choice == "none":
        return {"type": "none"}
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "tool", "name": (choice.get("function") or {}).get("name", "")}
    raise TranslationError("tool_choice: %r is not supported" % (choice,))


# --------------------------------------------------------------------------------------------
# Claude response -> OpenAI response (front door)
# --------------------------------------------------------------------------------------------


def _claude_usage_to_openai(usage):
    usage = usage or {}
    cached = usage.get("cache_read_input_tokens") or 0
    prompt = (usage.get("input_tokens") or 0) + cached + (usage.get("cache_creation_input_tokens") or 0)
    completion = usage.get("output_tokens") or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _completion_id(message_id):
    suffix = message_id[4:] if message_id and message_id.startswith("msg_") else (message_id or new_message_id()[4:])
    return "chatcmpl-" + suffix


def claude_to_openai_response(claude, created=0):
    """Translate a Claude Message into an OpenAI chat.completion.

    Text blocks are concatenated into ``content``; tool_use blocks become ``tool_calls``; thinking
    text goes to the non-standard ``reasoning_content`` field (as DeepSeek and vLLM do). ``created``
    is the Unix time to report (passed in: this module reads no clock).
    """
    texts, thinking, tool_calls = [], [], []
    for block in claude.get("content") or []:
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text", ""))
        elif kind == "thinking":
            thinking.append(block.get("thinking", ""))
        elif kind == "tool_use":
            tool_calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {
                        "name": block.get("name", ""),
                        "arguments": json.dumps(block.get("input") or {}, ensure_ascii=False),
                    },
                }
            )
    message = {"role": "assistant", "content": "".join(texts) if texts else None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    if thinking:
        message["reasoning_content"] = "".join(thinking)
    return {
        "id": _completion_id(claude.get("id")),
        "object": "chat.completion",
        "created": created,
        "model": claude.get("model"),
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": _STOP_TO_FINISH.get(claude.get("stop_reason"), "stop"),
                "logprobs": None,
            }
        ],
        "usage": _claude_usage_to_openai(claude.get("usage")),
    }


class ClaudeStreamToOpenAI:
    """Turn parsed Claude SSE events into OpenAI chat.completion.chunk dicts (front door streaming).

    ``feed((event_name, data))`` returns a list of chunks: the role first (at message_start), then
    content, ``reasoning_content`` and tool_calls deltas (each tool_use block gets the next tool
    index), the finish_reason at message_delta and, with ``include_usage``, a last chunk with empty
    choices and the usage at message_stop. An ``error`` event becomes ``{"error": {...}}``.
    Writing ``data: [DONE]`` is the caller's job.
    """

    def __init__(self, model, include_usage, created=0, completion_id=None):
        self.model = model
        self.include_usage = include_usage
        self.created = created
        self.id = completion_id or _completion_id(None)
        self.usage = {}
        self._tool_index = {}  # Claude block index -> OpenAI tool_calls index

    def _chunk(self, delta, finish_reason=None):
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
        }
        if self.include_usage:
            chunk["usage"] = None  # as OpenAI does: every chunk but the last carries usage: null
        return chunk

    def feed(self, event):
        """Translate one ``(event_name, data)`` Claude event into zero or more OpenAI chunks."""
        name, data = event
        kind = data.get("type", name)
        if kind == "message_start":
            message = data.get("message") or {}
            self.usage = dict(message.get("usage") or {})
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            block = data.get("content_block") or {}
            if block.get("type") == "tool_use":
                index = len(self._tool_index)
                self._tool_index[data["index"]] = index
                call = {
                    "index": index,
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name", ""), "arguments": ""},
                }
                return [self._chunk({"tool_calls": [call]})]
            if block.get("type") == "text" and block.get("text"):
                return [self._chunk({"content": block["text"]})]
            return []
        if kind == "content_block_delta":
            delta = data.get("delta") or {}
            dtype = delta.get("type")
            if dtype == "text_delta" and delta.get("text"):
                return [self._chunk({"content": delta["text"]})]
            if dtype == "thinking_delta" and delta.get("thinking"):
                return [self._chunk({"reasoning_content": delta["thinking"]})]
            if dtype == "input_json_delta" and delta.get("partial_json") and data.get("index") in self._tool_index:
                call = {"index": self._tool_index[data["index"]], "function": {"arguments": delta["partial_json"]}}
                return [self._chunk({"tool_calls": [call]})]
            return []
        if kind == "message_delta":
            self.usage.update({k: v for k, v in (data.get("usage") or {}).items() if v is not None})
            stop_reason = (data.get("delta") or {}).get("stop_reason")
            return [self._chunk({}, _STOP_TO_FINISH.get(stop_reason, "stop"))]
        if kind == "message_stop":
            if not self.include_usage:
                return []
            return [
                {
                    "id": self.id,
                    "object": "chat.completion.chunk",
                    "created": self.created,
                    "model": self.model,
                    "choices": [],
                    "usage": _claude_usage_to_openai(self.usage),
                }
            ]
        if kind == "error":
            error = data.get("error") or {}
            return [{"error": {"message": error.get("message", ""), "type": error.get("type", "api_error"), "code": None}}]
        return []  # ping, content_block_stop, signature/citation deltas: nothing to say in OpenAI's format
