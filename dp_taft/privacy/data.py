"""Training data for DP-SGD: Poisson loaders (the only sampling we account) and the prefix cache."""

from __future__ import annotations

import itertools

import torch
import torch.nn as nn
from opacus.data_loader import DPDataLoader
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

__all__ = ["resolve_train_set", "poisson_loader", "cache_prefix", "FromPrefix"]


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


def poisson_loader(
    dataset: Dataset, sample_rate: float, *, steps: int, skip: int, generator: torch.Generator, num_workers: int
) -> DPDataLoader:
    """Opacus' Poisson loader yielding ``steps`` logical batches, each example included with
    probability ``sample_rate``, after discarding the first ``skip`` batch draws of ``generator``.

    Skipping replays only the sampler's coin flips (no data is loaded), so a resumed
    epoch sees exactly the batches the interrupted one would have seen next.
    """
    n = len(dataset)
    skipped = UniformWithReplacementSampler(num_samples=n, sample_rate=sample_rate, generator=generator, steps=skip)
    for _ in itertools.islice(skipped, skip):
        pass
    loader = DPDataLoader(dataset, sample_rate=sample_rate, generator=generator, num_workers=num_workers)
    loader.batch_sampler.steps = steps  # Opacus' default is int(1/q); we run the planned count
    return loader


@torch.no_grad()
def cache_prefix(
    model: nn.Module, dataset: Dataset, *, batch_size: int, device: torch.device, quiet: bool, desc: str
) -> TensorDataset:
    """``TensorDataset(model.prefix(x), y)`` over ``dataset``, computed once on ``device``, kept on CPU."""
    hs, ys = [], []
    batches = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for x, y in tqdm(batches, desc=desc, disable=quiet, leave=False):
        hs.append(model.prefix(x.to(device)).cpu())
        ys.append(y)
    return TensorDataset(torch.cat(hs), torch.cat(ys))


class FromPrefix(nn.Module):
    """Trains ``model`` from cached prefix outputs: ``forward(h) = model.forward_from_prefix(h)``.

    ``model`` is a child, so its parameters are the very objects trained.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.forward_from_prefix(h)
