"""Client keys: generation, hashing, the key ring's verification and reading a key from headers."""

import hashlib
import hmac
import math
import re

import attr
import pytest
from twisted.web.http_headers import Headers

from clproxy.team import keys as keys_module
from clproxy.team.keys import (KeyRecord, KeyRing, display_prefix, extract_client_key, generate_key,
                               hash_key)


def record(name="alice", key=None, **limits):
    """A record for ``key`` (a new one if none)."""
    key = key or generate_key()
    return KeyRecord(name=name, hash=hash_key(key), prefix=display_prefix(key), **limits)


def test_generated_keys_are_prefixed_urlsafe_and_256_bits():
    """Keys are clp_ + url-safe base64 of 32 random bytes (>= 256 bits), all different."""
    made = {generate_key() for _ in range(200)}
    assert len(made) == 200
    for key in made:
        assert re.fullmatch(r"clp_[A-Za-z0-9_-]{43}", key)
        assert len(key[4:]) * 6 >= 256


def test_generated_keys_use_the_os_csprng(monkeypatch):
    """generate_key draws its bytes from secrets (os.urandom), not a seeded PRNG."""
    calls = []
    monkeypatch.setattr(keys_module.secrets, "token_urlsafe", lambda n: calls.append(n) or "x" * 43)
    assert generate_key() == "clp_" + "x" * 43 and calls == [32]


def test_generated_keys_look_random():
    """Character frequencies over many keys are close to uniform (a gross sanity check)."""
    text = "".join(generate_key()[4:] for _ in range(2000))
    counts = {c: text.count(c) for c in set(text)}
    assert len(counts) == 64
    expected = len(text) / 64
    assert all(abs(n - expected) < 6 * math.sqrt(expected) for n in counts.values())


def test_hash_is_sha256_hex_and_never_the_key():
    """hash_key is the SHA-256 hex digest; prefix is 8 characters after clp_."""
    key = generate_key()
    assert hash_key(key) == hashlib.sha256(key.encode()).hexdigest()
    assert key not in hash_key(key) and len(hash_key(key)) == 64
    assert display_prefix(key) == key[4:12]


def test_repr_of_record_and_ring_hold_no_hash_or_key():
    """A record's repr leaves the hash out; a ring's repr counts keys only."""
    key = generate_key()
    rec = record(key=key)
    assert rec.hash not in repr(rec) and key not in repr(rec)
    assert repr(KeyRing([rec])) == "KeyRing(1 keys)"


def test_verify_accepts_the_key_and_refuses_others():
    """verify finds a stored key's record and refuses unknown, empty, None or huge input."""
    key = generate_key()
    ring = KeyRing([record("alice", key, admin=True), record("bob")])
    assert ring.verify(key).name == "alice"
    for bad in (None, "", generate_key(), key + "x", key[:-1], "clp_" + "A" * 10_000, 12):
        assert ring.verify(bad) is None
    assert not ring.empty and ring.has_admin and len(ring) == 2


def test_verify_compares_in_constant_time(monkeypatch):
    """The final comparison goes through hmac.compare_digest on the hashes."""
    seen = []
    real = hmac.compare_digest

    def spy(a, b):
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(keys_module.hmac, "compare_digest", spy)
    key = generate_key()
    ring = KeyRing([record(key=key)])
    assert ring.verify(key) is not None
    assert seen == [(hash_key(key), hash_key(key))]


def test_replace_revokes_at_once():
    """replace swaps the accepted set: a key left out is refused from then on."""
    key = generate_key()
    ring = KeyRing([record(key=key)])
    ring.replace([])
    assert ring.verify(key) is None and ring.empty


def test_record_json_round_trip_and_malformed():
    """to_json/from_json round-trip; malformed records fail with a message naming no secret."""
    rec = record(models=("claude-*",), rpm=5, tokens_per_day=1000, usd_per_day=1.5,
                 usd_per_month=20, allow_subscription=True, admin=False, created_at=1.0)
    assert KeyRecord.from_json(rec.to_json()) == rec
    for broken in ({"name": "x"}, {"hash": rec.hash}, dict(rec.to_json(), rpm="5"),
                   dict(rec.to_json(), rpm=True), dict(rec.to_json(), models="claude")):
        with pytest.raises(ValueError) as info:
            KeyRecord.from_json(broken)
        assert rec.hash not in str(info.value)


@pytest.mark.parametrize("headers,expected", [
    ({"x-api-key": "clp_abc"}, "clp_abc"),
    ({"X-Api-Key": "  clp_abc  "}, "clp_abc"),
    ({"authorization": "Bearer clp_abc"}, "clp_abc"),
    ({"Authorization": "bearer clp_abc"}, "clp_abc"),
    ({"x-api-key": "clp_a", "authorization": "Bearer clp_b"}, "clp_a"),
    ({}, None),
    ({"authorization": "Basic dXNlcjpwYXNz"}, None),
    ({"authorization": "Bearer"}, None),
    ({"authorization": "Bearer "}, None),
    ({"authorization": "Bearer a b"}, None),
    ({"x-api-key": ""}, None),
    ({"x-api-key": "clp_a\x00b"}, None),
    ({"x-api-key": "clp_a\tb"}, None),
    ({"x-api-key": "k" * 257}, None),
])
def test_extract_from_mappings(headers, expected):
    """x-api-key first, else a Bearer token; anything malformed gives None."""
    assert extract_client_key(headers) == expected


def test_extract_from_twisted_headers_and_pairs():
    """Twisted Headers (bytes) and (name, value) pairs work; two different keys give None."""
    assert extract_client_key(Headers({b"x-api-key": [b"clp_t"]})) == "clp_t"
    assert extract_client_key(Headers({b"authorization": [b"Bearer clp_t"]})) == "clp_t"
    assert extract_client_key([(b"X-API-KEY", b"clp_p")]) == "clp_p"
    assert extract_client_key(Headers({b"x-api-key": [b"clp_1", b"clp_2"]})) is None
    assert extract_client_key([("authorization", "Bearer a"), ("authorization", "Bearer b")]) is None
    assert extract_client_key(Headers({b"x-api-key": [b"\xff\xfe"]})) == "\xff\xfe"


def test_record_is_frozen():
    """Records cannot be changed in place (the ring hands the same object to every request)."""
    rec = record()
    with pytest.raises(attr.exceptions.FrozenInstanceError):
        rec.name = "mallory"
