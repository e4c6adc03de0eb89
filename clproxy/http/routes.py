"""The daemon's whole route table, in one place.

::

    /v1/messages                POST  Anthropic Messages, through the dispatcher
    /v1/messages/count_tokens   POST  passthrough
    /v1/models                  GET   Anthropic's list (with ``anthropic-version``) or OpenAI's
    /v1/chat/completions        POST  the OpenAI-compatible front door
    /health /status             GET   liveness and the pool's state
    /session/{session_id}       GET   the account serving one Claude Code session (``clproxy statusline``)
    /metrics                    GET   Prometheus text (when observability is wired)
    /dashboard, /dashboard/*    GET   the live dashboard (clproxy.dashboard.resources; its own auth)

Anything else gets an Anthropic-shaped 404 (an OpenAI-shaped one under ``/v1/chat``).

With ``auth`` (a :class:`clproxy.http.auth.ClientAuth`), ``/v1`` is behind the client-key check and
``/status`` and ``/metrics`` behind the admin check, ``/session`` behind the client-key check (a
team member sees which account serves their own session); ``/health`` stays open.
"""

from typing import Optional

from twisted.web import resource

from clproxy.http.auth import ClientAuth, Guarded
from clproxy.http.openai import DEFAULT_MAX_BODY_BYTES, ModelsListing, chat_node
from clproxy.http.session import SessionNode
from clproxy.http.site import HealthResource, MessagesResource, ModelsResource, Node
from clproxy.http.site import StatusReport, StatusResource


def build_routes(dispatcher, status: StatusReport, *, metrics=None, router=None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, auth: Optional[ClientAuth] = None,
                 dashboard: Optional[resource.Resource] = None) -> resource.Resource:
    """The root resource. ``router`` None: the dispatcher's router in force (it changes on reload);
    ``metrics``: the ``GET /metrics`` resource, or None when observability is not wired; ``auth``
    None: no client keys at all (tests of the routes alone); ``dashboard``: the ``/dashboard``
    resource (it checks its viewers itself: the page must load to offer its login form)."""
    root = Node()
    v1 = Node()
    root.putChild(b"v1", Guarded(v1, auth.client) if auth is not None else v1)
    v1.putChild(b"messages", MessagesResource(dispatcher))
    v1.putChild(b"models", ModelsListing(dispatcher, router, ModelsResource(dispatcher)))
    v1.putChild(b"chat", chat_node(dispatcher, max_body_bytes))
    root.putChild(b"health", HealthResource(status))
    status_resource = StatusResource(status)
    root.putChild(b"status", Guarded(status_resource, auth.admin) if auth is not None else status_resource)
    root.putChild(b"session", Guarded(SessionNode(status), auth.client) if auth is not None else SessionNode(status))
    if metrics is not None:
        root.putChild(b"metrics", Guarded(metrics, auth.admin) if auth is not None else metrics)
    if dashboard is not None:
        root.putChild(b"dashboard", dashboard)
    return root
