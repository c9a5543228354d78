"""Where DP-SGD's randomness comes from: secret seeds, and a hardened secure mode.

The guarantee of DP-SGD holds only while its noise and its Poisson batches are unknown
to the adversary. A run whose seed is published (a default in the code, a README, a
config file) can be replayed on two candidate data sets and told apart with certainty.
So, by default, the run's key is 128 bits from the operating system's CSPRNG
(:func:`secret_seed`), kept only in the run's private checkpoint, and every stream is a
generator keyed with all of it: numpy's PCG64DXSM through ``SeedSequence`` (128-bit state)
for the Poisson coin flips and, on CPU, the noise. torch's CPU generator is never seeded
with it: MT19937's ``manual_seed`` keeps only 32 bits, few enough to search. On CUDA the
noise comes from torch's Philox generator, keyed by 126 bits of the run key
(:func:`philox_state`): its 64-bit seed and a secret starting counter offset. A 64-bit seed
alone would leave 64 bits to search, whatever the key's length.

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

__all__ = ["secret_seed", "derive_seed", "philox_state", "keyed_generator", "csprng_uniform", "secure_normal",
           "NoiseStream", "PoissonSampler", "noise_optimizer_class"]

#: Gaussian draws summed per noise coordinate in secure mode (Holohan and Braghin 2021, n = 2).
SECURE_DRAWS = 4
_MANTISSA = 53  # float64 mantissa bits: uniforms are k / 2^53 with k uniform in [0, 2^53)


def secret_seed() -> int:
    """A 128-bit key from the OS CSPRNG: unpredictable, so never reproducible from outside."""
    return int.from_bytes(os.urandom(16), "little")


def derive_seed(seed: int, *keys: int) -> int:
    """Independent 64-bit seed per (seed, stream id, ...), so that streams never overlap
    (for what takes 64 bits: a sub-run's explicit seed, the augmentation generator)."""
    low, high = np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint32)
    return int(low) | int(high) << 32


def philox_state(seed: int, *keys: int) -> torch.Tensor:
    """A CUDA Philox generator state (``torch.Generator.set_state``) keyed by ``seed`` and ``keys``.

    torch's CUDA state is a 64-bit seed and a 64-bit counter offset, which must be a multiple
    of 4 (it counts 32-bit draws in blocks of four); both are drawn from SeedSequence's mix of
    the whole key, so the stream depends on 64 + 62 = 126 bits of it: knowing the seed, one
    must still find where in that seed's stream (2^62 positions) the run started. The offset
    may start anywhere: torch advances it modulo 2^64.
    """
    words = np.random.SeedSequence([seed, *keys]).generate_state(4, dtype=np.uint32).astype(np.uint64)
    philox_seed = int(words[0] | words[1] << np.uint64(32))
    offset = int(words[2] | words[3] << np.uint64(32)) & ~3  # a multiple of 4: 62 random bits
    return torch.tensor(np.array([philox_seed, offset], dtype=np.uint64).view(np.int64)).view(torch.uint8)


def keyed_generator(seed: int, *keys: int) -> np.random.Generator:
    """PCG64DXSM keyed with every bit of ``seed`` and the stream ``keys`` (SeedSequence mixing)."""
    return np.random.Generator(np.random.PCG64DXSM(np.random.SeedSequence([seed, *keys])))


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


