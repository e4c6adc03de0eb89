"""Translation between the Claude Messages API and Gemini's generateContent / streamGenerateContent.

Claude requests become GenerateContentRequest bodies; Gemini answers (whole, or the alt=sse chunks,
each a GenerateContentResponse fragment) become Claude Messages and Claude SSE events.
"""

# Lossy mappings (each one is also noted where it happens):
# - Tool schemas keep only the JSON-schema keys Gemini's Schema accepts ($schema, additionalProperties,
#   default, examples, unsupported formats ... are dropped; const becomes a one-value enum; local $ref are
#   inlined, a recursive one ends in a bare object; an object without properties means "no parameters").
# - tool_result images follow the turn's functionResponse parts as inlineData/fileData parts; tool ids
#   are not sent (Gemini matches responses by name and order) and Gemini's calls get fresh toolu_ ids
#   unless they carry a valid id of their own.
# - Thinking blocks from Claude are dropped, except those carrying a Gemini thought signature
#   ("gemini:" prefix), whose signature goes back on the part that followed it. Function calls in
#   replayed model turns without one get Google's documented placeholder signature.
# - Without thinking in the request the model's default thinking applies (2.5 Pro cannot turn it off)
#   and no thoughts are returned. Budgets are capped at 24576, the smallest 2.5-model maximum.
# - A stop sequence cannot be told apart from a natural stop: both are STOP -> end_turn.
# - Usage: input_tokens = promptTokenCount + toolUsePromptTokenCount - cachedContentTokenCount;
#   output_tokens = candidatesTokenCount + thoughtsTokenCount (Claude counts thinking as output).
# - Non-text output parts (inlineData images, executableCode, codeExecutionResult) are dropped.

import json
import mimetypes

from clproxy.translate.claude import (
    FOREIGN_SIGNATURE_PREFIXES,
    ClaudeStreamSerializer,
    EmptyStreamError,
    MALFORMED_CHUNK,
    TranslationError,
    malformed_chunk_end,
    assemble_message,
    content_blocks,
    document_text,
    make_usage,
    new_tool_use_id,
    is_valid_tool_use_id,
    system_text,
    tool_result_parts,
)

__all__ = [
    "claude_to_gemini_request",
    "gemini_to_claude_response",
    "GeminiStreamToClaude",
    "gemini_schema",
    "GEMINI_SIGNATURE_PREFIX",
    "DUMMY_THOUGHT_SIGNATURE",
]

GEMINI_SIGNATURE_PREFIX = FOREIGN_SIGNATURE_PREFIXES[0]

# Gemini 3 rejects a replayed functionCall part without a thought signature ("Function call is
# missing a thought_signature"). Google documents this value for history that came from another
# model, which is exactly what a fallback conversation is.
DUMMY_THOUGHT_SIGNATURE = "skip_thought_signature_validator"

GEMINI_MAX_THINKING_BUDGET = 24576
GEMINI_MAX_STOP = 5

# The subset of JSON Schema that Gemini's Schema object accepts (everything else is rejected
# with "Unknown name" or "Invalid JSON payload").
_SCHEMA_KEYS = (
    "type",
    "format",
    "title",
    "description",
    "nullable",
    "enum",
    "items",
    "properties",
    "required",
    "anyOf",
    "minItems",
    "maxItems",
    "minimum",
    "maximum",
)
_SCHEMA_FORMATS = {"string": ("enum", "date-time"), "integer": ("int32", "int64"), "number": ("float", "double")}

_REFUSAL_REASONS = ("SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY", "LANGUAGE",
                    "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION")


#: finish reasons saying the model's tool call went wrong: the turn holds no call Claude Code can
#: run (often nothing at all), so an end_turn would pass it, or the text before it, off as the
#: answer. They end in an error instead: before anything was sent, the fallback chain moves on.
_FAILED_CALL_REASONS = ("MALFORMED_FUNCTION_CALL", "UNEXPECTED_TOOL_CALL")


