"""The Redis protocol's faster command encoder, script hashing, reply reader and command waiters
(clproxy.state.redis.protocol) against txredisapi's own: the same bytes for every kind of
argument, the same errors, a real redis-server reading what it sends, scripts included (loaded
once, then by their SHA1, and again after SCRIPT FLUSH), the same reply values however the reads
are cut, and each command's reply, timeout and lost connection as txredisapi gives them."""

import hashlib

import pytest
import pytest_twisted
from twisted.internet import reactor

from clproxy.state.redis import redis_endpoint
from clproxy.state.redis.link import RedisLink, txredisapi
from clproxy.state.redis.protocol import RedisProtocol
from clproxy.state.redis.url import parse_redis_url
from redis_server import redis_server, unique_prefix  # noqa: F401  (fixtures)

ARGUMENTS = [
    (), ("PING",), ("GET", "k"), ("SET", b"k", b"v"), ("SET", "ключ", "значение 🔑"),
    ("HINCRBY", "h", "f", 1), ("INCRBY", "k", -42), ("INCRBY", "k", 10 ** 30), ("X", 0),
    ("SET", "k", 1.5), ("SET", "k", 1e-7), ("SET", "k", float("inf")), ("SET", "k", True),
    ("SET", "k", False), ("SET", "k", None), ("SET", "k", bytearray(b"ba")), ("SET", "k", ""),
    ("SET", "k", b""), ("SET", "k", b"\r\n$3\r\n*1"), ("EVALSHA", "a" * 40, 2, "k1", "k2", "1.25", 3),
    ("MGET",) + tuple("key:%d" % i for i in range(100)),
]


class _Str(str):
    """A str subclass: encoded by txredisapi's own rules."""


class _Int(int):
    """An int subclass: encoded by txredisapi's own rules."""


def both(charset="utf-8", errors="strict"):
    """txredisapi's protocol and ours, with the same settings."""
    return (txredisapi.RedisProtocol(charset=charset, errors=errors),
            RedisProtocol(charset=charset, errors=errors))


@pytest.mark.parametrize("args", ARGUMENTS + [("SET", _Str("k"), _Int(7))], ids=repr)
@pytest.mark.parametrize("charset", ["utf-8", "latin-1", None])
def test_commands_are_encoded_to_the_same_bytes_as_txredisapi(args, charset):
    """Every kind of argument (bytes, str in several charsets, ints of any size and sign, floats,
    bools, None, bytearray, subclasses) gives the bytes txredisapi's encoder gives, or the same
    error."""
    theirs, ours = both(charset)
    try:
        expected = theirs._build_command(*args)
    except Exception as error:  # noqa: BLE001 - the same error is what is asserted
        with pytest.raises(type(error)):
            ours._build_command(*args)
        return
    assert ours._build_command(*args) == expected


@pytest.mark.parametrize("errors", ["strict", "replace"])
def test_a_string_its_charset_cannot_encode_fails_or_is_replaced_as_in_txredisapi(errors):
    """A lone surrogate (UTF-8 cannot hold it) is txredisapi's InvalidData with ``strict`` and a
    replacement character with ``replace``, as before."""
    theirs, ours = both(errors=errors)
    args = ("SET", "k", "a\udc00b")
    if errors == "strict":
        with pytest.raises(txredisapi.InvalidData):
            theirs._build_command(*args)
        with pytest.raises(txredisapi.InvalidData):
            ours._build_command(*args)
    else:
        assert ours._build_command(*args) == theirs._build_command(*args)


@pytest_twisted.ensureDeferred
async def test_a_real_server_runs_what_it_sends_and_scripts_load_once(redis_server):  # noqa: F811
    """Over a real connection: odd values round-trip; a script runs by EVAL the first time, by
    EVALSHA (its SHA1 computed once) after, and again after SCRIPT FLUSH forgot it."""
    link = RedisLink(parse_redis_url(redis_server.url), reactor,
                     redis_endpoint(parse_redis_url(redis_server.url), 2.0))
    await link.connect()
    prefix = unique_prefix()
    script = "return {KEYS[1], ARGV[1], ARGV[2]}"
    try:
        handler = await link.run(lambda r: _handler_of(r))
        handler = getattr(handler, "_protocol", handler)  # ClientService's proxy wraps it
        assert isinstance(handler, RedisProtocol)
        value = "значение \r\n$5 🔑"
        assert await link.run(lambda r: r.set(prefix + ":k", value)) == "OK"
        assert await link.run(lambda r: r.get(prefix + ":k")) == value
        assert await link.run(lambda r: r.execute_command("INCRBY", prefix + ":n", 10 ** 15)) == 10 ** 15
        first = await link.run(lambda r: r.eval(script, [prefix + ":s"], ["a b", 7]))
        assert first == [prefix + ":s", "a b", "7"]
        assert hashlib.sha1(script.encode()).hexdigest() in handler.script_hashes
        assert await link.run(lambda r: r.eval(script, [prefix], ["x", 1.5])) == [prefix, "x", "1.500000"]
        await link.run(lambda r: r.script_flush())
        assert await link.run(lambda r: r.eval(script, [prefix], ["again", 0])) == [prefix, "again", "0"]
    finally:
        await link.run(lambda r: r.delete([prefix + ":k", prefix + ":n"]))
        await link.stopService()


