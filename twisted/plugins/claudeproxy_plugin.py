"""twistd plugin: ``twistd -n claudeproxy`` runs the clproxy daemon (loaded lazily)."""

from twisted.application.service import ServiceMaker

claudeproxy = ServiceMaker(
    "clproxy",
    "clproxy.daemon.tap",
    "Claude Messages API proxy pooling Anthropic accounts with refresh, failover and fallback.",
    "claudeproxy",
)
