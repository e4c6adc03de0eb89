"""The ``clproxy`` command line."""
