"""Request shaping: the plugin pipeline that turns a client's request into an upstream attempt.

Hygiene, authentication and the betas an account needs always run. The optional plugins run per
``cloaking.mode``: ``auto`` (OAuth accounts only), ``always`` or ``never``. Nothing here forges
another client's identity, spoofs TLS or obfuscates content (DESIGN.md, principle 7).
"""

import importlib
import uuid
from typing import List, Optional, Sequence, Tuple

import attr
from twisted.web.http_headers import Headers
from zope.interface import implementer

from clproxy.accounts.model import Account
from clproxy.interfaces import ICloakingPlugin
from clproxy.observe.recorder import TRACE_HEADERS
from clproxy.proxy.http1 import pairs_to_headers

MODES = ("auto", "always", "never")
OAUTH_BETA = b"oauth-2025-04-20"

# Hop-by-hop headers (RFC 9110 7.6.1).
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection",
    b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade",
})
# Never forwarded upstream: the client's own credentials (the account's replace them), its trace
# context (each attempt sends its own, whose parent is the proxy's span: recorder.outbound_headers),
# what the HTTP client recomputes, and headers meant for the proxy only. Accept-Encoding is dropped
# so the upstream answers in identity encoding: the proxy must read the first SSE event and error
# bodies.
NOT_FORWARDED = HOP_BY_HOP | {b"host", b"content-length", b"x-api-key", b"authorization",
                              b"accept-encoding", b"expect", b"cookie"} | frozenset(TRACE_HEADERS)
INTERNAL_PREFIXES = (b"x-clproxy-", b"x-neurolink-")
SESSION_HEADER = b"x-claude-code-session-id"

Pairs = List[Tuple[bytes, bytes]]


@attr.s(auto_attribs=True, slots=True)
class ShapingContext:
    """One upstream attempt being shaped: the account, the outgoing headers and the body."""

    account: Account
    headers: Pairs  # lower-case names, the client's order
    body: Optional[bytes]
    client_headers: Sequence[Tuple[bytes, bytes]] = ()


def merge_beta(value: bytes, beta: bytes) -> bytes:
    """Add ``beta`` to a comma-separated ``anthropic-beta`` value unless present; client order kept."""
    items = [item.strip() for item in value.split(b",") if item.strip()]
    if beta in items:
        return value
    return b",".join(items + [beta])


@implementer(ICloakingPlugin)
class HeaderHygiene:
    """Drop hop-by-hop headers, those named in ``Connection``, proxy-internal ones and the client's credentials."""

    name = "header-hygiene"

    def applies(self, context: ShapingContext) -> bool:
        return True

    def apply(self, context: ShapingContext) -> None:
        listed = None  # the names a Connection header lists (rare: most clients send keep-alive)
        kept = []
        for name, value in context.client_headers:
            lower = name.lower()
            if lower in NOT_FORWARDED or lower.startswith(INTERNAL_PREFIXES):
                if lower == b"connection":
                    tokens = {token.strip().lower() for token in value.split(b",")}
                    listed = tokens if listed is None else listed | tokens
                continue
            kept.append((lower, value))
        if listed:  # one pass over the client's headers; a second over what was kept only if needed
            kept = [pair for pair in kept if pair[0] not in listed]
        context.headers = kept


@implementer(ICloakingPlugin)
class Authentication:
    """The account's credentials: ``x-api-key`` for API keys, ``Authorization: Bearer`` for OAuth."""

    name = "authentication"

    def applies(self, context: ShapingContext) -> bool:
        return True

    def apply(self, context: ShapingContext) -> None:
        context.headers.extend(context.account.auth_headers())


@implementer(ICloakingPlugin)
class RequiredBetas:
    """OAuth requests must carry the ``oauth-2025-04-20`` beta: merged in once, the client's order kept."""

    name = "required-betas"

    def applies(self, context: ShapingContext) -> bool:
        return context.account.is_oauth

    def apply(self, context: ShapingContext) -> None:
        headers = context.headers
        for i, (name, value) in enumerate(headers):
            if name == b"anthropic-beta":
                headers[i] = (name, merge_beta(value, OAUTH_BETA))
                return
        headers.append((b"anthropic-beta", OAUTH_BETA))


