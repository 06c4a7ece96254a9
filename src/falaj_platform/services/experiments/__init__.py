"""Experiments service: deterministic assignment, exposures and outcomes, and their analysis."""