def _finish_to_stop(reason, has_tool_calls):
    """Claude's stop_reason for a Gemini finishReason, or None when the reason says the turn failed.

    Only STOP, MAX_TOKENS and the refusals describe a finished turn. The rest (OTHER,
    MISSING_THOUGHT_SIGNATURE, TOO_MANY_TOOL_CALLS, MALFORMED_RESPONSE, NO_IMAGE,
    FINISH_REASON_UNSPECIFIED, the tool call failures, a reason added later) mean Gemini could not
    produce the answer, often with no content at all: as an end_turn they would be an empty or
    cut-short answer Claude Code takes for the real one.
    """
    if reason == "STOP":
        return "tool_use" if has_tool_calls else "end_turn"
    if reason == "MAX_TOKENS":
        return "max_tokens"
    if reason in _REFUSAL_REASONS:
        return "refusal"
    return None


# --------------------------------------------------------------------------------------------
# JSON schema -> Gemini Schema
# --------------------------------------------------------------------------------------------


def gemini_schema(schema):
    """Clean a tool's JSON schema into the subset Gemini accepts; returns None for "no parameters".

    Keeps the keys in ``_SCHEMA_KEYS``; ``type: [T, "null"]`` becomes ``type: T, nullable: true``;
    ``const`` becomes a one-value enum; ``oneOf`` becomes ``anyOf``; ``allOf`` objects are merged;
    local ``$ref``/``$defs`` are inlined (a recursive reference becomes a bare object); enums of
    non-strings, unsupported formats and empty ``properties`` are dropped.
    """
    if not isinstance(schema, dict):
        return None
    defs = {}
    for key in ("$defs", "definitions"):
        for name, value in (schema.get(key) or {}).items():
            defs["#/%s/%s" % (key, name)] = value
    cleaned = _clean_schema(schema, defs, ())
    if cleaned.get("type") == "object" and not cleaned.get("properties"):
        # Gemini rejects OBJECT parameters with empty properties; a function without parameters is fine.
        return None
    return cleaned


def _clean_schema(schema, defs, seen):
    if not isinstance(schema, dict):
        return {}
    ref = schema.get("$ref")
    if ref is not None:
        if ref in seen or ref not in defs:
            return {"type": "object"}
        merged = dict(defs[ref])
        merged.update({k: v for k, v in schema.items() if k != "$ref"})
        return _clean_schema(merged, defs, seen + (ref,))
    if "allOf" in schema:
        merged = {k: v for k, v in schema.items() if k != "allOf"}
        for sub in schema["allOf"]:
            sub = _clean_schema(sub, defs, seen)
            for key, value in sub.items():
                if key == "properties":
                    merged.setdefault("properties", {}).update(value)
                elif key == "required":
                    merged["required"] = list(merged.get("required", [])) + list(value)
                else:
                    merged.setdefault(key, value)
        schema = merged

    out = {}
    kind = schema.get("type")
    if isinstance(kind, list):
        types = [t for t in kind if t != "null"]
        if len(types) < len(kind):
            out["nullable"] = True
        kind = types[0] if len(types) == 1 else None
        if len(types) > 1:
            out["anyOf"] = [{"type": t} for t in types]
    if kind is None and "properties" in schema:
        kind = "object"
    if kind:
        out["type"] = kind
    if "const" in schema and isinstance(schema["const"], str):
        out["type"] = "string"
        out["enum"] = [schema["const"]]
    for key in ("title", "description", "minItems", "maxItems", "minimum", "maximum"):
        if key in schema:
            out[key] = schema[key]
    if schema.get("nullable") is True:
        out["nullable"] = True
    enum = schema.get("enum")
    if isinstance(enum, list) and enum and all(isinstance(v, str) for v in enum):
        out["enum"] = enum
    fmt = schema.get("format")
    if fmt in _SCHEMA_FORMATS.get(kind, ()):
        out["format"] = fmt
    if isinstance(schema.get("items"), dict):
        out["items"] = _clean_schema(schema["items"], defs, seen)
    props = schema.get("properties")
    if isinstance(props, dict) and props:
        out["properties"] = {name: _clean_schema(sub, defs, seen) for name, sub in props.items()}
        required = [r for r in schema.get("required") or [] if r in out["properties"]]
        if required:
            out["required"] = required
    variants = schema.get("anyOf") or schema.get("oneOf")
    if isinstance(variants, list) and variants:
        cleaned = [_clean_schema(v, defs, seen) for v in variants]
        nulls = [v for v in cleaned if v.get("type") == "null"]
        cleaned = [v for v in cleaned if v.get("type") != "null"]
        if nulls:
            out["nullable"] = True
        if len(cleaned) == 1 and "type" not in out:
            out.update(cleaned[0])
        elif cleaned:
            out["anyOf"] = cleaned
    return out


