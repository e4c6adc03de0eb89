"""What the request recorder costs per request on the hot path (begin, attempt, first byte, usage,
finish, with the JSONL writer on), in microseconds: rounds of 1,000 requests, median and spread.

It used to be a timed unit test; timings belong here, where a noisy machine shows as spread rather
than as a failing test. Run: ``.venv/bin/python benchmarks/recorder_cost.py``.
"""

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import task  # noqa: E402

from clproxy.observe.recorder import Observability  # noqa: E402
from clproxy.routing.policy import Verdict  # noqa: E402

HEADERS = [(b"Content-Type", b"application/json"), (b"Anthropic-Version", b"2023-06-01"),
           (b"X-Api-Key", b"k"), (b"User-Agent", b"claude-cli/2.1"), (b"X-Stainless-Lang", b"js")] * 3
SUCCESS = Verdict("success", 200, "ok", None, 0)


def one_request(obs, n):
    """One request's worth of recorder calls, as the dispatcher makes them."""
    record = obs.begin(request_id=str(n), method=b"POST", path=b"/v1/messages", model="m", stream=True,
                       headers=HEADERS, body=b"{}")
    record.outbound_headers()
    record.attempt(account_name="a", provider="anthropic", model="m", status=200, verdict=SUCCESS,
                   duration=0.1)
    record.first_byte()
    record.usage({"input_tokens": 1, "output_tokens": 2})
    record.finish(status=200, account_name="a", provider="anthropic", actual_model="m")


def main(rounds: int = 9, per_round: int = 1000) -> None:
    """Print the median cost per request and its spread over ``rounds`` rounds."""
    clock = task.Clock()
    clock.advance(1_700_000_000)
    with tempfile.TemporaryDirectory() as logs:
        obs = Observability(clock=clock, logs_dir=logs)
        figures = []
        for _ in range(rounds):
            started = time.perf_counter()
            for n in range(per_round):
                one_request(obs, n)
            figures.append((time.perf_counter() - started) / per_round * 1e6)
            obs.writer.sync()
    print("recorder hot path: median {:.1f} us/request (min {:.1f}, max {:.1f}, {} rounds of {})".format(
        statistics.median(figures), min(figures), max(figures), rounds, per_round))


if __name__ == "__main__":
    main()
