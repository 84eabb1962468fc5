"""``python -m ipadapter_min.demo train --out DIR``: train the demo world's models stage by stage;
``python -m ipadapter_min.demo evaluate``: judge how well they follow text and image prompts
(``--ceilings``: where the errors come from).

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
from .ceilings import ceilings
from .evaluation import evaluate_demo, held_out_references
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
    evaluate.add_argument("--unet", type=Path,
                          help="a UNet file in place of the weights folder's: a training snapshot "
                               "(OUT/unet/snapshots/unet-STEP.safetensors), for a learning curve")
    evaluate.add_argument("--text-only", action="store_true",
                          help="judge text to image alone (a learning curve's point; no image prompts)")
    evaluate.add_argument("--ceilings", action="store_true",
                          help="instead, measure where errors come from: the judge after a VAE round trip of the "
                               "references, and a linear probe per attribute of each adapter's image features")
    evaluate.add_argument("--probe-images", type=integer(10), default=20_000,
                          help="--ceilings: fresh renders the linear probes learn from (default 20000)")
    evaluate.add_argument("--threads", type=integer(1, 4096), help="torch CPU threads (default: torch's)")
    evaluate.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.command == "train":
            for name in args.stage or list(STAGES):
                STAGES[name](args.out, smoke=args.smoke, progress=not args.no_progress)
            return 0
        if args.ceilings:
            report = ceilings(args.weights, *held_out_references(args.references), args.probe_images)
        else:
            report = evaluate_demo(args.weights, args.references, args.steps, pictures=args.pictures,
                                   progress=not args.no_progress, unet=args.unet, text_only=args.text_only)
        text = json.dumps(report, indent=1)
        print(text)
        if args.json:
            write_atomically(args.json, lambda tmp: Path(tmp).write_text(text), overwrite=True)
    except (ValueError, OSError, RuntimeError, KeyboardInterrupt) as exc:
        return failed(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