@implementer(ICloakingPlugin)
class SessionLinkage:
    """A stable ``x-claude-code-session-id`` when the client sent none.

    The id is the client's own ``x-clproxy-session-id`` (or ``x-neurolink-session-id``) when given,
    else a UUID derived from the account, so requests of one account group into one session
    upstream. It claims no identity: user agent and client headers stay as the client sent them.
    """

    name = "session-linkage"

    def applies(self, context: ShapingContext) -> bool:
        return not any(name == SESSION_HEADER for name, _ in context.headers)

    def apply(self, context: ShapingContext) -> None:
        session = None
        for name, value in context.client_headers:
            if name.lower() in (b"x-clproxy-session-id", b"x-neurolink-session-id"):
                session = value
                break
        if session is None:
            session = str(uuid.uuid5(uuid.NAMESPACE_URL, "clproxy:" + context.account.key)).encode()
        context.headers.append((SESSION_HEADER, session))


class PluginLoadError(ValueError):
    """A plugin named in ``cloaking.plugins`` cannot be loaded or does not provide ICloakingPlugin."""


def load_plugin(spec: str) -> ICloakingPlugin:
    """Load ``module:attribute``: an object providing ICloakingPlugin, or a class implementing it
    that takes no arguments."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise PluginLoadError(f"cloaking plugin {spec!r} must be written module:attribute")
    try:
        target = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as e:
        raise PluginLoadError(f"cloaking plugin {spec!r} cannot be loaded: {e}") from None
    plugin = target
    if ICloakingPlugin.implementedBy(target) if isinstance(target, type) else False:
        try:
            plugin = target()
        except Exception as e:
            raise PluginLoadError(f"cloaking plugin {spec!r} could not be created: {e}") from None
    if not ICloakingPlugin.providedBy(plugin):
        raise PluginLoadError(f"cloaking plugin {spec!r} does not provide ICloakingPlugin")
    return plugin


class CloakingPipeline:
    """Runs the mandatory steps, then the optional plugins the mode allows, in order."""

    mandatory = (HeaderHygiene(), Authentication(), RequiredBetas())

    def __init__(self, mode: str = "auto", plugins: Sequence[ICloakingPlugin] = (SessionLinkage(),)):
        if mode not in MODES:
            raise ValueError(f"cloaking mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self.plugins = tuple(plugins)

    def optional_applies(self, account: Account) -> bool:
        """Whether the optional plugins run for ``account`` under this mode."""
        return self.mode == "always" or (self.mode == "auto" and account.is_oauth)

    def shape_pairs(self, client_headers: Sequence[Tuple[bytes, bytes]], account: Account,
                    body: Optional[bytes]) -> Tuple[Pairs, Optional[bytes]]:
        """The upstream headers, as ``(name, value)`` pairs in the order they will be sent, and the
        body for one attempt with ``account``. The pairs are the plugins' own list (names mostly
        lower case; a plugin may add any): what :mod:`clproxy.proxy.http1` writes as it is, with no
        ``Headers`` object built and read back per attempt."""
        context = ShapingContext(account=account, headers=[], body=body, client_headers=client_headers)
        for plugin in self.mandatory:
            if plugin.applies(context):
                plugin.apply(context)
        if self.plugins and self.optional_applies(account):
            for plugin in self.plugins:
                if plugin.applies(context):
                    plugin.apply(context)
        return context.headers, context.body

    def shape(self, client_headers: Sequence[Tuple[bytes, bytes]], account: Account,
              body: Optional[bytes]) -> Tuple[Headers, Optional[bytes]]:
        """The upstream headers, as twisted ``Headers``, and body for one attempt with ``account``."""
        pairs, body = self.shape_pairs(client_headers, account, body)
        return pairs_to_headers(pairs), body


def pipeline_from_config(cloaking_config) -> CloakingPipeline:
    """The pipeline for ``cloaking`` in the config: its mode, the built-in session linkage, and the
    plugins listed under ``cloaking.plugins`` (a mapping of name -> ``module:attribute``, or a list)."""
    plugins: List[ICloakingPlugin] = [SessionLinkage()]
    configured = getattr(cloaking_config, "plugins", None) or {}
    specs = list(configured.values()) if hasattr(configured, "values") else list(configured)
    for spec in specs:
        if isinstance(spec, str):
            plugins.append(load_plugin(spec))
    return CloakingPipeline(getattr(cloaking_config, "mode", "auto"), plugins)
