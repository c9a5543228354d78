"""One rank's rows of a data set in a data-parallel run: a contiguous block of positions.

Rank r of W owns the positions ``block(n, comm)``: the r-th of W consecutive blocks whose
sizes differ by at most one. Its Poisson sampler only ever draws those positions
(:func:`~dp_taft.privacy.data.poisson_sampler`), so the rank needs, and caches, only those
examples: :func:`own_rows` selects them, :class:`RankRows` serves them back under their
positions in the whole data set. Blocks rather than strides let a rank draw the coin flips of
its own positions from the run's one stream by jumping over the others' (PCG64's ``advance``),
so the batches equal a single process's at 1/W of the drawing.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset, Subset, TensorDataset

from .distributed import Comm

__all__ = ["block", "own_rows", "RankRows", "part_tag"]


def block(n: int, comm: Comm) -> range:
    """Positions of rank ``comm.rank`` among ``n``: the first ``n % world`` ranks hold one more."""
    size, extra = divmod(n, comm.world)
    start = comm.rank * size + min(comm.rank, extra)
    return range(start, start + size + (comm.rank < extra))


def part_tag(comm: Comm) -> str:
    """``w<world>r<rank>``: names which rows a stored prefix cache holds."""
    return f"w{comm.world}r{comm.rank}"


def own_rows(dataset: Dataset, comm: Comm) -> Dataset:
    """The examples of ``dataset`` at this rank's positions (:func:`block`), in order; ``dataset``
    itself for a single process. A plain TensorDataset stays one (views of its tensors, no
    copy), so its cache is still named from its tensors without a pass over the examples."""
    if not comm.distributed:
        return dataset
    rows = block(len(dataset), comm)
    if type(dataset) is TensorDataset:
        return TensorDataset(*(t[rows.start:rows.stop] for t in dataset.tensors))
    return Subset(dataset, rows)


class RankRows(Dataset):
    """``rows`` (this rank's examples, from :func:`own_rows`) indexed by position in the whole data set of ``n``.

    ``len`` is ``n``, so samplers and :class:`~dp_taft.privacy.data.Indexed` see the positions
    they would see in a single process; asking for another rank's position is an error, never
    a silent wrong example.
    """

    def __init__(self, rows: Dataset, comm: Comm, n: int) -> None:
        self.positions = block(n, comm)
        if len(rows) != len(self.positions):
            raise ValueError(f"rank {comm.rank} of {comm.world} owns {len(self.positions)} of {n} positions, "
                             f"got {len(rows)} rows")
        self.rows, self.n = rows, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        if i not in self.positions:
            raise IndexError(f"position {i} is not this rank's (it holds {self.positions.start} to "
                             f"{self.positions.stop - 1} of {self.n})")
        return self.rows[i - self.positions.start]
