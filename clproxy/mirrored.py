"""Code that does twisted's work in fewer steps, and how it knows this twisted is the one it copied.

A fast path that reproduces part of twisted (the request head parser, the reactor's event loop)
is only right for the twisted it was checked against. Each such module lists the twisted
functions it mirrors and the sha256 of their source (:func:`fingerprint`) for each release it was
checked with; on any other twisted, the digest differs and the module leaves twisted's own code in
place.
"""

import hashlib


def fingerprint(functions) -> str:
    """A sha256 over the source of ``functions`` ((holder, name) pairs), or "" when one is
    missing or its source cannot be read."""
    digest = hashlib.sha256()
    for holder, name in functions:
        try:
            digest.update(source_of(getattr(holder, name)))
        except (AttributeError, OSError, TypeError, ValueError):
            return ""
    return digest.hexdigest()


def source_of(function) -> bytes:
    """The source lines of ``function`` as bytes, from its first line (decorators included) to
    the last line any of its code (nested functions included) came from: a change to the
    function that changes what it does changes these bytes. Raises OSError when the file cannot
    be read, ValueError when it is shorter than the code says or this Python gives no positions.

    Not ``inspect.getsource``: it keeps every line of each file read in ``linecache`` and runs the
    tokenizer, which left ~0.4 MiB more in the daemon's idle RSS than reading the file once does.
    """
    code = function.__code__
    last = _last_line(code)
    with open(code.co_filename, "rb") as f:
        text = f.read()
    start = 0
    for _ in range(code.co_firstlineno - 1):
        start = text.index(b"\n", start) + 1
    end = start
    for _ in range(last - code.co_firstlineno + 1):
        eol = text.find(b"\n", end)
        end = len(text) if eol < 0 else eol + 1  # the file's last line may lack its newline
    return text[start:end]


def _last_line(code) -> int:
    positions = getattr(code, "co_positions", None)
    if positions is None:  # before Python 3.11: no end lines to go by
        raise ValueError("no source positions")
    last = max((end for _, end, _, _ in positions() if end is not None), default=code.co_firstlineno)
    for const in code.co_consts:
        if hasattr(const, "co_positions"):
            last = max(last, _last_line(const))
    return last
