"""``python -m dpfc_native``: the ``dpfc`` command line (see :mod:`dpfc_native.cli`)."""

from .cli import main

if __name__ == "__main__":
    main()
