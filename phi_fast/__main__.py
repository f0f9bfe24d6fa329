"""`python -m phi_fast ...`: the command line of phi_fast.cli (installed as the `phi_fast` command too)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m phi_fast"))
