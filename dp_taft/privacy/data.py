"""Training data for DP-SGD: Poisson loaders (the only sampling we account) and the prefix cache."""

from __future__ import annotations

import itertools

import torch
import torch.nn as nn
from opacus.data_loader import DPDataLoader, dtype_safe, shape_safe, wrap_collate_with_empty
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate
from tqdm.auto import tqdm

from .randomness import SecurePoissonSampler

__all__ = ["resolve_train_set", "Indexed", "poisson_sampler", "poisson_loader", "cache_prefix", "FromPrefix"]


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


def poisson_sampler(n: int, sample_rate: float, *, steps: int, skip: int,
                    generator: torch.Generator | None) -> UniformWithReplacementSampler:
    """Opacus' Poisson batch sampler over ``n`` examples yielding ``steps`` batches, each
    example included with probability ``sample_rate``.

    ``generator`` None: secure mode, coin flips from the OS CSPRNG (nothing to skip or
    replay). Otherwise the first ``skip`` batch draws of ``generator`` are discarded first:
    replaying only the coin flips (no data is loaded), so a resumed epoch sees exactly the
    batches the interrupted one would have seen next.
    """
    if generator is None:
        return SecurePoissonSampler(num_samples=n, sample_rate=sample_rate, steps=steps)
    skipped = UniformWithReplacementSampler(num_samples=n, sample_rate=sample_rate, generator=generator, steps=skip)
    for _ in itertools.islice(skipped, skip):
        pass
    return UniformWithReplacementSampler(num_samples=n, sample_rate=sample_rate, generator=generator, steps=steps)


def poisson_loader(dataset: Dataset, sampler: UniformWithReplacementSampler, *, num_workers: int) -> DataLoader:
    """Loader of ``sampler``'s Poisson batches of ``dataset``, as Opacus' DPDataLoader builds it:
    an empty batch comes out as tensors with a zero batch dimension, not an error."""
    first = dataset[0]
    collate = wrap_collate_with_empty(collate_fn=default_collate, sample_empty_shapes=[(0, *shape_safe(v)) for v in first],
                                      dtypes=[dtype_safe(v) for v in first])
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers)


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
