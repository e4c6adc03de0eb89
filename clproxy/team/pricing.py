"""What a request cost in USD: a shipped, dated price table, ``pricing:`` overrides, the cost formula.

Cost = input × in + output × out + 5-minute cache writes × 1.25 × in + 1-hour cache writes × 2 × in
+ cache reads × 0.1 × in, all per million tokens. A model with no price costs ``None`` (counted
as unpriced, with one warning per model), never a made-up price.

Sources of the shipped table (read 2026-12): Anthropic's pricing page
(https://platform.claude.com/docs/en/about-claude/pricing and the per-model "what's new" pages),
OpenAI's pricing page (https://developers.openai.com/api/docs/pricing, as summarised on
2026-11-06) and Google's (https://ai.google.dev/gemini-api/docs/pricing). Where a provider's real
cache prices differ from the multipliers above (OpenAI and Gemini cached input, the Claude 5.5
cache-read discounts, Haiku 5.5's long-prompt tier, Gemini's >200k tier), the formula above is
what clproxy reports: an operator who needs the exact figure sets ``pricing:``.
"""

import collections.abc
import fnmatch
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import attr
from twisted.logger import Logger

log = Logger(namespace="clproxy.team.pricing")

#: The date the shipped table was last checked against the providers' pages.
PRICE_TABLE_DATE = "2026-12-01"

#: Multipliers of the input price for each kind of prompt-cache token.
CACHE_WRITE_5M = 1.25
CACHE_WRITE_1H = 2.0
CACHE_READ = 0.1

PER_TOKENS = 1_000_000.0


@attr.s(auto_attribs=True, frozen=True)
class Price:
    """USD per million input and output tokens."""

    input: float
    output: float


def _p(inp: float, out: float) -> Price:
    return Price(float(inp), float(out))


#: Model name or fnmatch pattern -> price. A dated id (``claude-sonnet-4-5-20250929``) matches its
#: family's pattern; the most specific entry wins (exact name, then the longest pattern), so
#: ``claude-opus-4-5*`` beats a broader pattern. Patterns are narrow on purpose: a future model
#: must read as unpriced, not inherit a neighbour's price.
PRICE_TABLE: Dict[str, Price] = {
    # Anthropic, Claude 5 generation
    "claude-fable-5*": _p(10, 50),
    "claude-mythos-5*": _p(10, 50),
    "claude-opus-5": _p(5, 25),
    "claude-opus-5-20*": _p(5, 25),
    "claude-opus-5-5*": _p(4, 20),
    "claude-sonnet-5": _p(2, 10),
    "claude-sonnet-5-20*": _p(2, 10),
    "claude-sonnet-5-5*": _p(2, 10),
    "claude-haiku-5-5*": _p(0.10, 0.50),  # the up-to-100k-token prompt tier
    # Anthropic, Claude 4 generation
    "claude-opus-4-8*": _p(5, 25),
    "claude-opus-4-7*": _p(5, 25),
    "claude-opus-4-6*": _p(5, 25),
    "claude-opus-4-5*": _p(5, 25),
    "claude-opus-4-1*": _p(15, 75),
    "claude-opus-4-0*": _p(15, 75),
    "claude-opus-4": _p(15, 75),
    "claude-opus-4-20250514": _p(15, 75),
    "claude-sonnet-4*": _p(3, 15),  # Sonnet 4, 4.5, 4.6: one price
    "claude-haiku-4-5*": _p(1, 5),
    # Anthropic, Claude 3 generation
    "claude-3-7-sonnet*": _p(3, 15),
    "claude-3-5-sonnet*": _p(3, 15),
    "claude-3-5-haiku*": _p(0.80, 4),
    "claude-3-opus*": _p(15, 75),
    "claude-3-haiku*": _p(0.25, 1.25),
    # OpenAI (fallback provider)
    "gpt-5": _p(1.25, 10),
    "gpt-5-20*": _p(1.25, 10),
    "gpt-5-mini*": _p(0.25, 2),
    "gpt-5-nano*": _p(0.05, 0.40),
    "gpt-5.1*": _p(1.25, 10),
    "gpt-5.4": _p(2.50, 15),
    "gpt-5.4-mini*": _p(0.75, 4.50),
    "gpt-4.1": _p(2, 8),
    "gpt-4.1-20*": _p(2, 8),
    "gpt-4.1-mini*": _p(0.40, 1.60),
    "gpt-4.1-nano*": _p(0.10, 0.40),
    "gpt-4o": _p(2.50, 10),
    "gpt-4o-20*": _p(2.50, 10),
    "gpt-4o-mini*": _p(0.15, 0.60),
    "gpt-4-turbo*": _p(10, 30),
    "gpt-3.5-turbo*": _p(0.50, 1.50),
    # Google (fallback provider); the up-to-200k-token prompt tier
    "gemini-2.5-pro*": _p(1.25, 10),
    "gemini-2.5-flash": _p(0.30, 2.50),
    "gemini-2.5-flash-0*": _p(0.30, 2.50),
    "gemini-2.5-flash-preview*": _p(0.30, 2.50),
    "gemini-2.5-flash-lite*": _p(0.10, 0.40),
    "gemini-2.0-flash": _p(0.10, 0.40),
    "gemini-2.0-flash-0*": _p(0.10, 0.40),
    "gemini-2.0-flash-lite*": _p(0.075, 0.30),
}

_WILDCARDS = frozenset("*?[")


def _is_pattern(name: str) -> bool:
    return any(char in _WILDCARDS for char in name)


