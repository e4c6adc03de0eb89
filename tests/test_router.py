"""Model routing and the fallback chain."""

import pytest

from clproxy.config import parse_config
from clproxy.routing.router import ANTHROPIC, GOOGLE, OPENAI, Router, Target

CONFIG = """
routing:
  model-mappings:
    - from: claude-sonnet-4-20250514
      to: gemini-2.5-pro
      provider: google-ai
    - from: "claude-haiku-*"
      to: gpt-4o-mini
      provider: openai
    - from: gemini-2.5-flash
      to: claude-sonnet-4-5
      provider: anthropic
  passthrough-models:
    - claude-opus-4-20250514
    - claude-haiku-keep
  fallback-chain:
    - provider: google-ai
      model: gemini-2.5-flash
    - provider: openai
      model: gpt-4o
"""


@pytest.fixture
def router():
    return Router.from_config(parse_config(CONFIG, "test", {}).config.routing)


@pytest.mark.parametrize("model,provider,target,reason", [
    ("claude-sonnet-4-20250514", GOOGLE, "gemini-2.5-pro", "mapping"),
    ("claude-haiku-4-5", OPENAI, "gpt-4o-mini", "mapping"),
    ("claude-haiku-keep", ANTHROPIC, "claude-haiku-keep", "passthrough-model"),
    ("claude-opus-4-20250514", ANTHROPIC, "claude-opus-4-20250514", "passthrough-model"),
    ("gemini-2.0-pro", GOOGLE, "gemini-2.0-pro", "gemini-prefix"),
    ("gemini-2.5-flash", ANTHROPIC, "claude-sonnet-4-5", "mapping"),
    ("claude-sonnet-4-5", ANTHROPIC, "claude-sonnet-4-5", "default"),
])
def test_routes(router, model, provider, target, reason):
    """Passthrough models win, then exact and pattern mappings, then the gemini- prefix, then Anthropic."""
    route = router.route(model)
    assert (route.provider, route.model, route.reason, route.requested) == (provider, target, reason, model)


def test_passthrough_flag(router):
    """Only Anthropic routes that keep the requested model are byte-for-byte passthrough."""
    assert router.route("claude-sonnet-4-5").passthrough
    assert not router.route("gemini-2.5-flash").passthrough  # remapped within Anthropic
    assert router.route("gemini-2.0-pro").translated


def test_fallback_chain_in_order(router):
    """The fallback chain keeps the configured order."""
    assert router.fallback_chain == (Target(GOOGLE, "gemini-2.5-flash"), Target(OPENAI, "gpt-4o"))


def test_no_model_is_default():
    """A request without a model (e.g. /v1/models) goes to Anthropic."""
    assert Router().route(None).provider == ANTHROPIC


def test_a_models_route_is_worked_out_once_and_the_memory_is_bounded(monkeypatch):
    """The same model gets the same Route without matching the patterns again; a pattern still
    decides a new model's route; at most _MAX_ROUTES models are remembered."""
    from clproxy.routing import router as router_module
    r = Router.from_config(parse_config(CONFIG, "test", {}).config.routing)
    matched = []
    real = router_module.fnmatch.fnmatchcase
    monkeypatch.setattr(router_module.fnmatch, "fnmatchcase", lambda *a: matched.append(a) or real(*a))
    first = r.route("claude-haiku-3")
    assert (first.provider, first.model, first.reason) == (OPENAI, "gpt-4o-mini", "mapping")
    count = len(matched)
    assert r.route("claude-haiku-3") is first and len(matched) == count  # not matched again
    monkeypatch.setattr(router_module, "_MAX_ROUTES", 3)
    for n in range(10):
        assert r.route(f"claude-x-{n}").reason == "default"
    assert len(r._routes) == 3
