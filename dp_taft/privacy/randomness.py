"""Where DP-SGD's randomness comes from: secret seeds, and a hardened secure mode.

The guarantee of DP-SGD holds only while its noise and its Poisson batches are unknown
to the adversary. A run whose seed is published (a default in the code, a README, a
config file) can be replayed on two candidate data sets and told apart with certainty.
So, by default, every stream is seeded from the operating system's CSPRNG
(:func:`secret_seed`) and the seed is kept only in the run's private checkpoint.

``secure_mode`` goes further, as Opacus' ``secure_mode`` does: the Gaussian noise and the
Poisson coin flips are drawn from the OS CSPRNG itself (``os.urandom``), never from a
seeded pseudo-random generator, and each noise coordinate is the normalized sum of four
Gaussian draws, which defeats the floating-point attack on naive Gaussian sampling
(Mironov, "On significance of the least significant bits for differential privacy",
CCS 2012; Holohan and Braghin, "Secure random sampling in differential privacy",
ESORICS 2021, section 5.1: the sum of 2n draws scaled by 1/sqrt(2n), n = 2).
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np
import torch
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

__all__ = ["secret_seed", "derive_seed", "csprng_uniform", "secure_normal", "SecurePoissonSampler",
           "secure_optimizer_class"]

#: Gaussian draws summed per noise coordinate in secure mode (Holohan and Braghin 2021, n = 2).
SECURE_DRAWS = 4
_MANTISSA = 53  # float64 mantissa bits: uniforms are k / 2^53 with k uniform in [0, 2^53)


def secret_seed() -> int:
    """A 63-bit seed from the OS CSPRNG: unpredictable, so never reproducible from outside."""
    return int.from_bytes(os.urandom(8), "little") >> 1


def derive_seed(seed: int, *keys: int) -> int:
    """Independent 64-bit seed per (seed, stream id, ...), so that streams never overlap."""
    low, high = np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint32)
    return int(low) | int(high) << 32


def csprng_uniform(n: int) -> torch.Tensor:
    """``n`` float64 uniforms in [0, 1) from ``os.urandom``, each a multiple of 2^-53."""
    words = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(64 - _MANTISSA)
    return torch.from_numpy(words.astype(np.float64) * 2.0 ** -_MANTISSA)


def _csprng_normal(n: int) -> torch.Tensor:
    """``n`` standard normals (float64) from CSPRNG uniforms by the Box-Muller transform."""
    pairs = (n + 1) // 2
    u = csprng_uniform(2 * pairs)
    radius = torch.sqrt(-2.0 * torch.log1p(-u[:pairs]))  # 1 - u in (0, 1]: log is finite
    angle = 2.0 * math.pi * u[pairs:]
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:n]


def secure_normal(std: float, reference: torch.Tensor) -> torch.Tensor:
    """Noise of ``reference``'s shape, dtype and device, N(0, std²) per coordinate, from the
    OS CSPRNG, each coordinate the sum of :data:`SECURE_DRAWS` draws scaled to keep ``std``."""
    if std == 0:
        return torch.zeros_like(reference)
    n = reference.numel()
    total = _csprng_normal(SECURE_DRAWS * n).view(SECURE_DRAWS, n).sum(dim=0)
    noise = total * (std / math.sqrt(SECURE_DRAWS))
    return noise.view(reference.shape).to(device=reference.device, dtype=reference.dtype)


class SecurePoissonSampler(UniformWithReplacementSampler):
    """Opacus' Poisson batch sampler with its coin flips drawn from the OS CSPRNG.

    Each of ``steps`` batches holds every index independently with probability
    ``sample_rate``; nothing about the draws can be replayed, not even by the trainer.
    """

    def __init__(self, *, num_samples: int, sample_rate: float, steps: int) -> None:
        super().__init__(num_samples=num_samples, sample_rate=sample_rate, steps=steps)

    def __iter__(self):
        for _ in range(self.steps):
            mask = csprng_uniform(self.num_samples) < self.sample_rate
            yield mask.nonzero(as_tuple=False).reshape(-1).tolist()


class _SecureNoise:
    """Mixin for an Opacus DP optimizer: its Gaussian noise comes from :func:`secure_normal`.

    Replaces Opacus' ``add_noise`` (which draws from a ``torch.Generator``, a seeded
    pseudo-random generator) with the same computation on CSPRNG noise: p.grad =
    summed clipped gradient + N(0, (σ·C)²).
    """

    def add_noise(self) -> None:
        # Opacus' distributed optimizers have a rank: only rank 0 adds noise, before the all-reduce.
        std = self.noise_multiplier * self.max_grad_norm if getattr(self, "rank", 0) == 0 else 0.0
        for p in self.params:
            _check_processed_flag(p.summed_grad)  # Opacus' guard against noising a sum twice
            p.grad = (p.summed_grad + secure_normal(std, p.summed_grad)).view_as(p)
            _mark_as_processed(p.summed_grad)


@functools.cache
def secure_optimizer_class(base: type) -> type:
    """``base`` (an Opacus DP optimizer class) with CSPRNG noise; one class per base."""
    return type(f"Secure{base.__name__}", (_SecureNoise, base), {})
