"""The live dashboard: ``GET /dashboard``, its assets, login, and the live feed behind it.

* :mod:`clproxy.dashboard.access` -- who may look: open when no client key exists, else an admin key
  by ``Authorization: Bearer`` or a login session cookie; login attempts are rate-limited.
* :mod:`clproxy.dashboard.feed` -- the document the page shows, and the server-sent events that
  keep it current while at least one page is open (nothing runs while none is).
* :mod:`clproxy.dashboard.resources` -- the twisted.web resources and their security headers.
* ``static/`` -- the page itself: plain HTML, CSS and JavaScript, served as package data.
"""