# --------------------------------------------------------------------------------------------
# Claude request -> Gemini request
# --------------------------------------------------------------------------------------------


def _image_to_gemini(block, where):
    source = block.get("source") or {}
    kind = source.get("type")
    if kind == "base64":
        return {"inlineData": {"mimeType": source.get("media_type", "image/png"), "data": source.get("data", "")}}
    if kind == "url":
        return _file_data(source.get("url", ""), None)
    raise TranslationError("%s: image source type %r is not supported in translation" % (where, kind))


def _file_data(url, mime_type):
    mime_type = mime_type or mimetypes.guess_type(url.split("?", 1)[0])[0]
    data = {"fileUri": url}
    if mime_type:
        data["mimeType"] = mime_type
    return {"fileData": data}


def _document_to_gemini(block, where):
    text = document_text(block, where)
    if text is not None:
        return {"text": text}
    source = block.get("source") or {}
    if source.get("type") == "base64" and source.get("media_type") == "application/pdf":
        return {"inlineData": {"mimeType": "application/pdf", "data": source.get("data", "")}}
    if source.get("type") == "url":
        return _file_data(source.get("url", ""), "application/pdf")
    raise TranslationError(
        "%s: block type 'document' with source %r is not supported by Gemini" % (where, source.get("type"))
    )


def _tool_names(messages):
    names = {}
    for message in messages:
        if message.get("role") == "assistant":
            for block in content_blocks(message.get("content")):
                if block.get("type") == "tool_use":
                    names[block.get("id")] = block.get("name", "")
    return names


def _message_parts(message, i, names):
    role = message.get("role")
    parts = []
    trailing = []  # tool_result images: after every functionResponse of the turn
    signature = None  # a Gemini thought signature waiting for the part it belongs to
    for j, block in enumerate(content_blocks(message.get("content"))):
        kind = block.get("type")
        where = "messages.%d.content.%d" % (i, j)
        if kind in ("thinking", "redacted_thinking"):
            sig = block.get("signature") or ""
            if kind == "thinking" and sig.startswith(GEMINI_SIGNATURE_PREFIX):
                signature = sig[len(GEMINI_SIGNATURE_PREFIX) :]
            continue  # the thought text itself is not replayed; Gemini only reads the signature
        if kind == "text":
            if not block.get("text"):
                continue
            part = {"text": block["text"]}
        elif kind == "image":
            part = _image_to_gemini(block, where)
        elif kind == "document":
            part = _document_to_gemini(block, where)
        elif kind == "tool_use" and role == "assistant":
            part = {"functionCall": {"name": block.get("name", ""), "args": block.get("input") or {}}}
        elif kind == "tool_result" and role == "user":
            tool_id = block.get("tool_use_id")
            if tool_id not in names:
                raise TranslationError("%s: tool_result for unknown tool_use_id %r" % (where, tool_id))
            texts, images = tool_result_parts(block, where)
            key = "error" if block.get("is_error") else "output"
            part = {"functionResponse": {"name": names[tool_id], "response": {key: "\n".join(texts)}}}
            trailing.extend(_image_to_gemini(img, where) for img in images)
        else:
            raise TranslationError("%s: block type %r is not supported in translation to Gemini" % (where, kind))
        if signature is not None:
            part["thoughtSignature"] = signature
            signature = None
        parts.append(part)
    return parts + trailing


