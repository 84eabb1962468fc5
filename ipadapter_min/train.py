"""``python -m ipadapter_min.train``: train an IP-Adapter. The command line is ``cli/train.py``."""
import sys

from .cli.train import main

if __name__ == "__main__":
    sys.exit(main())
