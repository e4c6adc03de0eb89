"""The route table is built in one place (clproxy.http.routes) and the daemon serves exactly it."""

from twisted.web import resource

from clproxy.http.openai import ChatCompletionsResource, ModelsListing
from clproxy.http.routes import build_routes
from clproxy.http.site import HealthResource, MessagesResource, StatusResource


def paths(node, prefix=b""):
    """Every path the tree names, with the resource class at it."""
    found = {}
    for name, child in node.children.items():
        path = prefix + b"/" + name
        found[path] = type(child)
        found.update(paths(child, path))
    return found


def test_the_whole_table_comes_from_build_routes():
    """build_routes alone gives the whole table: /v1/messages, /v1/models, /v1/chat/completions,
    /health, /status, and /metrics when a metrics resource is given."""
    metrics = resource.Resource()
    metrics.isLeaf = True
    table = paths(build_routes(object(), object(), metrics=metrics))
    assert table[b"/v1/messages"] is MessagesResource
    assert table[b"/v1/models"] is ModelsListing
    assert table[b"/v1/chat/completions"] is ChatCompletionsResource
    assert table[b"/health"] is HealthResource and table[b"/status"] is StatusResource
    assert b"/metrics" in table


def test_no_metrics_route_without_observability():
    """Without a metrics resource the table has no /metrics route."""
    assert b"/metrics" not in paths(build_routes(object(), object()))


def test_the_assembled_daemon_serves_the_same_table(tmp_path):
    """The assembled daemon serves exactly the table build_routes gives, its client-key guards and the
    dashboard's /events and /login included, and a real /metrics resource."""
    from test_assemble import built

    proxy = built(tmp_path)
    served = paths(proxy.root)
    # the client-key guards (team mode) are part of the table the daemon serves
    assert served == paths(build_routes(object(), object(), metrics=proxy.observability.metrics_resource(),
                                        auth=proxy.auth, dashboard=proxy.root.children[b"dashboard"]))
    assert b"/dashboard/events" in served and b"/dashboard/login" in served
    assert served[b"/metrics"] is not resource.Resource


def test_status_answer_after_the_client_left_writes_nothing():
    """/status builds its document asynchronously; a client that hung up meanwhile gets nothing
    written (Twisted would raise on a write to a finished request), and no error is logged."""
    from twisted.internet import defer
    from twisted.python.failure import Failure
    from twisted.web.test.requesthelper import DummyRequest

    from clproxy.http.site import StatusResource

    class SlowStatus:
        def __init__(self):
            self.pending = defer.Deferred()

        async def status(self):
            return await self.pending

    status = SlowStatus()
    request = DummyRequest([b"status"])
    request.method = b"GET"
    StatusResource(status).render(request)
    request.processingFailed(Failure(ConnectionError("client went away")))  # fires notifyFinish's errback
    written = list(request.written)
    status.pending.callback({"ok": True})
    assert request.written == written  # nothing more after the client left
