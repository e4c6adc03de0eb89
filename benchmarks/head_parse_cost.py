"""What reading a request head costs the daemon's channel, in one pass (clproxy.http.head) or
line by line (twisted.web's own parser), per request.

A realistic Claude Code request (benchmarks/payload.py's headers: host, accept, anthropic-*,
user-agent, x-api-key, x-stainless-*..., with a content-length, 21 header lines) with a small JSON
body is fed, whole in one read, into one keep-alive ProxyChannel over an in-memory transport, N
times per round, with the one-pass parser on and forced off. Two measures:

* ``head``: the channel up to the request being received: parsing, the request object,
  allHeadersReceived, the body through twisted's decoder; the request is then let go at once
  (no resource runs). This is what the one-pass parser changes.
* ``full``: the same plus twisted.web's processing of a request a minimal resource answers at once
  (the response written): the change against a whole request's cost in the channel.

Timing is printed as the per-request median over rounds (min-max). With ``--callgrind`` (and
/usr/bin/valgrind), it also counts instructions per request under ``valgrind --tool=callgrind``
(two runs of different sizes per mode; the difference divided by the extra requests removes the
start-up), which the noise of a shared machine does not move.
Run: ``.venv/bin/python benchmarks/head_parse_cost.py [--body claude] [--callgrind]`` (``--body claude``:
the ~20 KB body of benchmarks/payload.py instead of a small one).
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from payload import build_body, request_bytes  # noqa: E402
from twisted.internet import task  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402
from twisted.web import resource  # noqa: E402

from clproxy.http import head  # noqa: E402
from clproxy.http.site import ProxyHTTPRequest, ProxySite  # noqa: E402

BODY = b'{"model":"claude-sonnet-4-5","max_tokens":1,"messages":[{"role":"user","content":"hi"}]}'
#: the two run sizes under callgrind (each run is ~25 s of start-up plus ~5 ms a request)
SMALL, LARGE = 1000, 5000

#: the bodies: a small one, or the ~20 KB Claude-Code-like one (which comes in the same read as its
#: head too, and which twisted's line splitting copies once per head line)
BODIES = {"small": BODY, "claude": build_body(stream=False)}


def request(body: str) -> bytes:
    """The whole request, head and body, as the client sends it."""
    return request_bytes("127.0.0.1:8082", "/v1/messages?beta=true", BODIES[body], stream=False)


class Ok(resource.Resource):
    """Answers every request at once."""

    isLeaf = True

    def render(self, request):
        return b"ok"


class LetGo(ProxyHTTPRequest):
    """A request that is done as soon as it is received (for ``head``: no resource, no response)."""

    def requestReceived(self, command, path, version):
        self.channel.requestDone(self)


def channel(fast: bool, full: bool):
    """A connected ProxyChannel on an in-memory transport, on a private clock."""
    site = ProxySite(Ok())
    if not full:
        site.requestFactory = LetGo
    proto = site.buildProtocol(None)
    proto.callLater = task.Clock().callLater
    proto.fast_head = fast
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def feed(data: bytes, fast: bool, full: bool, count: int) -> float:
    """Seconds to feed ``count`` requests, one read each, to one channel."""
    proto, transport = channel(fast, full)
    receive, clear = proto.dataReceived, transport.clear
    start = time.perf_counter()
    for _ in range(count):
        receive(data)
        clear()
    elapsed = time.perf_counter() - start
    assert len(proto.requests) == 0 and not transport.disconnecting
    assert proto.heads_in_one_pass == (count if fast else 0)
    return elapsed


def timing(data: bytes, full: bool, rounds: int, count: int):
    """Per-request microseconds, {fast: (median, min, max)}, rounds of both modes interleaved."""
    samples = {True: [], False: []}
    for fast in (True, False):
        feed(data, fast, full, count // 10)  # warm up (caches, the name encoder's cache)
    for _ in range(rounds):
        for fast in (True, False):
            samples[fast].append(feed(data, fast, full, count) / count * 1e6)
    return {fast: (statistics.median(s), min(s), max(s)) for fast, s in samples.items()}


def instructions(body: str, fast: bool, full: bool, count: int) -> int:
    """Instructions callgrind counts for a run of this script feeding ``count`` requests."""
    with tempfile.TemporaryDirectory() as directory:
        out = os.path.join(directory, "callgrind.out")
        result = subprocess.run(
            ["/usr/bin/valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, __file__,
             "--body", body, "--one", "fast" if fast else "twisted", "full" if full else "head", str(count)],
            capture_output=True, text=True, check=True, env=dict(os.environ, PYTHONHASHSEED="0"))
        found = re.search(r"Collected : (\d+)", result.stderr)
        if not found:
            raise RuntimeError("no instruction count from callgrind: " + result.stderr[-500:])
        return int(found.group(1))


def per_request_instructions(body: str, fast: bool, full: bool, small: int, large: int) -> float:
    """Instructions per request: the difference between two run sizes over the extra requests."""
    return (instructions(body, fast, full, large) - instructions(body, fast, full, small)) / (large - small)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--count", type=int, default=5000, help="requests per round")
    parser.add_argument("--callgrind", action="store_true", help="also count instructions with valgrind")
    parser.add_argument("--body", choices=sorted(BODIES), default="small")
    parser.add_argument("--one", nargs=3, metavar=("MODE", "WHAT", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # one run under callgrind
        mode, what, count = args.one
        feed(request(args.body), mode == "fast", what == "full", int(count))
        return
    if not head.ENABLED:
        print("the one-pass parser is off for this twisted (its fingerprint is not a known one)")
        return
    data = request(args.body)
    lines = data[:data.index(b"\r\n\r\n")].count(b"\r\n")
    print(f"request: {len(data)} bytes ({lines} header lines, {len(BODIES[args.body])}-byte body); "
          f"{args.rounds} rounds of {args.count} requests on one keep-alive channel")
    for full in (False, True):
        figures = timing(data, full, args.rounds, args.count)
        name = "full" if full else "head"
        for fast in (True, False):
            median, low, high = figures[fast]
            print(f"  {name} {'one pass' if fast else 'twisted ':<8}  {median:7.2f} us/request  "
                  f"({low:.2f}-{high:.2f})")
        print(f"  {name} one pass / twisted: {figures[True][0] / figures[False][0]:.2f}")
    if not args.callgrind:
        return
    if not shutil.which("/usr/bin/valgrind"):
        print("callgrind: /usr/bin/valgrind not found")
        return
    print(f"instructions per request (callgrind, runs of {SMALL:,} and {LARGE:,} requests):")
    for full in (False, True):
        counts = {fast: per_request_instructions(args.body, fast, full, SMALL, LARGE) for fast in (True, False)}
        name = "full" if full else "head"
        print(f"  {name} one pass {counts[True]:9.0f}   twisted {counts[False]:9.0f}   "
              f"ratio {counts[True] / counts[False]:.2f}   saved {counts[False] - counts[True]:.0f}")


if __name__ == "__main__":
    main()