def _handler_of(handler):
    """The connection a ``RedisLink.run`` op is given, as the op's result."""
    from twisted.internet import defer
    return defer.succeed(handler)


# -- replies: the same values as txredisapi's reader, however the reads are cut ------------------

REPLIES = (b"+OK\r\n" b"-ERR unknown command 'FOO'\r\n" b"-NOSCRIPT No matching script\r\n"
           b":42\r\n" b":-7\r\n" b":12x\r\n" b"$5\r\nhello\r\n" b"$-1\r\n" b"$0\r\n\r\n"
           b"$6\r\n\xd0\xba\xd0\xbb\xd1\x8e\r\n" b"$2\r\n\xff\xfe\r\n" b"$4\r\na\r\nb\r\n"
           b"*3\r\n$1\r\na\r\n$-1\r\n:5\r\n" b"*0\r\n" b"*-1\r\n"
           b"*2\r\n*2\r\n+x\r\n-ERR inner\r\n*1\r\n$3\r\nabc\r\n"
           b"*4\r\n$26\r\nclproxy:cd:account-1:until\r\n$17\r\n1733580000.123456\r\n:0\r\n$-1\r\n")


class Collected:
    """A protocol's replies as they reach its reply queue."""

    def __init__(self, protocol_class, clock):
        from twisted.internet.testing import StringTransport
        self.protocol = protocol_class(charset="utf-8", convertNumbers=False)
        self.protocol.callLater = clock.callLater  # txredisapi hands a read's rest to the next turn
        self.protocol.replyReceived = self.replies_append
        self.protocol.makeConnection(StringTransport())
        self.replies = []

    def replies_append(self, reply):
        self.replies.append(comparable(reply))


def comparable(value):
    """``value`` with its errors (top-level or in arrays) as (type name, args): comparable."""
    if isinstance(value, Exception):
        return type(value).__name__, value.args
    if isinstance(value, list):
        return [comparable(item) for item in value]
    return value


def replies_of(protocol_class, reads):
    """What ``protocol_class`` makes of ``reads``, each read delivered on its own reactor turn."""
    from twisted.internet import task
    clock = task.Clock()
    collected = Collected(protocol_class, clock)
    for read in reads:
        collected.protocol.dataReceived(read)
        while clock.getDelayedCalls():
            clock.advance(0)
    return collected.replies


def test_replies_read_whole_are_txredisapis_values():
    """Every reply kind (status, errors, integers and a bad one, bulk strings: UTF-8, undecodable,
    empty, nil, holding CRLF; arrays: empty, nil, nested, mixed) arrives as the same value."""
    expected = replies_of(txredisapi.RedisProtocol, [REPLIES])
    assert len(expected) == 17
    assert replies_of(RedisProtocol, [REPLIES]) == expected


def test_one_read_of_replies_is_parsed_at_once_with_the_socket_never_paused():
    """All the replies of one read are delivered within that read: no turn of the reactor is asked
    for and the transport is never paused (txredisapi's reader did both after every bulk string)."""
    from twisted.internet import task
    clock = task.Clock()
    collected = Collected(RedisProtocol, clock)
    collected.protocol.dataReceived(REPLIES)
    assert len(collected.replies) == 17
    assert clock.getDelayedCalls() == [] and collected.protocol.transport.producerState == "producing"


def test_replies_cut_at_every_byte_are_the_same():
    """The replies cut in two at every byte, and sent a byte at a time, give the same values."""
    expected = replies_of(txredisapi.RedisProtocol, [REPLIES])
    for cut in range(1, len(REPLIES)):
        assert replies_of(RedisProtocol, [REPLIES[:cut], REPLIES[cut:]]) == expected, cut
    assert replies_of(RedisProtocol, [REPLIES[i:i + 1] for i in range(len(REPLIES))]) == expected


def test_a_line_too_long_or_arrays_nested_too_deep_close_the_connection():
    """A line over txredisapi's limit (16 KiB) without its end, arrays nested past ``max_depth``,
    or a status line that is not UTF-8 are not Redis replies: the connection is closed (the link
    reconnects), nothing is delivered, nothing is raised into the reactor."""
    from twisted.internet import task
    for reads in ([b"+" + b"x" * 20000], [b"*1\r\n" * (RedisProtocol.max_depth + 2) + b":1\r\n"],
                  [b"+\xff\xfe\r\n"]):
        collected = Collected(RedisProtocol, task.Clock())
        collected.protocol.dataReceived(reads[0])
        assert collected.replies == [] and collected.protocol.transport.disconnecting


