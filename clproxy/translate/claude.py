"""The Claude side of every translation: request normalisation, ids, errors and the stream serializer.

Other providers' answers are rebuilt into Claude Messages API shapes here, so that every translator
emits the same exact SSE event sequence Anthropic would (message_start, indexed blocks, message_delta, message_stop).
"""

import hashlib
import json
import re
import secrets

__all__ = [
    "TranslationError",
    "EmptyStreamError",
    "TOOL_USE_ID_PATTERN",
    "FOREIGN_SIGNATURE_PREFIXES",
    "new_message_id",
    "new_tool_use_id",
    "is_valid_tool_use_id",
    "stable_tool_use_id",
    "encode_sse",
    "system_text",
    "content_blocks",
    "tool_result_parts",
    "document_text",
    "make_usage",
    "is_foreign_thinking",
    "strip_foreign_thinking",
    "ClaudeStreamSerializer",
    "assemble_message",
]

TOOL_USE_ID_PATTERN = re.compile(r"^[a-zA-Z0-9_-]+$")

# Signatures that a translator wrote into thinking blocks. They are only meaningful to the
# provider that produced them: Anthropic rejects them ("Invalid signature in thinking block").
FOREIGN_SIGNATURE_PREFIXES = ("gemini:",)


class TranslationError(Exception):
    """A request cannot be expressed in the target API; answer it with 400 invalid_request_error.

    ``message`` names the unsupported thing (block type, message index, parameter) so the
    client learns what to change; it is safe to show to clients.
    """

    def __init__(self, message):
        super().__init__(message)
        self.message = message


class EmptyStreamError(Exception):
    """The upstream stream ended before sending anything: nothing to translate.

    Raised by ``finish()`` of the stream translators when no chunk was ever fed. Nothing has been
    written to the client yet, so the dispatcher can treat it as an upstream failure and try
    the next provider (or answer 502) instead of inventing an empty reply.
    """


def new_message_id():
    """Return a fresh Claude message id, ``msg_`` followed by 24 url-safe characters."""
    return "msg_" + _token(24)


def new_tool_use_id():
    """Return a fresh tool use id, ``toolu_`` followed by 24 characters matching ``^[a-zA-Z0-9_-]+$``."""
    return "toolu_" + _token(24)


def _token(length):
    # token_urlsafe draws from [A-Za-z0-9_-], exactly the alphabet Anthropic accepts in ids.
    return secrets.token_urlsafe(length)[:length]


def is_valid_tool_use_id(value):
    """True when ``value`` is a string Anthropic accepts as a tool_use id."""
    return isinstance(value, str) and bool(TOOL_USE_ID_PATTERN.match(value))


def stable_tool_use_id(foreign_id):
    """Map another provider's call id to a valid Claude tool_use id, deterministically.

    Valid ids are kept as they are so they survive a round trip; others are hashed, so the
    same foreign id always maps to the same Claude id (a tool result in a later turn still
    matches its call) and two different ids do not collide.
    """
    if is_valid_tool_use_id(foreign_id):
        return foreign_id
    digest = hashlib.sha256(str(foreign_id).encode("utf-8")).hexdigest()[:24]
    return "toolu_" + digest


