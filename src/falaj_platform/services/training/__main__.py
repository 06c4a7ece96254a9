"""`python -m falaj_platform.services.training` runs the training service."""

from falaj_platform.runtime.service import main
from falaj_platform.services.training.server import SPEC

if __name__ == "__main__":
    main(SPEC)
