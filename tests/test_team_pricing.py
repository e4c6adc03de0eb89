"""The price table, ``pricing:`` overrides and the cost formula (clproxy.team.pricing)."""

import pytest

from clproxy.team.pricing import PRICE_TABLE, PRICE_TABLE_DATE, Price, Pricing, PricingError, best_match


def make(overrides=None):
    warnings = []
    return Pricing.from_config(overrides, warn=warnings.append), warnings


def test_table_is_dated():
    """The shipped table says when it was checked."""
    assert PRICE_TABLE_DATE.startswith("2026-")


@pytest.mark.parametrize("model,price", [
    ("claude-opus-4-5-20251101", Price(5, 25)),
    ("claude-opus-4-1-20250805", Price(15, 75)),
    ("claude-opus-4-20250514", Price(15, 75)),
    ("claude-sonnet-4-5-20250929", Price(3, 15)),
    ("claude-sonnet-4-5", Price(3, 15)),
    ("claude-haiku-4-5-20251001", Price(1, 5)),
    ("claude-3-5-haiku-20241022", Price(0.8, 4)),
    ("claude-3-haiku-20240307", Price(0.25, 1.25)),
    ("claude-3-7-sonnet-20250219", Price(3, 15)),
    ("gpt-4o", Price(2.5, 10)),
    ("gpt-4o-mini", Price(0.15, 0.6)),
    ("gpt-5", Price(1.25, 10)),
    ("gemini-2.5-flash", Price(0.3, 2.5)),
    ("gemini-2.5-pro", Price(1.25, 10)),
])
def test_table_prices_current_models(model, price):
    """Each family's dated and undated ids find their price."""
    pricing, _ = make()
    assert pricing.price(model) == price


def test_longest_pattern_wins():
    """``claude-opus-4-5*`` beats a broader pattern; an exact name beats every pattern."""
    table = {"claude-*": 1, "claude-opus-*": 2, "claude-opus-4-5": 3}
    assert best_match("claude-opus-4-1", table) == "claude-opus-*"
    assert best_match("claude-opus-4-5", table) == "claude-opus-4-5"
    assert best_match("claude-sonnet-4", table) == "claude-*"
    assert best_match("gpt-4o", table) is None


def test_formula_every_token_kind():
    """input × in + output × out + 5m × 1.25 × in + 1h × 2 × in + read × 0.1 × in, per million."""
    pricing, _ = make({"m": {"input": 10, "output": 100}})
    usage = {"input_tokens": 1_000_000, "output_tokens": 0}
    assert pricing.cost_usd("m", usage) == pytest.approx(10.0)
    assert pricing.cost_usd("m", {"output_tokens": 1_000_000}) == pytest.approx(100.0)
    five = {"cache_creation_input_tokens": 1_000_000,
            "cache_creation": {"ephemeral_5m_input_tokens": 1_000_000, "ephemeral_1h_input_tokens": 0}}
    assert pricing.cost_usd("m", five) == pytest.approx(12.5)
    hour = {"cache_creation_input_tokens": 1_000_000,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 1_000_000}}
    assert pricing.cost_usd("m", hour) == pytest.approx(20.0)
    assert pricing.cost_usd("m", {"cache_read_input_tokens": 1_000_000}) == pytest.approx(1.0)
    everything = {"input_tokens": 3, "output_tokens": 5, "cache_read_input_tokens": 7,
                  "cache_creation_input_tokens": 11 + 13,
                  "cache_creation": {"ephemeral_5m_input_tokens": 11, "ephemeral_1h_input_tokens": 13}}
    expected = (3 * 10 + 5 * 100 + 11 * 1.25 * 10 + 13 * 2 * 10 + 7 * 0.1 * 10) / 1e6
    assert pricing.cost_usd("m", everything) == pytest.approx(expected)


def test_cache_creation_without_split_counts_as_5m():
    """No ``cache_creation`` object: all cache-creation tokens are 5-minute writes."""
    pricing, _ = make({"m": {"input": 4, "output": 0}})
    assert pricing.cost_usd("m", {"cache_creation_input_tokens": 1_000_000}) == pytest.approx(5.0)


