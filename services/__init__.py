"""User-facing entry points: the `crm` command line, the demo, the traffic simulator."""
