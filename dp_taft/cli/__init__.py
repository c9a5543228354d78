"""``dp-taft``: private fine-tuning of a timm ViT on your own images, one command per job.

    dp-taft train    --data TRAIN --model NAME --epsilon E --out DIR   train, save a model directory
    dp-taft predict  DIR IMAGE_OR_FOLDER ... [--output preds.csv]      label images
    dp-taft evaluate DIR --data EVAL                                   accuracy, per class, confusion matrix
    dp-taft compose  DIR1 DIR2 ... --out DIR [--disjoint]              average tangent models' Δw
    dp-taft forget   DIR --ids FILE                                    remove examples from a shard-trained model

Each sub-command is a thin layer over the Python API (:mod:`dp_taft.images`,
:mod:`dp_taft.backbone`, :mod:`dp_taft.config`, :func:`dp_taft.finetune`,
:mod:`dp_taft.model_dir`, :mod:`dp_taft.shards`). Bad input ends the command with one
message that says what to change and exit status 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ..privacy.distributed import RankFailure
from . import compose, evaluate, forget, predict, train

__all__ = ["main", "parser"]

#: Errors that are the user's to fix: reported as one message, not a traceback. A
#: RankFailure (a lost peer in a distributed run) says to relaunch, which resumes; a TypeError
#: is what timm raises for a --model-kwargs value of the wrong type.
USER_ERRORS = (ValueError, OSError, TypeError, RankFailure)


def parser() -> argparse.ArgumentParser:
    """The ``dp-taft`` argument parser with its five sub-commands."""
    p = argparse.ArgumentParser(prog="dp-taft", description=__doc__.split("\n\n")[0].replace("``", ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (train, predict, evaluate, compose, forget):
        command.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``dp-taft`` command; returns the exit status (0 done, 2 bad input, 130 interrupted)."""
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except BrokenPipeError:  # the reader went away (e.g. `dp-taft predict ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"dp-taft {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dp-taft {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
