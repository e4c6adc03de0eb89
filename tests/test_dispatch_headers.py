"""Header handling on both sides of the proxy, and the request-shaping pipeline."""

from twisted.web.http_headers import Headers

from clproxy.accounts.model import Account
from clproxy.proxy.shaping import CloakingPipeline, merge_beta
from clproxy.proxy.dispatch import downstream_headers

KEY = Account(key="config:a", name="a", kind="api-key", secret="sk-test-key")
OAUTH = Account(key="anthropic:w", name="w", kind="oauth", secret="oat-token")


def upstream_headers(client, account, mode="never"):
    """The shaped headers with only the mandatory steps (mode never)."""
    return CloakingPipeline(mode).shape(client, account, b"")[0]


def raw(headers: Headers, name: bytes):
    return headers.getRawHeaders(name)


def test_credentials_replaced_and_end_to_end_headers_kept_in_order():
    """The client's credentials go, the account's come in, the rest stays as sent."""
    client = [(b"Host", b"127.0.0.1:55669"), (b"x-api-key", b"client"), (b"Authorization", b"Bearer c"),
              (b"anthropic-beta", b"b1,b2"), (b"anthropic-version", b"2023-06-01"),
              (b"x-stainless-os", b"Linux"), (b"user-agent", b"claude-cli/2.1.0"),
              (b"Content-Length", b"10"), (b"Accept-Encoding", b"gzip, br")]
    headers = upstream_headers(client, KEY)
    assert raw(headers, b"x-api-key") == [b"sk-test-key"]
    assert raw(headers, b"authorization") is None
    assert raw(headers, b"anthropic-beta") == [b"b1,b2"]
    assert raw(headers, b"host") is None and raw(headers, b"content-length") is None
    assert raw(headers, b"accept-encoding") is None
    names = [n.lower() for n, _ in headers.getAllRawHeaders()]
    assert names.index(b"anthropic-beta") < names.index(b"anthropic-version") < names.index(b"x-stainless-os")


def test_hop_by_hop_and_connection_listed_headers_dropped():
    """Hop-by-hop headers and those named in Connection are not forwarded."""
    client = [(b"Connection", b"keep-alive, X-Private"), (b"X-Private", b"1"), (b"Keep-Alive", b"5"),
              (b"TE", b"trailers"), (b"Transfer-Encoding", b"chunked"), (b"Proxy-Authorization", b"x"),
              (b"x-app", b"cli")]
    headers = upstream_headers(client, KEY)
    assert [n.lower() for n, _ in headers.getAllRawHeaders()] == [b"x-app", b"x-api-key"]


def test_every_connection_header_counts_wherever_it_stands():
    """Names listed by two Connection headers, one after the header it names, are all dropped."""
    client = [(b"X-Before", b"1"), (b"x-app", b"cli"), (b"Connection", b"x-before"), (b"X-After", b"2"),
              (b"connection", b" X-AFTER ,close")]
    pairs, _ = CloakingPipeline("never").shape_pairs(client, KEY, b"")
    assert pairs == [(b"x-app", b"cli"), (b"x-api-key", b"sk-test-key")]


def test_the_clients_trace_context_is_left_to_the_attempt():
    """traceparent and tracestate are dropped by shaping: each attempt sends its own."""
    pairs, _ = CloakingPipeline("never").shape_pairs(
        [(b"Traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
         (b"tracestate", b"k=v"), (b"x-app", b"cli")], KEY, b"")
    assert pairs == [(b"x-app", b"cli"), (b"x-api-key", b"sk-test-key")]


def test_proxy_internal_headers_not_forwarded():
    """x-clproxy-* and x-neurolink-* headers are meant for the proxy only."""
    headers = upstream_headers([(b"x-clproxy-session-id", b"s"), (b"x-neurolink-user-id", b"u")], KEY)
    assert list(headers.getAllRawHeaders()) == [(b"X-Api-Key", [b"sk-test-key"])]


def test_oauth_gets_bearer_and_beta_merged_once():
    """OAuth accounts send a Bearer token and the oauth beta, merged into the client's list once."""
    headers = upstream_headers([(b"anthropic-beta", b"a-1, b-2")], OAUTH)
    assert raw(headers, b"authorization") == [b"Bearer oat-token"]
    assert raw(headers, b"x-api-key") is None
    assert raw(headers, b"anthropic-beta") == [b"a-1,b-2,oauth-2025-04-20"]
    headers = upstream_headers([(b"anthropic-beta", b"oauth-2025-04-20,x")], OAUTH)
    assert raw(headers, b"anthropic-beta") == [b"oauth-2025-04-20,x"]
    headers = upstream_headers([], OAUTH)
    assert raw(headers, b"anthropic-beta") == [b"oauth-2025-04-20"]


def test_merge_beta_keeps_client_order():
    """merge_beta appends only when absent and keeps the client's order."""
    assert merge_beta(b"z,a", b"m") == b"z,a,m"
    assert merge_beta(b"z,m,a", b"m") == b"z,m,a"


def test_downstream_drops_hop_by_hop_and_keeps_rate_limit_headers():
    """Responses keep end-to-end headers (request-id, retry-after, rate limits) and lose hop-by-hop ones."""
    upstream = Headers({b"content-type": [b"application/json"], b"request-id": [b"req_1"],
                        b"retry-after": [b"5"], b"anthropic-ratelimit-tokens-remaining": [b"10"],
                        b"transfer-encoding": [b"chunked"], b"connection": [b"keep-alive"],
                        b"content-length": [b"12"]})
    names = {n.lower() for n, _ in downstream_headers(upstream)}
    assert names == {b"content-type", b"request-id", b"retry-after", b"anthropic-ratelimit-tokens-remaining"}


def test_request_ids_are_req_clp_and_96_random_bits_each_new():
    """Every ProxyRequest gets its own id: ``req_clp_`` then 24 lowercase hex digits, as the JSONL
    records and the dashboard have always shown it (1,000 ids, no repeat)."""
    import re

    from clproxy.proxy.dispatch import ProxyRequest, new_request_id

    ids = {ProxyRequest(method=b"POST", path=b"/v1/messages", query=b"", headers=[], body=b"{}").request_id
           for _ in range(500)} | {new_request_id() for _ in range(500)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"req_clp_[0-9a-f]{24}", request_id) for request_id in ids)


def test_a_forked_child_never_repeats_its_parents_request_ids():
    """Ids are made in batches; a child forked with a batch in hand makes its own, none of the parent's."""
    import os

    from clproxy.proxy.dispatch import new_request_id

    new_request_id()  # a batch in hand, ids left in it
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: send its next ids, leave at once
        try:
            os.write(write, " ".join(new_request_id() for _ in range(10)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = set(pipe.read().split())
    os.waitpid(pid, 0)
    parent = {new_request_id() for _ in range(300)}  # past the end of the batch held at the fork
    assert len(child) == 10 and not child & parent
