"""`falaj demo`: the whole platform end to end on the embedded default (see `flow`)."""

from falaj_platform.demo.flow import run_demo

__all__ = ["run_demo"]
