"""clproxy: a local Claude Messages API proxy that pools accounts and fails over."""

#: the release; setup.py's ``version`` must say the same (tests/test_cli_start.py checks it)
__version__ = "0.1.0"


def version() -> str:
    """clproxy's version: the installed distribution's, else :data:`__version__` (run from a checkout)."""
    try:
        from importlib.metadata import PackageNotFoundError, version as distribution_version
    except ImportError:  # pragma: no cover - Python < 3.8
        return __version__
    try:
        return distribution_version("clproxy")
    except PackageNotFoundError:
        return __version__


def version_line() -> str:
    """The one line ``clproxy --version`` and ``twistd claudeproxy --version`` print."""
    return f"clproxy {version()}"
