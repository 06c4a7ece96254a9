"""The shared service runtime: what every Falaj service and the gateway need the same way.

TLS and identity, settings, structured logs, the error interceptor, health and
reflection, metrics, graceful shutdown and the database session scope live here,
written once and imported everywhere.
"""
