"""`python -m falaj_platform.services.experiments` runs the experiments service."""

from falaj_platform.runtime.service import main
from falaj_platform.services.experiments.server import SPEC

if __name__ == "__main__":
    main(SPEC)
