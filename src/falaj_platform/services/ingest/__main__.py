"""`python -m falaj_platform.services.ingest` runs the ingest service."""

from falaj_platform.runtime.service import main
from falaj_platform.services.ingest.server import SPEC

if __name__ == "__main__":
    main(SPEC)
