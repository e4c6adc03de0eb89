"""clproxy: a local Claude Messages API proxy that pools accounts and fails over."""

__version__ = "0.1.0"
