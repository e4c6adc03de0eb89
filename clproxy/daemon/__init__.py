"""The daemon (twistd side only; never imports cli/): options, the assembly, its services."""