def claude_to_gemini_request(claude, *, max_tokens_cap=None, dummy_thought_signatures=True):
    """Translate a Claude Messages request into a Gemini GenerateContentRequest body.

    The model goes in the URL, not the body. ``max_tokens_cap`` caps maxOutputTokens;
    ``dummy_thought_signatures`` gives replayed function calls that carry no Gemini signature
    Google's documented placeholder, which Gemini 3 needs for history made by another model.
    Raises TranslationError naming the block type and message index for content Gemini cannot take.
    """
    messages = claude.get("messages") or []
    names = _tool_names(messages)
    contents = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise TranslationError("messages.%d: role %r is not supported" % (i, role))
        parts = _message_parts(message, i, names)
        if not parts:
            continue
        gemini_role = "model" if role == "assistant" else "user"
        if contents and contents[-1]["role"] == gemini_role:
            contents[-1]["parts"].extend(parts)  # Gemini wants turns to alternate
        else:
            contents.append({"role": gemini_role, "parts": parts})
    if dummy_thought_signatures:
        for content in contents:
            if content["role"] != "model":
                continue
            calls = [p for p in content["parts"] if "functionCall" in p]
            if calls and "thoughtSignature" not in calls[0]:
                calls[0]["thoughtSignature"] = DUMMY_THOUGHT_SIGNATURE

    out = {"contents": contents}
    system = system_text(claude.get("system"))
    if system:
        out["systemInstruction"] = {"parts": [{"text": system}]}

    tools = claude.get("tools") or []
    if tools:
        declarations = []
        for i, tool in enumerate(tools):
            if tool.get("type") not in (None, "custom"):
                raise TranslationError(
                    "tools.%d: tool type %r is not supported in translation to Gemini" % (i, tool.get("type"))
                )
            declaration = {"name": tool.get("name", "")}
            if tool.get("description"):
                declaration["description"] = tool["description"]
            parameters = gemini_schema(tool.get("input_schema"))
            if parameters:
                declaration["parameters"] = parameters
            declarations.append(declaration)
        out["tools"] = [{"functionDeclarations": declarations}]
        choice = claude.get("tool_choice")
        if choice:
            out["toolConfig"] = {"functionCallingConfig": _tool_choice_to_gemini(choice)}

    config = {}
    max_tokens = claude.get("max_tokens")
    if max_tokens is not None:
        config["maxOutputTokens"] = min(max_tokens, max_tokens_cap) if max_tokens_cap else max_tokens
    if claude.get("temperature") is not None:
        config["temperature"] = claude["temperature"]
    if claude.get("top_p") is not None:
        config["topP"] = claude["top_p"]
    if claude.get("top_k") is not None:
        config["topK"] = claude["top_k"]
    stops = claude.get("stop_sequences")
    if stops:
        if len(stops) > GEMINI_MAX_STOP:
            raise TranslationError("stop_sequences: Gemini accepts at most %d stop sequences" % GEMINI_MAX_STOP)
        config["stopSequences"] = list(stops)
    thinking = claude.get("thinking") or {}
    if thinking.get("type") == "enabled":
        budget = min(int(thinking.get("budget_tokens") or 0), GEMINI_MAX_THINKING_BUDGET)
        config["thinkingConfig"] = {"thinkingBudget": budget, "includeThoughts": True}
    elif thinking.get("type") == "adaptive":
        # -1 is Gemini's dynamic budget: the model decides how long to think, like adaptive thinking.
        config["thinkingConfig"] = {"thinkingBudget": -1, "includeThoughts": True}
    if config:
        out["generationConfig"] = config
    return out


