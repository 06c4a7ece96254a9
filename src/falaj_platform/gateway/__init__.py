"""The gateway: the one mTLS entry point that authenticates, routes and forwards every call."""
