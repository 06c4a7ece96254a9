"""Monitoring service: data and prediction drift, model quality, alert rules and alerts."""
