"""The daemon's console verbosity: one level gate every clproxy ``Logger`` emits through.

twistd owns the log observers and starts them after ``makeService``, so ``--debug``/``--quiet``
cannot filter there; instead clproxy's loggers publish through this gate, whose level they set.
"""

from twisted.logger import (FilteringLogObserver, LogLevel, LogLevelFilterPredicate, Logger,
                            globalLogPublisher)

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
gate = FilteringLogObserver(globalLogPublisher, [_predicate])


def set_level(level: LogLevel) -> None:
    """Emit clproxy events at ``level`` and above (debug with --debug, warn with --quiet)."""
    _predicate.setLogLevelForNamespace("clproxy", level)
    _predicate.defaultLogLevel = level


def level() -> LogLevel:
    """The level clproxy events are emitted at now."""
    return _predicate.defaultLogLevel


def logger(namespace: str) -> Logger:
    """A module's logger, gated by the daemon's verbosity."""
    return Logger(namespace=namespace, observer=gate)
