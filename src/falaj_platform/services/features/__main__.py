"""`python -m falaj_platform.services.features` runs the features service."""

from falaj_platform.runtime.service import main
from falaj_platform.services.features.server import SPEC

if __name__ == "__main__":
    main(SPEC)
