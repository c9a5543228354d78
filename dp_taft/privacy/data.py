"""Training data for DP-SGD: Poisson loaders (the only sampling we account) and the prefix cache."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn
from opacus.data_loader import DPDataLoader, dtype_safe, shape_safe, wrap_collate_with_empty
from torch.utils.data import DataLoader, Dataset, default_collate

from .distributed import Comm
from .rank_rows import block
from .randomness import PoissonSampler

if TYPE_CHECKING:
    from .prefix_cache import CacheSpec, PrefixCache

__all__ = ["resolve_train_set", "collate_examples", "Indexed", "poisson_sampler", "poisson_loader", "cache_prefix",
           "FromPrefix"]


def resolve_train_set(train_set: Dataset | DataLoader) -> tuple[Dataset, float | None]:
    """(dataset, sample rate of a given Opacus DPDataLoader or None).

    A plain DataLoader is refused: it shuffles into fixed-size batches, and accounting
    such a run as Poisson sampling would overstate its privacy.
    """
    if isinstance(train_set, DPDataLoader):
        if train_set.distributed:
            raise ValueError("a distributed DPDataLoader is not supported; pass the dataset instead")
        return train_set.dataset, float(train_set.sample_rate)
    if isinstance(train_set, DataLoader):
        raise ValueError(
            "train_set is a plain torch DataLoader, which does not sample batches by Poisson sampling, "
            "so DP-SGD accounting would overstate its privacy. Pass the dataset itself (fit builds "
            "Opacus' Poisson DPDataLoader) or an opacus.data_loader.DPDataLoader."
        )
    return train_set, None


def collate_examples(batch: Sequence[Sequence[Any]]) -> Any:
    """``default_collate`` of a list of examples (tuples such as (image, label)), refusing
    tensors of different shapes in the same position with a message that says to resize,
    rather than torch's "stack expects each tensor to be equal size"."""
    for position in range(len(batch[0]) if batch and isinstance(batch[0], (tuple, list)) else 0):
        shapes = {tuple(item[position].shape) for item in batch if torch.is_tensor(item[position])}
        if len(shapes) > 1:
            what = "images" if position == 0 else f"values at position {position} of the examples"
            raise ValueError(
                f"{what} of different shapes in one batch: {', '.join(map(str, sorted(shapes)[:5]))}"
                f"{', ...' if len(shapes) > 5 else ''}. Every example must have the same shape: resize them in the "
                "data set's transform, e.g. dp_taft.images.load_images(..., transform=dp_taft.backbone.eval_transform("
                "dp_taft.backbone.data_config(model))) or torchvision.transforms Resize(size) + CenterCrop(size) "
                "before ToTensor()"
            )
    return default_collate(batch)


class Indexed(Dataset):
    """``dataset`` whose items carry their position: (x, y, index as a 0-d int64 tensor).

    The loop hands each physical batch's positions to a :data:`GradSampleHook`.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = self.dataset[i]
        return x, y, torch.tensor(i, dtype=torch.int64)


def poisson_sampler(n: int, sample_rate: float, *, steps: int, skip: int, rng: np.random.Generator | None,
                    comm: Comm = Comm()) -> PoissonSampler:
    """Poisson batch sampler over ``n`` examples yielding ``steps`` batches, each example
    included with probability ``sample_rate``; in a distributed run, this rank's part of
    each batch (its block of positions, :func:`~.rank_rows.block`: the union over ranks is the
    whole batch).

    ``rng`` None: secure mode, coin flips from the OS CSPRNG (nothing to skip or replay).
    Otherwise the keyed generator skips the first ``skip`` batches' coin flips (no data is
    loaded), so a resumed epoch sees exactly the batches the interrupted one would have seen next.
    """
    return PoissonSampler(block(n, comm), num_samples=n, sample_rate=sample_rate, steps=steps, rng=rng, skip=skip)


def poisson_loader(dataset: Dataset, sampler: PoissonSampler, *, num_workers: int) -> DataLoader:
    """Loader of ``sampler``'s Poisson batches of ``dataset``, as Opacus' DPDataLoader builds it:
    an empty batch comes out as tensors with a zero batch dimension, not an error."""
    first = dataset[sampler.positions[0]]  # one this rank may read (a RankRows holds only its own)
    collate = wrap_collate_with_empty(collate_fn=collate_examples,
                                      sample_empty_shapes=[(0, *shape_safe(v)) for v in first],
                                      dtypes=[dtype_safe(v) for v in first])
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers)


def cache_prefix(model: nn.Module, dataset: Dataset, *, batch_size: int, device: torch.device, quiet: bool, desc: str,
                 spec: CacheSpec | None = None, precision: str = "fp32", comm: Comm = Comm()) -> PrefixCache:
    """``model.prefix`` of every example of ``dataset`` (computed in batches of ``batch_size``
    on ``device`` under ``precision``) and its label, stored as ``spec`` says (default: "auto",
    float32) and read back as float32: see :mod:`dp_taft.privacy.prefix_cache`. In a
    data-parallel run (``comm``), of this rank's examples only (:func:`~.rank_rows.own_rows`).
    ``desc`` names the set ("train", "eval") in the progress bar and in the line that says
    where the cache went."""
    # Imported here: prefix_cache batches its data with this module's collate_examples.
    from .prefix_cache import CacheSpec, build_prefix_cache

    return build_prefix_cache(model, dataset, CacheSpec() if spec is None else spec, batch_size=batch_size,
                              device=device, quiet=quiet, desc=desc, precision=precision, comm=comm)


class FromPrefix(nn.Module):
    """Trains ``model`` from cached prefix outputs: ``forward(h) = model.forward_from_prefix(h)``.

    ``model`` is a child, so its parameters are the very objects trained.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.forward_from_prefix(h)
