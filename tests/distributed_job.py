"""A data-parallel private fit, launched by tests/test_distributed.py under torchrun (2 ranks, gloo).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_job.py MODE OUT [--count [--die-after K]]

MODE "shards": fit_shards over the ranks (shard s on rank s mod 2), then a removal; every
rank saves each shard's Δw and which shards it trained itself. MODE "train": private TAFT-1 on the easy task with checkpoints (book-keeping clipping);
every rank saves its trainable weights, report, last eval accuracy and the number of examples
it sent through the frozen prefix to OUT/rank<r>.pt; --cache-dir DIR keeps the prefix cache there.
With --count (hooks mode), rank 0 appends one line per executed step to
OUT/executed.txt; with --die-after K also, rank 1 kills itself (SIGKILL) before step K+1.
With --rank0 fail|hang (and --die-after K), rank 0 alone fails and its process stays alive:
"fail" raises in its ledger's next reservation after step K (disk full), "hang" stops answering
before step K+1; either way the process sleeps instead of exiting, so the other rank must
end the job by itself. MODE "noise": every per-sample gradient is zeroed,
so one SGD step (lr 1, q = 1) moves the weights by the noise alone; saved likewise.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dp_taft  # noqa: E402
from dp_taft.methods import taft  # noqa: E402
from fit_cases import easy_dataset, tiny_vit, trainable_state  # noqa: E402

# A fixed seed keeps the accuracy check deterministic; the noise job below runs on secret keys.
TRAIN = dict(epsilon=8.0, delta=1e-4, epochs=3, batch_size=40, lr=0.5, max_grad_norm=1.0, checkpoint_every=3, seed=11)
SHARDS = dict(epsilon=4.0, delta=1e-3, epochs=1, batch_size=5, lr=0.2, quiet=True)
PREFIX_EXAMPLES = [0]
NOISE = dict(epsilon=2.0, delta=1e-3, epochs=1, batch_size=96, lr=1.0, momentum=0.0, max_grad_norm=0.5)


def _rank0_fails(die_after: int) -> None:
    """Rank 0's ledger refuses its next reservation once ``die_after`` steps are reserved."""
    from dp_taft.privacy.checkpoint import Ledger

    reserve = Ledger.reserve

    def full_disk(self, *args):
        if self.steps >= die_after:
            raise OSError(28, "No space left on device (simulated, rank 0 only)")
        return reserve(self, *args)

    Ledger.reserve = full_disk


def _train(out: Path, die_after: int | None, count_steps: bool, rank0: str | None = None,
           cache_dir: Path | None = None) -> dp_taft.FitResult:
    rank, steps = int(os.environ["RANK"]), [0]  # fit initialises the process group itself
    if rank == 0 and rank0 == "fail":
        _rank0_fails(die_after)

    def count(indices, params):
        steps[0] += 1
        if rank == 0 and rank0 == "hang" and steps[0] > die_after:
            time.sleep(600)  # alive, but never reaches the step's all-reduce
        if rank == 1 and rank0 is None and die_after is not None and steps[0] > die_after:
            os.kill(os.getpid(), signal.SIGKILL)  # a crash mid-run, after its step was reserved
        if rank == 0:
            with open(out / "executed.txt", "a") as f:
                f.write("step\n")

    # Without --count no hook is needed, and fit's default book-keeping clipping runs
    # distributed; with it, the counting hook selects Opacus' per-sample hooks.
    model = taft(tiny_vit(), 1)
    prefix, PREFIX_EXAMPLES[0] = model.prefix, 0

    def counted_prefix(x):  # examples this rank sends through the frozen prefix (cache builds)
        PREFIX_EXAMPLES[0] += len(x)
        return prefix(x)

    model.prefix = counted_prefix
    return dp_taft.fit(model, easy_dataset(400), eval_set=easy_dataset(150, seed=1), quiet=True,
                       checkpoint_dir=out / "ckpt", grad_sample_hook=count if count_steps else None,
                       cache_dir=cache_dir, **TRAIN)


def _noise() -> dp_taft.FitResult:
    def erase(indices, params):
        for p in params:
            p.grad_sample.zero_()

    return dp_taft.fit(taft(tiny_vit(), 1), easy_dataset(96), quiet=True, grad_sample_hook=erase, **NOISE)


def _shards(out: Path) -> None:
    import dp_taft.shards as shards

    fits, real_fit = [], shards.fit

    def counting_fit(model, data, **kwargs):
        fits.append(len(data))
        return real_fit(model, data, **kwargs)

    shards.fit = counting_fit  # how many shard trainings ran in this process
    model, data = shard_task()
    shard_set = shards.fit_shards(model, data, 3, ids=range(len(data)), seed=1, **SHARDS)
    forgot = shard_set.forget([5])
    torch.save({"deltas": [m.delta_state_dict() for m in shard_set.models], "retrained": forgot.retrained_shards,
                "report": shard_set.report.statement(), "fits": len(fits), "key": shard_set.assignment.key},
               out / f"rank{dist.get_rank()}.pt")


def shard_task() -> tuple[dp_taft.TangentViT, torch.utils.data.TensorDataset]:
    return dp_taft.linearize(tiny_vit(), blocks=1), easy_dataset(60)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("train", "noise", "shards"))
    p.add_argument("out", type=Path)
    p.add_argument("--die-after", type=int)
    p.add_argument("--count", action="store_true", help="count executed steps (hooks mode)")
    p.add_argument("--rank0", choices=("fail", "hang"), help="rank 0 alone fails after --die-after steps")
    p.add_argument("--cache-dir", type=Path, help="train: the prefix cache's directory (shared by the ranks)")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.mode == "shards":
        return _shards(args.out)
    if args.rank0 is not None:
        try:
            _train(args.out, args.die_after, True, args.rank0)
        except Exception as e:
            print(f"rank {dist.get_rank()} stopped: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            if dist.get_rank() == 0:
                time.sleep(600)  # a process that lives on (a script that catches the error, a hung disk)
            raise
        return
    result = (_train(args.out, args.die_after, args.count or args.die_after is not None, cache_dir=args.cache_dir)
              if args.mode == "train" else _noise())
    torch.save({"trainable": trainable_state(result.model), "world": dist.get_world_size(),
                "report": None if result.report is None else result.report.to_json(),
                "steps": result.steps, "accuracy": result.history[-1].eval_accuracy,
                "noise_multiplier": result.noise_multiplier, "prefix_examples": PREFIX_EXAMPLES[0]},
               args.out / f"rank{dist.get_rank()}.pt")


if __name__ == "__main__":
    main()
