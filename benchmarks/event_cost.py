"""Instructions per relayed SSE event through the daemon's reactor loop, counted by valgrind.

``instructions.py --mode stream`` counts a whole paced stream through the daemon; under callgrind
the daemon runs ~50x slower, so how many events share a read or a reactor turn changes from run
to run and the count moves by ~2%: more than one change to the per-event path saves. This
benchmark isolates that path and makes it deterministic: a writer process sends N chunks (one SSE
event each, 2 ms apart: one read each) on a loopback connection; the measured process reads them
with the daemon's loop (``clproxy.daemon.fastpoll`` on twisted's epoll reactor) into an
``HTTP1Connection`` whose chunked body a ``ChunkedPassthrough`` relays. Each tree is run with two
values of N; the difference over the difference in reads is the cost of one event.

Usage: ``python benchmarks/event_cost.py --variant base=/tmp/old --variant new=.``
"""

import argparse
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
COLLECTED = re.compile(rb"Collected : ([\d,]+)")
RELAYED = re.compile(rb"^relayed (\d+) reads (\d+)$", re.M)

PAYLOAD = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
           b'"delta":{"type":"text_delta","text":"hello world, this is some text"}}\n\n')


def writer_source(count: int) -> str:
    """The writer process: listens (its port on stdout), accepts one connection, sends ``count``
    chunks 2 ms apart."""
    chunk = b"%x\r\n%s\r\n" % (len(PAYLOAD), PAYLOAD)
    return f"""
import socket, time
server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen(1)
print(server.getsockname()[1], flush=True)
connection, _ = server.accept()
time.sleep(1.0)
for _ in range({count}):
    connection.sendall({chunk!r}); time.sleep(0.002)
connection.sendall(b"0\\r\\n\\r\\n"); time.sleep(0.5); connection.close()
"""


def relay(count: int) -> None:
    """The measured side (run under callgrind): read ``count`` events with the daemon's loop."""
    from twisted.internet import epollreactor
    epollreactor.install()
    from twisted.internet import protocol, reactor

    from clproxy.daemon import fastpoll
    from clproxy.proxy.http1 import HTTP1Connection
    from clproxy.proxy.upstream import ChunkedPassthrough

    if not fastpoll.install(reactor):
        raise SystemExit("the daemon's loop is not installed on this twisted")
    writer = subprocess.Popen([sys.executable, "-c", writer_source(count)], stdout=subprocess.PIPE)
    port = int(writer.stdout.readline())  # blocks: no instructions counted while it starts

    class Relay:
        _chunks = 0
        bytes_relayed = 0
        tail = b""  # read at the last chunk (whether the stream ended whole)

    class Pool:
        def _release(self, connection):
            pass

        def _forget(self, connection):
            pass

    class Response:
        def _end(self, reason):
            reactor.callLater(0.1, reactor.stop)

    written = []
    connection = HTTP1Connection(Pool(), None)
    connection.state, connection._mode, connection._keep_alive = "BODY", "chunked", False
    connection.response = Response()
    relay_ = Relay()
    connection.bodyDecoder = ChunkedPassthrough(relay_, written.append, lambda: None, connection._body_done)
    reactor.connectTCP("127.0.0.1", port, protocol.ClientFactory.forProtocol(lambda: connection))
    reactor.callLater(count * 0.01 + 120, reactor.stop)
    reactor.run()
    writer.wait()
    print(f"relayed {relay_.bytes_relayed // (len(PAYLOAD) + 6)} reads {relay_._chunks}")


def measure(tree: str, count: int, python: str) -> tuple:
    """(instructions, events relayed, reads) of one callgrind run of ``tree``."""
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), PYTHONHASHSEED="0")
    out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", python,
                          os.path.abspath(__file__), "--relay", str(count)],
                         env=env, capture_output=True, timeout=900)
    text = out.stdout + out.stderr
    collected, relayed = COLLECTED.search(text), RELAYED.search(text)
    if out.returncode or not collected or not relayed:
        raise SystemExit(f"the run of {tree} failed:\n{text.decode(errors='replace')[-2000:]}")
    return int(collected.group(1).replace(b",", b"")), int(relayed.group(1)), int(relayed.group(2))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=DIR",
                        help="a clproxy source tree to measure; give two or more to compare")
    parser.add_argument("--events", type=int, nargs=2, default=(500, 2500), metavar=("FEW", "MANY"))
    parser.add_argument("--relay", type=int, help=argparse.SUPPRESS)  # the measured side
    args = parser.parse_args(argv)
    if args.relay is not None:
        relay(args.relay)
        return 0
    if not args.variant:
        parser.error("give at least one --variant NAME=DIR")
    first = None
    print("instructions per relayed event (one chunk per read, through the reactor loop)")
    for variant in args.variant:
        name, _, tree = variant.partition("=")
        few, many = (measure(tree, count, sys.executable) for count in args.events)
        per_event = (many[0] - few[0]) / (many[2] - few[2])
        first = first or per_event
        print(f"  {name:14} {per_event:10,.0f}  ratio {per_event / first:.3f}  "
              f"(reads {few[2]} and {many[2]}, events {few[1]} and {many[1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
