"""`python -m falaj_platform.services.serving` runs the serving service."""

from falaj_platform.runtime.service import main
from falaj_platform.services.serving.server import SPEC

if __name__ == "__main__":
    main(SPEC)
