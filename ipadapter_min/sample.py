"""``python -m ipadapter_min.sample``: generate images. The command line is ``cli/sample.py``."""
import sys

from .cli.sample import main

if __name__ == "__main__":
    sys.exit(main())