def test_each_script_is_hashed_once_per_process(monkeypatch):
    """``eval`` hashes a script's text the first time it is run, not at every call."""
    from clproxy.state.redis import protocol as module
    hashed = []
    real_sha1 = module.hashlib.sha1
    monkeypatch.setattr(module, "_SCRIPTS", {})
    monkeypatch.setattr(module.hashlib, "sha1", lambda data: hashed.append(data) or real_sha1(data))
    ours = RedisProtocol(charset="utf-8")
    ours._eval = lambda text, sha1, keys, args: (text, sha1)  # what would be sent, not sent
    script = "return 1"
    first = ours.eval(script, ["k"], [])
    again = ours.eval(script, ["k"], [])
    assert first == again == (b"return 1", real_sha1(b"return 1").hexdigest())
    assert hashed == [b"return 1"]


# -- commands: each one's Deferred fired by its own reply, in order --------------------------------

def connected_protocol(clock, reply_timeout=2.0):
    """Our protocol on a string transport, its reply timeouts on ``clock``."""
    from twisted.internet.testing import StringTransport
    protocol = RedisProtocol(charset="utf-8", replyTimeout=reply_timeout)
    protocol.callLater = clock.callLater
    protocol.makeConnection(StringTransport())
    protocol.connected = 1  # (txredisapi sets it once its connectionMade's AUTH/SELECT are done)
    return protocol


def outcome(d):
    """What a fired Deferred gave: its value, or (error type name, args)."""
    box = []
    d.addBoth(box.append)
    assert box, "not fired"
    value = box[0]
    return (type(value.value).__name__, value.value.args) if hasattr(value, "value") else value


def test_each_command_gets_its_own_reply_values_errors_and_post_processing():
    """Three commands in a row get their own replies: a value, an error reply as its exception,
    and an array turned into a dict by txredisapi's post-processing."""
    from twisted.internet import task
    protocol = connected_protocol(task.Clock())
    get = protocol.get("k")
    bad = protocol.execute_command("FOO")
    pairs = protocol.hgetall("h")  # txredisapi turns the array into a dict (post_proc)
    # each waits on its own Deferred, not on txredisapi's reply queue and the two callbacks and
    # third Deferred stacked on it (~21,000 instructions a command)
    assert not protocol.replyQueue.waiting
    assert protocol.transport.value() == (b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n$3\r\nFOO\r\n"
                                          b"*2\r\n$7\r\nHGETALL\r\n$1\r\nh\r\n")
    protocol.dataReceived(b"$1\r\nv\r\n-ERR unknown command 'FOO'\r\n*2\r\n$1\r\nf\r\n$1\r\n1\r\n")
    assert outcome(get) == "v"
    assert outcome(bad) == ("ResponseError", ("ERR unknown command 'FOO'",))  # (txredisapi's text)
    assert outcome(pairs) == {"f": 1}


def test_a_command_through_txredisapis_queue_keeps_its_place_in_the_order():
    """A command that takes txredisapi's own path (a pipeline, a transaction) between two of ours
    gets the reply to it, not its neighbour's."""
    from twisted.internet import task
    protocol = connected_protocol(task.Clock())
    first = protocol.get("a")
    protocol.pipelining = True
    queued = protocol.get("b")  # txredisapi's path: its reply queue
    protocol.pipelining = False
    last = protocol.get("c")
    protocol.dataReceived(b"$1\r\nA\r\n$1\r\nB\r\n$1\r\nC\r\n")
    assert (outcome(first), outcome(queued), outcome(last)) == ("A", "B", "C")


def test_a_command_unanswered_for_the_reply_timeout_fails_and_drops_the_connection():
    """As txredisapi: TimeoutError replyTimeout after the command was sent (on the clock), for it
    and the commands behind it, and the connection aborted; an answered command's deadline passes
    harmlessly. One timer per connection watches the oldest command, however many wait."""
    from twisted.internet import task
    clock = task.Clock()
    protocol = connected_protocol(clock, reply_timeout=2.0)
    answered = protocol.get("a")
    protocol.dataReceived(b"$1\r\nA\r\n")
    assert outcome(answered) == "A"
    clock.advance(1.0)
    stalled = protocol.get("b")  # due at 3.0
    clock.advance(1.0)  # the answered command's deadline: nothing happens
    assert not stalled.called and not protocol.transport.disconnecting
    behind = [protocol.get("c%d" % i) for i in range(10)]  # due at 4.0
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(0.9)
    assert not stalled.called
    clock.advance(0.1)
    assert outcome(stalled) == ("TimeoutError", ("Not received Redis response in 2.0 seconds",))
    assert protocol.transport.disconnecting
    assert {outcome(d) for d in behind} == {("TimeoutError", ("Not received Redis response in 2.0 seconds",))}
    protocol.connectionLost(txredisapi.ConnectionError("aborted"))
    assert clock.getDelayedCalls() == []


def test_a_lost_connection_fails_every_command_still_waiting():
    """As txredisapi: every command still waiting fails with ConnectionError, and no timer is left."""
    from twisted.internet import task
    clock = task.Clock()
    protocol = connected_protocol(clock)
    waiting = [protocol.get("a"), protocol.get("b")]
    protocol.connectionLost(txredisapi.ConnectionError("gone"))
    assert [outcome(d) for d in waiting] == [("ConnectionError", ("Lost connection",))] * 2
    assert clock.getDelayedCalls() == []
