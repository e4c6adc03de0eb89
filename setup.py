"""Packaging for clproxy: the daemon, its twistd plugin and the ``clproxy`` command."""

from setuptools import find_packages, setup

setup(
    name="clproxy",
    version="0.1.0",
    description="A local Claude Messages API proxy that pools accounts, refreshes tokens and fails over",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    license="MIT",
    python_requires=">=3.11",
    # twisted/plugins/ has no __init__.py (it is a portion of Twisted's own package), so it is
    # named by hand. package_dir={"": "."} makes the layout "simple" for setuptools: an editable
    # install (pip install -e, PEP 660) then adds this directory to sys.path through a .pth file
    # instead of an import hook that maps only clproxy, and Twisted's plugin discovery, which
    # scans every sys.path entry for a twisted/plugins/ directory, finds claudeproxy_plugin.py.
    package_dir={"": "."},
    packages=find_packages(include=["clproxy", "clproxy.*"]) + ["twisted.plugins"],
    # the dashboard's page (plain HTML, CSS and JavaScript, served from the package)
    package_data={"twisted": ["plugins/claudeproxy_plugin.py"], "clproxy.dashboard": ["static/*"]},
    include_package_data=True,
    install_requires=[
        # The lower bounds are Debian 12 (bookworm)'s versions, which tests/test_ops_deb_chroot.py
        # runs the daemon on; debian/control names the same packages with the same bounds.
        "twisted[tls]>=22.4",
        "treq>=22.2",
        "pyOpenSSL>=23.0",
        "service-identity>=18.1",
        "pyyaml>=6.0",
        "zope.interface>=5.5",
        "attrs>=22.2",
        # /metrics in the Prometheus text format, with its own registry
        "prometheus-client>=0.16",
        # txredisapi (the Redis backend's client) is not required: clproxy._vendor ships a copy,
        # used when it is not installed (Debian does not package it).
    ],
    extras_require={
        # orjson parses the 20+ KB request bodies faster than json (benchmarks/json_cost.py), and
        # msgspec checks a body whole while building only the fields the proxy reads (model,
        # stream): 9 us against orjson's 32 on the benchmark's body (19 with the UTF-8 check a
        # body with non-ASCII text needs first), and no objects for the collector. Debian packages
        # neither, so both are optional: clproxy.jsoncodec falls back to json without them.
        "fast": ["orjson>=3.9", "msgspec>=0.18"],
        # OTLP/HTTP export of spans and log records (OTEL_EXPORTER_OTLP_ENDPOINT)
        "otlp": [
            "opentelemetry-sdk>=1.30",
            "opentelemetry-exporter-otlp-proto-http>=1.30",
        ],
        "test": [
            "orjson>=3.9",
            "msgspec>=0.18",
            "txredisapi",
            "pytest>=7",
            "pytest-twisted>=1.14",
            "anthropic>=0.40",
            "openai>=1.0",
            "hypothesis>=6",
            "opentelemetry-sdk>=1.30",
            "opentelemetry-exporter-otlp-proto-http>=1.30",
            # scripts/lint, run by tests/test_lint.py (settings in pyproject.toml); pinned to a minor
            # version so that a new release cannot turn CI red with new checks overnight
            "ruff>=0.17,<0.18",
            "mypy>=2.4,<2.5",
            "mypy-zope>=1.0.17",
            # drives Debian's chromium (through chromium-driver) in the dashboard's browser tests
            "selenium>=4.20",
        ],
    },
    entry_points={"console_scripts": ["clproxy = clproxy.cli.main:main"]},
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        # the test suite passes on each (2026-12-07: 3.11.7, 3.12.1, 3.13.0)
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Environment :: No Input/Output (Daemon)",
    ],
)