def test_real_model_cost():
    """Sonnet 4.5 at $3/$15: the formula on a realistic usage object."""
    pricing, _ = make()
    usage = {"input_tokens": 100, "output_tokens": 200, "cache_read_input_tokens": 10_000,
             "cache_creation_input_tokens": 2000,
             "cache_creation": {"ephemeral_5m_input_tokens": 500, "ephemeral_1h_input_tokens": 1500}}
    expected = (100 * 3 + 200 * 15 + 500 * 3.75 + 1500 * 6 + 10_000 * 0.3) / 1e6
    assert pricing.cost_usd("claude-sonnet-4-5-20250929", usage) == pytest.approx(expected)


def test_overrides_beat_table_and_patterns():
    """A ``pricing:`` entry overrides the table; among overrides the most specific wins."""
    pricing, _ = make({"claude-sonnet-4*": {"input": 1, "output": 2},
                       "claude-sonnet-4-5*": {"input": 7, "output": 8},
                       "my-local-model": {"input": 0, "output": 0}})
    assert pricing.price("claude-sonnet-4-20250514") == Price(1, 2)
    assert pricing.price("claude-sonnet-4-5-20250929") == Price(7, 8)
    assert pricing.price("claude-opus-4-5") == Price(5, 25)  # not overridden: the table
    assert pricing.cost_usd("my-local-model", {"input_tokens": 10}) == 0.0


def test_unknown_model_none_and_one_warning():
    """No price: None, never a made-up price, and one warning per model, not per request."""
    pricing, warnings = make()
    for _ in range(3):
        assert pricing.cost_usd("claude-opus-9-9", {"input_tokens": 10}) is None
    assert pricing.cost_usd("mystery", {"input_tokens": 10}) is None
    assert pricing.cost_usd(None, {"input_tokens": 10}) is None
    assert len(warnings) == 3
    assert "claude-opus-9-9" in warnings[0] and "pricing" in warnings[0]


@pytest.mark.parametrize("bad", [{"input": 1}, {"input": "x", "output": 1}, {"input": -1, "output": 1},
                                 5, {"input": 1, "output": 1, "cache": 2}])
def test_bad_override_rejected(bad):
    """A malformed ``pricing:`` entry is an error naming it."""
    with pytest.raises(PricingError, match="pricing.m"):
        Pricing.from_config({"m": bad})


def test_table_patterns_are_valid():
    """Every shipped entry has non-negative prices."""
    for name, price in PRICE_TABLE.items():
        assert price.input >= 0 and price.output >= 0, name


def test_pricing_config_key():
    """``pricing:`` in the config file: model names kept as written, numbers checked, and
    Pricing.from_config takes it as is."""
    from clproxy.config.validate import validate_document
    warnings = []
    config = validate_document({"pricing": {"claude-sonnet-4*": {"input": 1, "output": 2.5},
                                            "My_Model": {"input": 0, "output": 0}}}, {}, warnings)
    assert warnings == []
    assert dict(config.pricing["claude-sonnet-4*"]) == {"input": 1.0, "output": 2.5}
    assert "My_Model" in config.pricing
    pricing = Pricing.from_config(config.pricing)
    assert pricing.price("claude-sonnet-4-5") == Price(1, 2.5)
    assert validate_document({}, {}, []).pricing == {}


@pytest.mark.parametrize("bad,where", [
    ({"pricing": ["x"]}, "pricing"),
    ({"pricing": {"m": 3}}, "pricing.m"),
    ({"pricing": {"m": {"input": 1}}}, "pricing.m.output"),
    ({"pricing": {"m": {"input": -1, "output": 1}}}, "pricing.m.input"),
    ({"pricing": {"m": {"input": "cheap", "output": 1}}}, "pricing.m.input"),
])
def test_pricing_config_errors(bad, where):
    """A malformed ``pricing:`` entry is a ConfigError naming where."""
    from clproxy.config.schema import ConfigError
    from clproxy.config.validate import validate_document
    with pytest.raises(ConfigError) as caught:
        validate_document(bad, {}, [])
    assert caught.value.path == where


def test_pricing_config_unknown_inner_key_warns():
    """An unknown key inside a price is a warning (a typo like ``ouput`` is also an error: missing)."""
    from clproxy.config.validate import validate_document
    warnings = []
    validate_document({"pricing": {"m": {"input": 1, "output": 1, "cached": 2}}}, {}, warnings)
    assert any("cached" in warning for warning in warnings)
