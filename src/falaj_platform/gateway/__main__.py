"""`python -m falaj_platform.gateway` runs the gateway."""

from falaj_platform.gateway.server import main

if __name__ == "__main__":
    main()
