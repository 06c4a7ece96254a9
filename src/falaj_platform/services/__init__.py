"""The six platform services; each owns its store and talks to others through the gateway."""
