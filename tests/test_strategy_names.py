"""The account-selection strategy names: the config file and ``--strategy`` accept exactly the same ones.

Both go through :func:`clproxy.config.parse_strategy`; these tests hold the two entry points to it, so a
name one accepts and the other refuses (as happened when each kept its own list) fails here.
"""

import pytest
from twisted.python import usage

from clproxy import config as configuration
from clproxy.daemon.tap import Options

#: Every spelling the file is documented to accept (canonical names, aliases, case and ``_`` variants),
#: and some it must refuse.
ACCEPTED = sorted(set(configuration.STRATEGIES) | set(configuration.STRATEGY_ALIASES)) + [
    "Round_Robin", "FILL-FIRST", "Weighted", " round-robin "]
REFUSED = ["random", "", "fill first", "least-used"]


def file_strategy(name):
    """The strategy the config file gives for ``routing.strategy: name``, or ``None`` when refused."""
    try:
        loaded = configuration.parse_config(f'routing:\n  strategy: "{name}"\n', "t.yaml", {})
    except configuration.ConfigError:
        return None
    return loaded.config.routing.strategy


def option_strategy(name):
    """The strategy ``--strategy name`` gives, or ``None`` when refused."""
    options = Options()
    try:
        options.parseOptions(["--strategy", name])
    except usage.UsageError:
        return None
    return options["strategy"]


@pytest.mark.parametrize("name", ACCEPTED + REFUSED)
def test_file_and_option_agree(name):
    """A name is accepted by the file iff by --strategy, and both give the same canonical strategy."""
    assert file_strategy(name) == option_strategy(name)


@pytest.mark.parametrize("name", ACCEPTED)
def test_accepted_names_are_canonical(name):
    """Every accepted spelling becomes one of STRATEGIES, which the pool accepts."""
    assert option_strategy(name) in configuration.STRATEGIES
    assert file_strategy(name) in configuration.STRATEGIES


@pytest.mark.parametrize("name", REFUSED)
def test_refused_names_say_what_is_allowed(name):
    """Both refusals list the allowed names."""
    with pytest.raises(usage.UsageError, match='must be one of "fill-first", "round-robin", "drain-soonest"'):
        Options().parseOptions(["--strategy", name])
    with pytest.raises(configuration.ConfigError, match='must be one of "fill-first", "round-robin", "drain-soonest"'):
        configuration.parse_config(f'routing:\n  strategy: "{name}"\n', "t.yaml", {})


def test_drain_soonest_is_a_strategy():
    """drain-soonest (issue 13) is accepted by the file and --strategy, in any spelling."""
    for spelling in ("drain-soonest", "Drain_Soonest", " DRAIN-SOONEST "):
        assert file_strategy(spelling) == option_strategy(spelling) == "drain-soonest"


def test_one_definition():
    """STRATEGIES is defined once: the pool and the tap use the config schema's tuple."""
    from clproxy.config import schema
    from clproxy.routing import pool
    assert pool.STRATEGIES is schema.STRATEGIES
    for name in schema.STRATEGIES:
        assert configuration.parse_strategy(name) == name