class PoissonSampler(UniformWithReplacementSampler):
    """Poisson batches of the contiguous ``positions`` (of ``num_samples`` examples) this
    process draws: each included independently with probability ``sample_rate`` at each of
    ``steps`` batches, empty batches included.

    ``rng`` None draws the coin flips from the OS CSPRNG (secure mode, never replayable).
    Otherwise the keyed generator ``rng`` is the stream of all ``num_samples`` coin flips per
    batch, in position order: this process draws those of its positions and jumps over the
    rest (``advance``, O(log n)), so ranks keyed alike draw exactly the batches of a
    single-process run, each its share, at the cost of its share. ``rng`` is first advanced
    past ``skip`` batches, so a resumed epoch sees exactly the batches the interrupted one
    would have seen next.
    """

    def __init__(self, positions: range, *, num_samples: int, sample_rate: float, steps: int,
                 rng: np.random.Generator | None, skip: int = 0) -> None:
        super().__init__(num_samples=num_samples, sample_rate=sample_rate, steps=steps)
        if positions.step != 1 or not 0 <= positions.start <= positions.stop <= num_samples:
            raise ValueError(f"positions must be a contiguous range within [0, {num_samples}], got {positions}")
        self.positions = positions
        self.rng = rng
        if rng is not None:
            rng.bit_generator.advance(skip * num_samples)  # one 64-bit draw per uniform

    def __iter__(self):
        start, stop = self.positions.start, self.positions.stop
        for _ in range(self.steps):
            if self.rng is None:
                u = csprng_uniform(stop - start)
            else:
                self.rng.bit_generator.advance(start)
                u = torch.from_numpy(self.rng.random(stop - start))
                self.rng.bit_generator.advance(self.num_samples - stop)
            yield (torch.nonzero(u < self.sample_rate).flatten() + start).tolist()


class NoiseStream:
    """Where one run's Gaussian noise comes from.

    ``"secure"``: the OS CSPRNG (:func:`secure_normal`); ``"keyed"`` (CPU): the keyed
    PCG64DXSM generator of (run key, stream); ``"cuda"``: torch's Philox generator on the
    device, keyed by 126 bits of (run key, stream) (:func:`philox_state`). :meth:`state` / :meth:`load_state` make a clean resume exact.
    """

    def __init__(self, device: torch.device, secure: bool) -> None:
        self.kind = "secure" if secure else ("cuda" if device.type == "cuda" else "keyed")
        self.generator = torch.Generator(device=device) if self.kind == "cuda" else None
        self.rng: np.random.Generator | None = None

    def seed(self, seed: int, *keys: int) -> None:
        if self.kind == "cuda":
            self.generator.set_state(philox_state(seed, *keys))
        elif self.kind == "keyed":
            self.rng = keyed_generator(seed, *keys)

    def state(self) -> object:
        if self.kind == "cuda":
            return self.generator.get_state()
        return None if self.rng is None else self.rng.bit_generator.state

    def load_state(self, state: object) -> None:
        """Restore :meth:`state`. A state of another kind (a checkpoint from another device or
        version) starts a fresh stream under a new secret key: never a replay of released noise."""
        if self.kind == "cuda" and torch.is_tensor(state):
            self.generator.set_state(state)
        elif self.kind == "keyed" and isinstance(state, dict) and state.get("bit_generator") == "PCG64DXSM":
            self.rng = np.random.Generator(np.random.PCG64DXSM())
            self.rng.bit_generator.state = state
        else:
            self.seed(secret_seed())

    def normal(self, std: float, reference: torch.Tensor) -> torch.Tensor:
        """N(0, std²) noise of ``reference``'s shape, dtype and device (secure and keyed kinds)."""
        if self.kind == "secure" or std == 0:
            return secure_normal(std, reference)
        noise = torch.from_numpy(self.rng.standard_normal(reference.numel())).mul_(std)
        return noise.view(reference.shape).to(device=reference.device, dtype=reference.dtype)


class _StreamNoise:
    """Mixin for an Opacus DP optimizer: its Gaussian noise comes from ``self.noise_stream``.

    Replaces Opacus' ``add_noise`` (which draws from a ``torch.Generator``) with the same
    computation on the stream's noise: p.grad = summed clipped gradient + N(0, (σ·C)²).
    """

    noise_stream: NoiseStream

    def add_noise(self) -> None:
        # Opacus' distributed optimizers have a rank: only rank 0 adds noise, before the all-reduce.
        std = self.noise_multiplier * self.max_grad_norm if getattr(self, "rank", 0) == 0 else 0.0
        for p in self.params:
            _check_processed_flag(p.summed_grad)  # Opacus' guard against noising a sum twice
            p.grad = (p.summed_grad + self.noise_stream.normal(std, p.summed_grad)).view_as(p)
            _mark_as_processed(p.summed_grad)


@functools.cache
def noise_optimizer_class(base: type) -> type:
    """``base`` (an Opacus DP optimizer class) drawing its noise from a :class:`NoiseStream`."""
    return type(f"Streamed{base.__name__}", (_StreamNoise, base), {})
