"""``python -m ipadapter_min.demo train --out DIR``: train the demo world's models stage by stage;
``python -m ipadapter_min.demo evaluate``: judge how well they follow text and image prompts.

Each stage resumes from ``DIR/<stage>/checkpoint.pt`` when run again, shows a progress bar and
logs its loss to ``DIR/<stage>/log.csv``; its weights go to ``DIR/weights/``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .. import demo
from ..cli.parsing import Parser, failed, integer
from ..formats.files import write_atomically
from .evaluation import evaluate_demo
from .stages import STAGES


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m ipadapter_min.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train the demo's models (all stages in order, or --stage)")
    train.add_argument("--out", required=True, type=Path, help="working folder (resumed when it exists)")
    train.add_argument("--stage", choices=list(STAGES), action="append",
                       help="run only this stage (repeatable); default: every stage in order")
    train.add_argument("--smoke", action="store_true", help="a few steps per stage: checks the whole path in seconds")
    train.add_argument("--threads", type=integer(1, 4096), help="torch CPU threads (default: torch's)")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    evaluate = sub.add_parser("evaluate", help="judge how well the demo model follows text and image prompts")
    evaluate.add_argument("--weights", type=Path, default=demo.WEIGHTS,
                          help="the demo weights folder (default: the package's; or a train run's OUT/weights)")
    evaluate.add_argument("--references", type=integer(1), default=200, help="held-out reference scenes")
    evaluate.add_argument("--steps", type=integer(1, 1000), default=30, help="DDIM steps per image")
    evaluate.add_argument("--pictures", type=Path, help="also draw the λ sweep and text + image grids here")
    evaluate.add_argument("--json", type=Path, help="also write the report here")
    evaluate.add_argument("--threads", type=integer(1, 4096), help="torch CPU threads (default: torch's)")
    evaluate.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.command == "evaluate":
            report = evaluate_demo(args.weights, args.references, args.steps, pictures=args.pictures,
                                   progress=not args.no_progress)
            text = json.dumps(report, indent=1)
            print(text)
            if args.json:
                write_atomically(args.json, lambda tmp: Path(tmp).write_text(text), overwrite=True)
            return 0
        for name in args.stage or list(STAGES):
            STAGES[name](args.out, smoke=args.smoke, progress=not args.no_progress)
    except (ValueError, OSError, RuntimeError, KeyboardInterrupt) as exc:
        return failed(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
