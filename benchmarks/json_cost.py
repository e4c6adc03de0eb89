"""What parsing a request body costs with the standard json instead of orjson, in microseconds.

The daemon parses every /v1/messages body once (clproxy.http.site.parse_messages_request, through
clproxy.jsoncodec) to read ``model`` and ``stream``. Debian does not package orjson, so the .deb
parses with json; this measures the difference on the benchmark's ~20 KB Claude-Code-like body
(benchmarks/payload.py): rounds of 1,000 parses, median and spread per backend, and what json adds
per request. It also times what the daemon runs now, ``clproxy.jsoncodec.object_reader`` (with
msgspec: the body checked whole, only ``model`` and ``stream`` built), and ``dumps`` of the same
document (the JSONL recorder's rows are smaller).
Run: ``.venv/bin/python benchmarks/json_cost.py`` (orjson and msgspec come with ``pip install '.[fast]'``).
"""

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from payload import build_body  # noqa: E402

from clproxy import jsoncodec  # noqa: E402

try:
    import orjson
except ImportError:
    orjson = None


def per_call_us(function, argument, per_round: int) -> float:
    """Mean cost of one call over ``per_round`` calls, in microseconds."""
    start = time.perf_counter()
    for _ in range(per_round):
        function(argument)
    return (time.perf_counter() - start) / per_round * 1e6


def measure(function, argument, rounds: int, per_round: int):
    """(median, min, max) over ``rounds`` rounds of the per-call cost in microseconds."""
    per_call_us(function, argument, per_round // 10)  # warm up
    samples = [per_call_us(function, argument, per_round) for _ in range(rounds)]
    return statistics.median(samples), min(samples), max(samples)


def line(name: str, figures) -> str:
    median, low, high = figures
    return f"  {name:<14} median {median:8.1f} us   (rounds: {low:.1f} .. {high:.1f})"


def main(rounds: int = 9, per_round: int = 1000) -> None:
    body = build_body(stream=False)
    document = json.loads(body)
    print(f"request body: {len(body)} bytes; {rounds} rounds of {per_round} calls")
    print("loads (what every /v1/messages pays):")
    std = measure(json.loads, body, rounds, per_round)
    print(line("json", std))
    if orjson is None:
        print("  orjson         not installed (pip install orjson, or '.[fast]'): nothing to compare")
        return
    fast = measure(orjson.loads, body, rounds, per_round)
    print(line("orjson", fast))
    print(f"  json costs {std[0] - fast[0]:.1f} us more per request ({std[0] / fast[0]:.1f}x orjson)")
    reader = "msgspec" if jsoncodec.msgspec is not None else "full parse"
    read = measure(jsoncodec.object_reader("model", "stream"), body, rounds, per_round)
    print(line("reader", read) + f"  (object_reader over {reader}: {read[0] / fast[0]:.2f}x orjson)")
    print("dumps (the same document):")
    std_dumps = measure(lambda d: json.dumps(d, ensure_ascii=False, separators=(",", ":")).encode(), document,
                        rounds, per_round)
    fast_dumps = measure(orjson.dumps, document, rounds, per_round)
    print(line("json", std_dumps))
    print(line("orjson", fast_dumps))


if __name__ == "__main__":
    main()
