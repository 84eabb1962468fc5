"""``python -m ipadapter_min.evaluate``: CLIP-I and CLIP-T of an IP-Adapter. The command line is ``cli/evaluate.py``."""
import sys

from .cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