def _tool_choice_to_gemini(choice):
    kind = choice.get("type")
    if kind == "auto":
        return {"mode": "AUTO"}
    if kind == "any":
        return {"mode": "ANY"}
    if kind == "none":
        return {"mode": "NONE"}
    if kind == "tool":
        return {"mode": "ANY", "allowedFunctionNames": [choice.get("name", "")]}
    raise TranslationError("tool_choice: type %r is not supported" % (kind,))


# --------------------------------------------------------------------------------------------
# Gemini response / stream -> Claude
# --------------------------------------------------------------------------------------------


def _gemini_usage_to_claude(meta):
    meta = meta or {}
    prompt = (meta.get("promptTokenCount") or 0) + (meta.get("toolUsePromptTokenCount") or 0)
    cached = meta.get("cachedContentTokenCount") or 0
    return make_usage(
        input_tokens=max(prompt - cached, 0),
        output_tokens=(meta.get("candidatesTokenCount") or 0) + (meta.get("thoughtsTokenCount") or 0),
        cache_read_input_tokens=cached,
    )


class GeminiStreamToClaude:
    """Turn streamGenerateContent?alt=sse chunks into Claude SSE events.

    Each chunk is a GenerateContentResponse fragment: text and thought parts are deltas, functionCall
    parts arrive whole (-> ``tool_start`` plus one ``tool_args`` with the whole JSON). A thought
    signature is kept as ``gemini:<sig>`` on a thinking block: on the open unsigned thinking block
    if there is one, else (for a function call, where Gemini requires it back) on a new empty thinking
    block just before the tool_use. Signatures on text parts with no thinking to attach to are dropped
    (Gemini does not require them back).

    ``finish()`` raises EmptyStreamError if no chunk arrived; if the stream stopped without a
    finishReason (and was not blocked), or with one saying the turn failed (anything but STOP,
    MAX_TOKENS and the refusals: MALFORMED_FUNCTION_CALL, OTHER, MISSING_THOUGHT_SIGNATURE ...),
    it emits an ``error`` event rather than a false end_turn.
    A chunk with ``error`` becomes an ``error`` event and ends the stream.
    """

    def __init__(self, requested_model, actual_model):
        self.requested_model = requested_model
        self.actual_model = actual_model
        self.serializer = None
        self.finish_reason = None
        self.blocked = False
        self.has_tool_calls = False
        self.usage_metadata = None
        self.done = False
        self._thinking_signed = False

    def feed(self, chunk):
        """Translate one parsed chunk; returns a list of ``(event_name, data)``."""
        if self.done:
            return []
        events = []
        try:
            self._feed(chunk, events)
        except MALFORMED_CHUNK as e:  # candidates: [null], args as a list, usageMetadata as a string ...
            self.done = True
            self.serializer, ended = malformed_chunk_end(self.serializer, self.actual_model or self.requested_model, e)
            events.extend(ended)
        return events

    def _feed(self, chunk, events):
        if self.serializer is None:
            version = chunk.get("modelVersion")
            # a non-string modelVersion would end up in message_start.model, which clients read as a string
            model = self.actual_model or (version if isinstance(version, str) else None) or self.requested_model
            usage = _gemini_usage_to_claude(chunk.get("usageMetadata"))
            self.serializer = ClaudeStreamSerializer(model)
            events.extend(self.serializer.start(usage))
        if chunk.get("error"):
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else str(error)
            self.done = True
            events.extend(self.serializer.error("api_error", str(message or "upstream error")))
            return
        if chunk.get("usageMetadata"):
            _gemini_usage_to_claude(chunk["usageMetadata"])  # checked now: finish() must not fail on it
            self.usage_metadata = chunk["usageMetadata"]
        if (chunk.get("promptFeedback") or {}).get("blockReason"):
            self.blocked = True
        candidates = chunk.get("candidates") or []
        if candidates:
            candidate = candidates[0]
            for part in (candidate.get("content") or {}).get("parts") or []:
                events.extend(self._part(part))
            if candidate.get("finishReason"):
                if not isinstance(candidate["finishReason"], str):
                    raise TypeError("finishReason must be a string")
                self.finish_reason = candidate["finishReason"]

    def _sign_open_thinking(self, signature):
        self._thinking_signed = True
        return self.serializer.signature(GEMINI_SIGNATURE_PREFIX + signature)

    def _part(self, part):
        s = self.serializer
        signature = part.get("thoughtSignature")
        events = []
        if part.get("thought"):
            if s.open_kind != "thinking":
                self._thinking_signed = False
            elif self._thinking_signed and part.get("text"):
                events.extend(s.close_block())  # a signed run is complete; new thought text starts a new block
                self._thinking_signed = False
            events.extend(s.thinking(part.get("text") or ""))
            if signature:
                if s.open_kind != "thinking":
                    events.extend(s.close_block())
                events.extend(self._sign_open_thinking(signature))
            return events
        unsigned_thinking_open = s.open_kind == "thinking" and not self._thinking_signed
        if "functionCall" in part:
            if signature:
                if not unsigned_thinking_open:
                    events.extend(s.close_block())  # the signature gets an empty thinking block of its own
                events.extend(self._sign_open_thinking(signature))
            call = part["functionCall"] or {}
            call_id = call.get("id")
            tool_id = call_id if is_valid_tool_use_id(call_id) else new_tool_use_id()
            args = call.get("args") or {}
            if not isinstance(args, dict):
                # tool_use.input must be an object; a list or string here is not a call Claude Code can run
                raise TypeError("functionCall.args must be an object")
            self.has_tool_calls = True
            events.extend(s.tool_start(tool_id, call.get("name", "")))
            events.extend(s.tool_args(json.dumps(args, ensure_ascii=False)))
            return events
        if signature and unsigned_thinking_open:
            events.extend(self._sign_open_thinking(signature))
        if part.get("text"):
            events.extend(s.text(part["text"]))
        # inlineData / executableCode / codeExecutionResult have no place in a Claude answer: dropped.
        return events

    @property
    def complete(self):
        """True once the stream has said all of its answer: the chunk with the finishReason (which
        carries the final usageMetadata) came."""
        return self.finish_reason is not None

    def finish(self):
        """Close the message; see the class docstring for the empty and truncated cases."""
        if self.serializer is None:
            raise EmptyStreamError("Gemini stream ended before any chunk")
        if self.done:
            return []
        self.done = True
        usage = _gemini_usage_to_claude(self.usage_metadata)
        if self.finish_reason is None:
            if self.blocked:
                return self.serializer.stop("refusal", usage)
            return self.serializer.error("api_error", "upstream stream ended before a finishReason")
        stop_reason = _finish_to_stop(self.finish_reason, self.has_tool_calls)
        if stop_reason is None:
            why = "its tool call could not be used" if self.finish_reason in _FAILED_CALL_REASONS \
                else "the answer could not be produced"
            return self.serializer.error("api_error", "Gemini ended the turn with %s: %s" % (self.finish_reason, why))
        return self.serializer.stop(stop_reason, usage)


def gemini_to_claude_response(resp, requested_model, actual_model):
    """Translate a whole GenerateContentResponse into a Claude Message.

    Built by streaming the response as one chunk and folding the events back, so the streaming and
    non-streaming answers cannot disagree. ``model`` is ``actual_model`` (the model that answered).
    Raises ValueError for an error body or a response without a finishReason.
    """
    translator = GeminiStreamToClaude(requested_model, actual_model)
    events = translator.feed(resp) + translator.finish()
    return assemble_message(events)
