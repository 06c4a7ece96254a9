"""Falaj platform: the shared runtime, the services, the gateway and the `falaj` CLI."""
