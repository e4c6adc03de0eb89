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
