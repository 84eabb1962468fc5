"""``python -m ipadapter_min.demo train --out DIR``: train the demo world's models stage by stage.

Each stage resumes from ``DIR/<stage>/checkpoint.pt`` when run again, shows a progress bar and
logs its loss to ``DIR/<stage>/log.csv``; its weights go to ``DIR/weights/``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..formats.files import message
from .stages import STAGES


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ipadapter_min.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train the demo's models (all stages in order, or --stage)")
    train.add_argument("--out", required=True, type=Path, help="working folder (resumed when it exists)")
    train.add_argument("--stage", choices=list(STAGES), action="append",
                       help="run only this stage (repeatable); default: every stage in order")
    train.add_argument("--smoke", action="store_true", help="a few steps per stage: checks the whole path in seconds")
    train.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        for name in args.stage or list(STAGES):
            STAGES[name](args.out, smoke=args.smoke, progress=not args.no_progress)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"error: {message(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
