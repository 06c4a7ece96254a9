"""`python -m falaj_platform.services.monitoring` runs the monitoring service."""

from falaj_platform.runtime.service import main
from falaj_platform.services.monitoring.server import SPEC

if __name__ == "__main__":
    main(SPEC)