def encode_sse(event, data):
    """Serialise one SSE event: ``event: X\\ndata: {compact json}\\n\\n`` as UTF-8 bytes."""
    payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    try:
        return ("event: %s\ndata: %s\n\n" % (event, payload)).encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (a provider's "\ud800" escape) has no UTF-8 form; JSON's \u escape keeps it exactly.
        payload = json.dumps(data, separators=(",", ":"), ensure_ascii=True)
        return ("event: %s\ndata: %s\n\n" % (event, payload)).encode("utf-8")


def system_text(system):
    """Flatten a Claude ``system`` (absent, a string, or a list of text blocks) to one string.

    Blocks are joined with a blank line; cache_control markers are dropped because no other
    provider takes them. A non-text block raises TranslationError.
    """
    if system is None:
        return ""
    if isinstance(system, str):
        return system
    if not isinstance(system, list):
        raise TranslationError("system: expected a string or a list of text blocks")
    texts = []
    for i, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text":
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise TranslationError("system.%d: block type %r is not supported in translation" % (i, kind))
        texts.append(block.get("text", ""))
    return "\n\n".join(t for t in texts if t)


def content_blocks(content):
    """Return a message's content as a list of blocks; a plain string becomes one text block."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if isinstance(content, list):
        return [b for b in content if isinstance(b, dict)]
    raise TranslationError("content: expected a string or a list of content blocks")


def document_text(block, where):
    """Text of a Claude ``document`` block whose source is plain text or text blocks.

    A text document maps to text without loss worth mentioning (the title, if any, is kept as
    a first line). Binary documents (PDF) have no such mapping; the caller decides.
    Returns None for a non-text source.
    """
    source = block.get("source") or {}
    kind = source.get("type")
    if kind == "text":
        body = source.get("data", "")
    elif kind == "content":
        inner = source.get("content")
        parts = content_blocks(inner)
        for p in parts:
            if p.get("type") != "text":
                raise TranslationError(
                    "%s: document content block type %r is not supported in translation" % (where, p.get("type"))
                )
        body = "\n".join(p.get("text", "") for p in parts)
    else:
        return None
    title = block.get("title")
    return "%s\n%s" % (title, body) if title else body


def tool_result_parts(block, where):
    """Split a tool_result's content into ``(texts, images)``: a list of strings and of image blocks.

    Text documents inside a tool result become text; other block types raise TranslationError.
    """
    texts, images = [], []
    for i, part in enumerate(content_blocks(block.get("content"))):
        kind = part.get("type")
        if kind == "text":
            texts.append(part.get("text", ""))
        elif kind == "image":
            images.append(part)
        elif kind == "document" and document_text(part, where) is not None:
            texts.append(document_text(part, where))
        else:
            raise TranslationError(
                "%s.content.%d: block type %r inside tool_result is not supported in translation" % (where, i, kind)
            )
    return texts, images


def make_usage(input_tokens=0, output_tokens=0, cache_read_input_tokens=0, cache_creation_input_tokens=0, **_ignored):
    """Build a Claude usage dict with all four counters (Claude Code reads every one of them).

    Other keys (a Claude usage may also carry server_tool_use, service_tier ...) are ignored.
    """
    return {
        "input_tokens": int(input_tokens or 0),
        "cache_creation_input_tokens": int(cache_creation_input_tokens or 0),
        "cache_read_input_tokens": int(cache_read_input_tokens or 0),
        "output_tokens": int(output_tokens or 0),
    }


def is_foreign_thinking(block):
    """True for a thinking block a translator produced: its signature is empty or carries a provider prefix.

    Such blocks must not be sent to Anthropic, which verifies signatures.
    """
    if not isinstance(block, dict) or block.get("type") != "thinking":
        return False
    signature = block.get("signature") or ""
    return not signature or signature.startswith(FOREIGN_SIGNATURE_PREFIXES)


def strip_foreign_thinking(claude):
    """Return a copy of a Claude request without thinking blocks that came from another provider.

    For a conversation that went through a fallback provider and now goes back to Anthropic.
    The request is only copied when something is removed, so a clean request is returned as is.
    """
    messages = claude.get("messages") or []
    if not any(
        is_foreign_thinking(b) for m in messages if isinstance(m.get("content"), list) for b in m["content"]
    ):
        return claude
    cleaned = []
    for m in messages:
        if isinstance(m.get("content"), list):
            m = dict(m, content=[b for b in m["content"] if not is_foreign_thinking(b)])
        cleaned.append(m)
    return dict(claude, messages=cleaned)


class ClaudeStreamSerializer:
    """Build the exact Claude SSE event sequence from high-level calls.

    Every method returns a list of ``(event_name, data)`` tuples. The serializer opens a content
    block when the kind of content changes (closing the previous one first), numbers blocks
    consecutively from 0, and closes the open block before ``message_delta``. ``tool_start``
    always opens a new block, so parallel tool calls each get their own index.
    """

    def __init__(self, model, message_id=None):
        self.model = model
        self.message_id = message_id or new_message_id()
        self.started = False
        self.stopped = False
        self.block_count = 0
        self._open_kind = None  # "text" | "thinking" | "tool_use" | None
        self._open_index = None

    @property
    def open_kind(self):
        """The kind of the currently open block, or None."""
        return self._open_kind

    def start(self, usage=None):
        """Emit ``message_start`` with an empty assistant message and the given usage."""
        if self.started:
            raise RuntimeError("message already started")
        self.started = True
        usage = make_usage(**(usage or {}))
        message = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage,
        }
        return [("message_start", {"type": "message_start", "message": message})]

    def ping(self):
        """Emit a ``ping`` event (allowed anywhere in the stream)."""
        return [("ping", {"type": "ping"})]

    def text(self, delta):
        """Append text, opening a text block when the open block is not text. Empty text is ignored."""
        _require_str(delta, "text")
        if not delta:
            return []
        events = self._ensure_open("text", {"type": "text", "text": ""})
        events.append(self._delta({"type": "text_delta", "text": delta}))
        return events

    def thinking(self, delta):
        """Append thinking text, opening a thinking block when needed. Empty text is ignored."""
        _require_str(delta, "thinking")
        if not delta:
            return []
        events = self._ensure_open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
        events.append(self._delta({"type": "thinking_delta", "thinking": delta}))
        return events

    def signature(self, sig):
        """Attach a signature to the open thinking block (opening an empty one if none is open)."""
        _require_str(sig, "signature")
        if not sig:
            return []
        events = self._ensure_open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
        events.append(self._delta({"type": "signature_delta", "signature": sig}))
        return events

    def tool_start(self, tool_id, name):
        """Open a new tool_use block (always a new index, even after another tool_use)."""
        self._require_running()
        _require_str(tool_id, "tool id")
        _require_str(name, "tool name")
        if not name:
            raise ValueError("a tool_use block needs a name")
        events = self.close_block()
        events.append(self._open("tool_use", {"type": "tool_use", "id": tool_id, "name": name, "input": {}}))
        return events

    def tool_args(self, partial_json):
        """Append a fragment of the open tool_use block's input JSON. Empty fragments are ignored."""
        self._require_running()
        if self._open_kind != "tool_use":
            raise RuntimeError("tool_args without an open tool_use block")
        _require_str(partial_json, "partial_json")
        if not partial_json:
            return []
        return [self._delta({"type": "input_json_delta", "partial_json": partial_json})]

    def close_block(self):
        """Close the open block, if any."""
        if self._open_kind is None:
            return []
        index = self._open_index
        self._open_kind = None
        self._open_index = None
        return [("content_block_stop", {"type": "content_block_stop", "index": index})]

    def stop(self, stop_reason, usage=None, stop_sequence=None):
        """Close the open block, then emit ``message_delta`` (stop reason, cumulative usage) and ``message_stop``."""
        self._require_running()
        events = self.close_block()
        self.stopped = True
        events.append(
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                    "usage": make_usage(**(usage or {})),
                },
            )
        )
        events.append(("message_stop", {"type": "message_stop"}))
        return events

    def error(self, error_type, message):
        """Emit an ``error`` event, as Anthropic does when a stream fails after HTTP 200; the stream ends here."""
        self.stopped = True
        return [("error", {"type": "error", "error": {"type": error_type, "message": message}})]

    def _require_running(self):
        if not self.started:
            raise RuntimeError("message_start has not been emitted")
        if self.stopped:
            raise RuntimeError("message already stopped")

    def _ensure_open(self, kind, block):
        self._require_running()
        if self._open_kind == kind:
            return []
        events = self.close_block()
        events.append(self._open(kind, block))
        return events

    def _open(self, kind, block):
        index = self.block_count
        self.block_count += 1
        self._open_kind = kind
        self._open_index = index
        return ("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})

    def _delta(self, delta):
        return ("content_block_delta", {"type": "content_block_delta", "index": self._open_index, "delta": delta})


#: What a provider chunk of the wrong shape raises inside a stream translator's ``feed``
#: (choices: [null], arguments as an object, usage as a list ...).
MALFORMED_CHUNK = (AttributeError, TypeError, ValueError, KeyError, RuntimeError)


def malformed_chunk_end(serializer, model, error):
    """``(serializer, events)`` that end a translated stream on a malformed provider chunk with a
    typed error event, not an exception raised into the transport's dataReceived: message_start
    first when nothing was started (``serializer`` None), nothing after the message stopped."""
    events = []
    if serializer is None:
        serializer = ClaudeStreamSerializer(model)
        events.extend(serializer.start())
    if not serializer.stopped:
        events.extend(serializer.error("api_error", "upstream sent a malformed chunk (%s)" % type(error).__name__))
    return serializer, events


def _require_str(value, what):
    # Deltas come from another provider's JSON: a number or an object where text belongs would reach
    # the client as a text_delta it cannot concatenate. Raised here, the translators turn it into an error event.
    if value is not None and not isinstance(value, str):
        raise TypeError("%s must be a string, not %s" % (what, type(value).__name__))


def assemble_message(events):
    """Fold a Claude SSE event sequence back into the non-streaming Message it describes.

    Used to answer a non-streaming request from a translator that only knows how to stream, so the
    two shapes cannot drift apart. An ``error`` event raises ValueError with the error's message.
    """
    message = None
    partial_json = {}
    for name, data in events:
        kind = data.get("type", name)
        if kind == "message_start":
            message = json.loads(json.dumps(data["message"]))
        elif kind == "content_block_start":
            message["content"].append(dict(data["content_block"]))
        elif kind == "content_block_delta":
            block = message["content"][data["index"]]
            delta = data["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            elif delta["type"] == "thinking_delta":
                block["thinking"] += delta["thinking"]
            elif delta["type"] == "signature_delta":
                block["signature"] = delta["signature"]
            elif delta["type"] == "input_json_delta":
                partial_json.setdefault(data["index"], []).append(delta["partial_json"])
        elif kind == "content_block_stop":
            index = data["index"]
            if index in partial_json:
                message["content"][index]["input"] = json.loads("".join(partial_json.pop(index)))
        elif kind == "message_delta":
            message["stop_reason"] = data["delta"].get("stop_reason")
            message["stop_sequence"] = data["delta"].get("stop_sequence")
            message["usage"] = dict(message["usage"], **(data.get("usage") or {}))
        elif kind == "error":
            raise ValueError(data.get("error", {}).get("message", "stream error"))
    if message is None:
        raise ValueError("no message_start in the event sequence")
    return message
