"""Third-party code shipped inside clproxy because Debian does not package it.

``txredisapi.py``: txredisapi 1.6.0 (https://github.com/IlyaSkriblovsky/txredisapi), unmodified,
Apache License 2.0 (``txredisapi.LICENSE``; in the .deb, debian/copyright and
/usr/share/common-licenses/Apache-2.0). Debian 12 (bookworm) has no python3-txredisapi, and the
Redis state backend needs it: clproxy.state.redis.link imports the system's txredisapi when there is one
(pip install txredisapi) and this copy otherwise, so the .deb's Redis backend works out of the box.
Vendored rather than made optional because it is one pure-Python module on Twisted alone.
"""