def best_match(model: str, table: Mapping[str, Any]) -> Optional[str]:
    """The entry of ``table`` that prices ``model``: its exact name, else the longest fnmatch
    pattern that matches (case-sensitive, as model ids are); None when nothing matches."""
    if model in table and not _is_pattern(model):
        return model
    best: Optional[str] = None
    for name in table:
        if _is_pattern(name) and fnmatch.fnmatchcase(model, name):
            if best is None or len(name) > len(best) or (len(name) == len(best) and name < best):
                best = name  # ties broken by name, so the answer never depends on dict order
    return best


def _int(usage: Mapping[str, Any], key: str) -> int:
    value = usage.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        return 0
    return int(value)


def cache_split(usage: Mapping[str, Any]) -> Tuple[int, int]:
    """``(5-minute, 1-hour)`` cache-write tokens of an Anthropic ``usage`` object: from
    ``usage.cache_creation`` when present, else all of ``cache_creation_input_tokens`` counts as
    5-minute (the default TTL, and what the API reported before the split existed)."""
    detail = usage.get("cache_creation")
    # collections.abc's Mapping, not typing's: the same answer at a third of the cost (typing's
    # alias forwards each check to it), and this runs twice on every answered request
    if isinstance(detail, collections.abc.Mapping) and ("ephemeral_5m_input_tokens" in detail
                                                        or "ephemeral_1h_input_tokens" in detail):
        return _int(detail, "ephemeral_5m_input_tokens"), _int(detail, "ephemeral_1h_input_tokens")
    return _int(usage, "cache_creation_input_tokens"), 0


def formula(price: Price, input_tokens: int, output_tokens: int, cache_5m: int, cache_1h: int,
            cache_read: int) -> float:
    """The cost formula, in USD."""
    return (input_tokens * price.input + output_tokens * price.output
            + cache_5m * CACHE_WRITE_5M * price.input + cache_1h * CACHE_WRITE_1H * price.input
            + cache_read * CACHE_READ * price.input) / PER_TOKENS


class PricingError(ValueError):
    """A ``pricing:`` entry that is not ``{input: number >= 0, output: number >= 0}``."""


def parse_price(value: Any, where: str) -> Price:
    """A ``{input: X, output: Y}`` mapping made a :class:`Price`; :class:`PricingError` otherwise."""
    if not isinstance(value, Mapping):
        raise PricingError(f"{where}: expected {{input: USD_PER_MTOK, output: USD_PER_MTOK}}")
    numbers = []
    for key in ("input", "output"):
        number = value.get(key)
        if isinstance(number, bool) or not isinstance(number, (int, float)) or number < 0:
            raise PricingError(f"{where}.{key}: expected a number of USD per million tokens (>= 0)")
        numbers.append(float(number))
    extra = sorted(str(key) for key in value if key not in ("input", "output"))
    if extra:
        raise PricingError(f"{where}: unknown key(s) {', '.join(extra)} (only input and output)")
    return Price(numbers[0], numbers[1])


class Pricing:
    """Prices models: the ``pricing:`` overrides first (most specific match among them), then the
    shipped table (most specific match). Call :meth:`cost_usd` once per finished request.

    ``warn(message)`` is called once per unpriced model (default: a warning on this module's
    Logger); the set of models warned about is bounded by ``max_warned``.
    """

    def __init__(self, overrides: Optional[Mapping[str, Price]] = None,
                 table: Mapping[str, Price] = PRICE_TABLE,
                 warn: Optional[Callable[[str], None]] = None, max_warned: int = 1000):
        self.overrides: Dict[str, Price] = dict(overrides or {})
        self.table: Dict[str, Price] = dict(table)
        self._warn = warn if warn is not None else (lambda message: log.warn("{message}", message=message))
        self._warned: set = set()
        self._max_warned = max_warned
        self._cache: Dict[str, Optional[Price]] = {}

    @classmethod
    def from_config(cls, overrides: Optional[Mapping[str, Any]],
                    warn: Optional[Callable[[str], None]] = None) -> "Pricing":
        """From the ``pricing:`` config mapping ``{MODEL_OR_PATTERN: {input: X, output: Y}}``
        (values may already be :class:`Price`); :class:`PricingError` names a bad entry."""
        parsed: Dict[str, Price] = {}
        for name, value in (overrides or {}).items():
            parsed[str(name)] = value if isinstance(value, Price) else parse_price(value, f"pricing.{name}")
        return cls(parsed, warn=warn)

    def price(self, model: Optional[str]) -> Optional[Price]:
        """The price of ``model``, or None when neither the overrides nor the table has one."""
        if not model:
            return None
        if model in self._cache:
            return self._cache[model]
        found: Optional[Price] = None
        for table in (self.overrides, self.table):
            name = best_match(model, table)
            if name is not None:
                found = table[name]
                break
        if len(self._cache) < 4096:  # model names come from clients: keep the cache bounded
            self._cache[model] = found
        return found

    def cost_usd(self, model: Optional[str], usage: Optional[Mapping[str, Any]]) -> Optional[float]:
        """The USD cost of one request's Anthropic ``usage`` object on ``model``; None (and one
        warning per model) when the model has no price."""
        price = self.price(model)
        if price is None:
            self._warn_once(model)
            return None
        usage = usage or {}
        cache_5m, cache_1h = cache_split(usage)
        return formula(price, _int(usage, "input_tokens"), _int(usage, "output_tokens"), cache_5m, cache_1h,
                       _int(usage, "cache_read_input_tokens"))

    def _warn_once(self, model: Optional[str]) -> None:
        key = model or ""
        if key in self._warned or len(self._warned) >= self._max_warned:
            return
        self._warned.add(key)
        shown = (model or "(no model)")[:100]
        self._warn(f"no price for model {shown!r}: its requests are counted with cost_usd null "
                   f"(add it under `pricing:` in the config; price table of {PRICE_TABLE_DATE})")
