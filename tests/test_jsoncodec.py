"""clproxy.jsoncodec: orjson when installed, the standard json otherwise, with the same results."""

import json
import os
import subprocess
import sys

import pytest

from clproxy import jsoncodec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a fresh interpreter where `import orjson` fails, as on Debian (which does not package it).
NO_ORJSON = """
import builtins, sys
real = builtins.__import__
def guarded(name, *args, **kwargs):
    if name == "orjson" or name.startswith("orjson."):
        raise ImportError("no orjson here")
    return real(name, *args, **kwargs)
builtins.__import__ = guarded
"""


def without_orjson(code: str) -> str:
    """Run ``code`` where orjson cannot be imported; its stdout."""
    result = subprocess.run([sys.executable, "-c", NO_ORJSON + code], capture_output=True, text=True,
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_standard_json_when_orjson_is_missing():
    """Without orjson the codec imports, says so, and parses and writes the same values."""
    out = without_orjson(
        "from clproxy import jsoncodec as c\n"
        "print(c.BACKEND)\n"
        "print(c.loads(b'{\"model\": \"m\", \"s\": \"\\\\u00e9\"}'))\n"
        "print(c.dumps({'a': [1, 2], 'e': 'é'}, newline=True).decode(), end='')\n"
        "print(c.dumps({'t': object()}, default=lambda o: 'X').decode())\n"
        "print(c.dumps({'big': 2 ** 70}).decode())\n"
        "try:\n    c.loads(b'{broken')\nexcept c.JSONDecodeError:\n    print('rejected')\n"
        "try:\n    c.loads(b'\\xff')\nexcept c.JSONDecodeError:\n    print('rejected bytes')\n")
    assert out.splitlines() == ["json", "{'model': 'm', 's': 'é'}", '{"a":[1,2],"e":"é"}', '{"t":"X"}',
                                '{"big":1180591620717411303424}', "rejected", "rejected bytes"]


def test_the_http_and_jsonl_modules_import_without_orjson():
    """The modules that parse request bodies and write JSONL rows work on the standard json alone."""
    out = without_orjson(
        "import clproxy.http.site, clproxy.observe.jsonl as j\n"
        "import sys; print('orjson' in sys.modules)\n"
        "print(j._dumps_line({'ts': 't', 'n': 2 ** 70}).decode(), end='')\n")
    assert out.splitlines() == ["False", '{"ts":"t","n":1180591620717411303424}']


@pytest.mark.skipif(jsoncodec.orjson is None, reason="orjson (the `fast` extra) is not installed")
def test_orjson_backend_agrees_with_json():
    """With orjson the results equal the standard ones, including what orjson refuses (big integers)."""
    assert jsoncodec.BACKEND == "orjson"
    value = {"model": "claude", "messages": [{"role": "user", "content": "é\u2028"}], "n": 1.5, "big": 2 ** 70}
    assert json.loads(jsoncodec.dumps(value)) == value
    assert jsoncodec.loads(json.dumps(value).encode()) == value
    assert jsoncodec.dumps({"a": 1}, newline=True) == b'{"a":1}\n'
    with pytest.raises(jsoncodec.JSONDecodeError):
        jsoncodec.loads(b"{broken")


# (bytes, the fields loads finds in them, or None when they are not one JSON object to loads)
READER_CASES = [
    (b'{"model": "m", "stream": true, "messages": [{"role": "user", "content": [1, {"a": null}]}]}',
     {"model": "m", "stream": True}),
    (b'{"messages": []}', {}),
    (b'  {"model": "a", "model": "b", "stream": "yes"}\n', {"model": "b", "stream": "yes"}),
    ('{"model": "é", "x": "\u2028 ✓"}'.encode(), {"model": "é"}),
    (b'{"model": {"nested": [1, 2]}, "stream": 0}', {"model": {"nested": [1, 2]}, "stream": 0}),
    (b'{"model": "m", "messages": [{"role": "user",}]}', None),  # broken where no field is read
    (b'{"model": "m", "x": "\xff"}', None),  # bad UTF-8 inside a skipped string
    (b'{"model": "m"} {"model": "m"}', None),
    (b'{"model": "m", "x": tru}', None),
    (b'{"model": "m", "x": "\x01"}', None),  # a raw control character in a string
    (b"[1, 2]", None),
    (b'"model"', None),
    (b"", None),
]


@pytest.mark.parametrize("body,parsed", READER_CASES)
def test_object_reader_agrees_with_a_full_parse(body, parsed):
    """The reader gives the named fields of every object loads accepts, and None for the rest."""
    read = jsoncodec.object_reader("model", "stream")
    if parsed is None:
        assert read(body) is None
        try:
            assert not isinstance(json.loads(body), dict)
        except ValueError:
            pass
    else:
        assert json.loads(body) == {**json.loads(body), **parsed}
        assert read(body) == (parsed.get("model"), parsed.get("stream"))


@pytest.mark.skipif(jsoncodec.msgspec is None and jsoncodec.orjson is None,
                    reason="Python's json alone accepts these: the reader has nothing to decline")
@pytest.mark.parametrize("body", [
    b'{"model": "m", "x": "\\ud83d"}',  # a lone surrogate escape: JSON allows it, orjson does not
    b'{"model": "m", "x": NaN}',  # Python's json accepts NaN
    b'\xef\xbb\xbf{"model": "m"}',
    b'{"model": "m", "deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
])
def test_object_reader_leaves_the_doubtful_to_the_full_parse(body):
    """What only the standard parser accepts, or nothing parses, the reader declines: no exception."""
    assert jsoncodec.object_reader("model")(body) is None


def test_object_reader_with_no_fields_checks_the_object():
    """With no names the reader is a check: () for a JSON object, None for anything else."""
    check = jsoncodec.object_reader()
    assert check(b'{"a": [1, {"b": 2}]}') == () and check(b"[]") is None and check(b'{"a": }') is None


def test_object_reader_without_msgspec_parses_in_full():
    """Where msgspec cannot be imported the reader still gives the same fields, by a full parse."""
    guard = NO_ORJSON.replace('name == "orjson" or name.startswith("orjson.")', 'name == "msgspec"')
    code = ("from clproxy import jsoncodec as c\n"
            "print(c.msgspec is None)\n"
            "r = c.object_reader('model', 'stream')\n"
            "print(r(b'{\"model\": \"m\", \"x\": [1], \"stream\": true}'), r(b'[1]'), r(b'{\"x\": 1'))\n")
    result = subprocess.run([sys.executable, "-c", guard + code], capture_output=True, text=True,
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["True", "('m', True) None None"]


@pytest.mark.skipif(jsoncodec.msgspec is None, reason="msgspec (the `fast` extra) is not installed")
def test_object_reader_builds_only_the_named_fields():
    """With msgspec the rest of the body is checked but not built: no object for its thousand items."""
    import gc
    body = b'{"model": "m", "messages": [' + b",".join([b'{"role": "user", "content": [1]}'] * 1000) + b"]}"
    read = jsoncodec.object_reader("model")
    read(body)
    gc.collect()
    gc.disable()
    try:
        before = gc.get_count()[0]
        assert read(body) == ("m",)
        built = gc.get_count()[0] - before
    finally:
        gc.enable()
    assert built < 10, built  # a full parse makes ~3,000 tracked objects here


@pytest.mark.parametrize("text", [
    b'"plain"', '"text given as str"', b'"caf\\u00e9 \\"quoted\\""', b'{"session_id": "s", "n": [1, 2.5, null]}',
    b'"\\ud800 a lone surrogate"', b'NaN', b'[Infinity]', b'-12345678901234567', b'{"a": 1, "a": 2}',
])
def test_loads_or_none_gives_what_json_gives(text):
    """What the fast parser takes and what only Python's json takes (a lone surrogate, NaN) both
    come out as json.loads would give them."""
    expected = json.loads(text)
    got = jsoncodec.loads_or_none(text)
    assert repr(got) == repr(expected)  # repr: NaN is not equal to itself


@pytest.mark.parametrize("text", [b"", b"{", b'"unterminated', b"\xff\xfe", "[" * 100_000, b"{} trailing"])
def test_loads_or_none_is_none_for_what_is_not_json(text):
    """Broken, cut, non-UTF-8 or absurdly deep input: None, never an exception."""
    assert jsoncodec.loads_or_none(text) is None


def test_std_loads_reads_utf8_only():
    """The full parse of a request body reads UTF-8 text (a UTF-8 byte-order mark still allowed,
    as Python's json allows it); UTF-16, UTF-32 and encoded surrogates, which json.loads of bytes
    would guess and read, are ValueErrors."""
    doc = '{"model": "m", "text": "h\\u00e9"}'
    assert jsoncodec.std_loads(doc.encode("utf-8")) == json.loads(doc)
    assert jsoncodec.std_loads(b"\xef\xbb\xbf" + doc.encode("utf-8")) == json.loads(doc)
    for refused in (doc.encode("utf-16"), doc.encode("utf-16-le"), doc.encode("utf-32"),
                    b'{"x": "\xed\xa0\x80"}'):
        assert json.loads(refused) is not None  # what the standard parser alone accepts
        with pytest.raises(ValueError):
            jsoncodec.std_loads(refused)
