"""Model routing: which provider answers a requested model, and what to fall back to.

Pure: built from ``routing`` in the config. ``passthrough-models`` always go to Anthropic untouched;
``model-mappings`` send a model (exact name or a ``*`` pattern) to a provider and model; a requested
``gemini-*`` model goes to Gemini unless a mapping says otherwise; everything else is passthrough.
"""

import fnmatch
from typing import Dict, Iterable, Optional, Tuple

import attr

ANTHROPIC = "anthropic"
OPENAI = "openai"
GOOGLE = "google-ai"

#: the most models whose routes a Router remembers
_MAX_ROUTES = 1_000


@attr.s(frozen=True, auto_attribs=True, slots=True)
class Route:
    """Where one request goes. ``model`` is the model to ask the provider for."""

    provider: str
    model: str
    requested: str
    reason: str  # "passthrough-model", "mapping", "gemini-prefix", "default"

    @property
    def passthrough(self) -> bool:
        """True when Anthropic answers with the request's own bytes (no translation, no rewrite)."""
        return self.provider == ANTHROPIC and self.model == self.requested

    @property
    def translated(self) -> bool:
        """True when another provider answers through a translator."""
        return self.provider != ANTHROPIC


@attr.s(frozen=True, auto_attribs=True, slots=True)
class Target:
    """One entry of the fallback chain."""

    provider: str
    model: str


class Router:
    """Resolves requested models to routes; holds the fallback chain."""

    def __init__(self, mappings: Iterable = (), passthrough_models: Iterable[str] = (),
                 fallback_chain: Iterable = ()):
        self._exact = {}
        self._patterns = []
        for mapping in mappings:
            entry = (mapping.to_model, mapping.provider)
            if any(ch in mapping.from_model for ch in "*?["):
                self._patterns.append((mapping.from_model, entry))
            else:
                self._exact.setdefault(mapping.from_model, entry)
        self._passthrough = frozenset(passthrough_models)
        self.fallback_chain: Tuple[Target, ...] = tuple(
            Target(provider=t.provider, model=t.model) for t in fallback_chain)
        # each model's route, worked out once: every request asks, for the same few models (a Route
        # is frozen, so one instance serves them all). Bounded: the model is the client's to name.
        self._routes: Dict[str, Route] = {}

    @classmethod
    def from_config(cls, routing) -> "Router":
        """A router for ``config.routing``."""
        return cls(routing.model_mappings, routing.passthrough_models, routing.fallback_chain)

    def route(self, model: Optional[str]) -> Route:
        """The route for a requested model (``None`` for requests without one, e.g. /v1/models)."""
        if not model:
            return Route(ANTHROPIC, model or "", model or "", "default")
        route = self._routes.get(model)
        if route is None:
            route = self._resolve(model)
            if len(self._routes) < _MAX_ROUTES:
                self._routes[model] = route
        return route

    def _resolve(self, model: str) -> Route:
        if model in self._passthrough:
            return Route(ANTHROPIC, model, model, "passthrough-model")
        mapped = self._exact.get(model)
        if mapped is None:
            for pattern, entry in self._patterns:
                if fnmatch.fnmatchcase(model, pattern):
                    mapped = entry
                    break
        if mapped is not None:
            return Route(mapped[1], mapped[0], model, "mapping")
        if model.startswith("gemini-"):
            return Route(GOOGLE, model, model, "gemini-prefix")
        return Route(ANTHROPIC, model, model, "default")
