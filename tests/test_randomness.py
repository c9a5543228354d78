"""The training randomness is secret by default, hardened in secure mode, and reproducible only on request."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

import dp_taft
from dp_taft.methods import linear_probe, taft
from dp_taft.privacy.checkpoint import CHECKPOINT_FILE, load_checkpoint
from dp_taft.privacy.data import poisson_sampler
from dp_taft.privacy.distributed import Comm
from dp_taft.privacy.randomness import (NoiseStream, PoissonSampler, csprng_uniform, noise_optimizer_class, philox_state,
                                       secure_normal)
from dp_taft.privacy.rank_rows import block
from fit_cases import easy_dataset, tiny_vit, trainable_state

DATA = easy_dataset(96)
PRIVATE = dict(epsilon=2.0, delta=1e-3, epochs=1, batch_size=32, lr=0.1, quiet=True)


def test_two_default_runs_on_the_same_data_differ():
    a = trainable_state(dp_taft.fit(taft(tiny_vit(), 1), DATA, **PRIVATE).model)
    b = trainable_state(dp_taft.fit(taft(tiny_vit(), 1), DATA, **PRIVATE).model)
    assert not any(torch.equal(a[k], b[k]) for k in a)  # every tensor got other noise


def test_secret_seed_stays_in_the_private_checkpoint_and_resumes_exactly(tmp_path):
    """A seedless run saves its secret seed only in its checkpoint; resuming it continues that stream."""
    kwargs = dict(epsilon=None, batch_size=16, lr=0.1, quiet=True)
    first = dp_taft.fit(linear_probe(tiny_vit()), DATA, epochs=1, checkpoint_dir=tmp_path, **kwargs)
    seed = load_checkpoint(tmp_path / CHECKPOINT_FILE)["run"]["seed"]
    assert isinstance(seed, int) and seed >= 0 and first.report is None
    assert (tmp_path / CHECKPOINT_FILE).stat().st_mode & 0o777 == 0o600  # the key is readable by its owner only
    resumed = dp_taft.fit(linear_probe(tiny_vit()), DATA, epochs=2, checkpoint_dir=tmp_path, **kwargs)
    replay = dp_taft.fit(linear_probe(tiny_vit()), DATA, epochs=2, seed=seed, **kwargs)
    got, want = trainable_state(resumed.model), trainable_state(replay.model)
    assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="differs from the seed of the run being resumed"):
        dp_taft.fit(linear_probe(tiny_vit()), DATA, epochs=2, checkpoint_dir=tmp_path, seed=seed + 1, **kwargs)


def test_report_holds_no_seed_and_states_that_randomness_must_stay_secret():
    result = dp_taft.fit(linear_probe(tiny_vit()), DATA, seed=12345, **PRIVATE)
    text = result.report.to_json()
    assert "seed" not in json.loads(text) and "12345" not in text
    statement = result.report.statement().lower()
    assert "secret" in statement and "seed" in statement


def test_secure_mode_trains_privately_and_never_repeats():
    runs = [dp_taft.fit(linear_probe(tiny_vit()), DATA, secure_mode=True, **PRIVATE) for _ in range(2)]
    for r in runs:
        assert r.steps == 3 and r.report.epsilon <= 2.0
    a, b = (trainable_state(r.model) for r in runs)
    assert not any(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("std", [0.7, 3.0])
def test_secure_noise_is_gaussian_with_the_requested_std(std):
    z = secure_normal(std, torch.empty(200_000, dtype=torch.float64)).numpy()
    # std within 1% (the sample std of 2e5 normals has relative sd 0.16%), mean ~ 0, Gaussian shape
    assert z.std() == pytest.approx(std, rel=0.01)
    assert abs(z.mean()) < 5 * std / math.sqrt(len(z))
    assert stats.kstest(z / std, "norm").pvalue > 1e-4
    assert secure_normal(0.0, torch.ones(3)).eq(0).all()


@pytest.mark.parametrize("secure", [True, False], ids=["secure", "keyed"])
def test_optimizer_adds_noise_of_std_sigma_times_c(secure):
    """The DP optimizer's noise from a stream: p.grad = clipped sum + N(0, (σC)²), then / E[B]."""
    from opacus.optimizers import DPOptimizer

    p = torch.nn.Parameter(torch.zeros(100_000))
    sigma, clip, batch = 1.3, 0.5, 4.0
    opt = noise_optimizer_class(DPOptimizer)(torch.optim.SGD([p], lr=1.0), noise_multiplier=sigma,
                                             max_grad_norm=clip, expected_batch_size=batch)
    opt.noise_stream = NoiseStream(torch.device("cpu"), secure)
    opt.noise_stream.seed(12345)
    p.grad_sample = torch.zeros(2, 100_000)  # two examples with zero gradient
    opt.step()
    update = -p.detach()  # SGD with lr 1 from 0: the noised, averaged gradient
    assert float(update.std()) == pytest.approx(sigma * clip / batch, rel=0.02)


def test_secure_poisson_sampler_includes_each_example_with_probability_q():
    sampler = PoissonSampler(range(1000), num_samples=1000, sample_rate=0.1, steps=200, rng=None)
    sizes = [len(b) for b in sampler]
    assert len(sizes) == 200 and all(0 <= s <= 1000 for s in sizes)
    assert sum(sizes) / 200 == pytest.approx(100, rel=0.03)  # sd of the mean: 9.5/sqrt(200) = 0.67
    u = csprng_uniform(100_000).numpy()
    assert 0 <= u.min() and u.max() < 1 and stats.kstest(u, "uniform").pvalue > 1e-4


@pytest.mark.parametrize("world", [2, 3, 7])
def test_ranks_keyed_alike_draw_the_single_process_batches_between_them(world):
    """Each rank jumps over the others' coin flips: the union of the ranks' batches, step by
    step (a resumed epoch's skip included), is the batch one process draws."""
    def batches(comm, skip):
        rng = np.random.Generator(np.random.PCG64DXSM(np.random.SeedSequence([7, 1, 0])))
        return list(poisson_sampler(1001, 0.05, steps=6, skip=skip, rng=rng, comm=comm))

    for skip in (0, 2):
        single = batches(Comm(), skip)
        parts = [batches(Comm(rank, world), skip) for rank in range(world)]
        assert [sorted(sum((p[step] for p in parts), [])) for step in range(6)] == single
        assert all(set(p[step]) <= set(block(1001, Comm(rank, world))) for rank, p in enumerate(parts)
                   for step in range(6))
    assert sum(map(len, single)) > 200  # q·N·steps = 300 expected: the batches are not empty


def test_every_bit_of_the_run_key_changes_noise_and_batches():
    """torch's CPU generator keeps 32 bits of a seed; the keyed streams must use all of them."""
    def draws(key):
        noise = NoiseStream(torch.device("cpu"), secure=False)
        noise.seed(key, 0, 0)
        sampler = PoissonSampler(range(500), num_samples=500, sample_rate=0.2, steps=3,
                                 rng=np.random.Generator(np.random.PCG64DXSM(np.random.SeedSequence([key, 1, 0]))))
        return noise.normal(1.0, torch.empty(64)), list(sampler)

    base = 12345
    for other in (base + 2**32, base + 2**64, base + 2**100):
        (z0, b0), (z1, b1) = draws(base), draws(other)
        assert not torch.equal(z0, z1) and b0 != b1


def test_cuda_philox_state_depends_on_key_bits_beyond_64():
    """torch's CUDA Philox takes a 64-bit seed: the state must carry more of the key (a secret
    counter offset), so keys equal in their low 64 bits still give different streams."""
    base = 12345
    states = [philox_state(key, 0, 0).view(torch.int64).tolist() for key in (base, base + 2**64, base + 2**100)]
    assert len({tuple(s) for s in states}) == 3
    offsets = [s[1] for s in states]
    assert all(o % 4 == 0 for o in offsets) and len(set(offsets)) == 3  # torch requires a multiple of 4


def test_cuda_stream_is_keyed_through_philox_state():
    """What runs on CUDA, checked without a GPU: the stream's generator gets philox_state of
    (key, stream) as its whole state (seed and offset), not a 64-bit manual_seed."""
    class Recorder:
        def set_state(self, state):
            self.state = state.clone()

        def manual_seed(self, seed):
            raise AssertionError("a 64-bit manual_seed would drop the key's other bits")

    noise = NoiseStream(torch.device("cpu"), secure=False)
    noise.kind, noise.generator = "cuda", Recorder()
    key = 12345 + 2**100
    noise.seed(key, 3, 4)
    assert torch.equal(noise.generator.state, philox_state(key, 3, 4))
    assert noise.generator.state.dtype == torch.uint8 and noise.generator.state.numel() == 16  # torch's layout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_noise_changes_with_key_bits_beyond_64():
    def draw(key):
        noise = NoiseStream(torch.device("cuda"), secure=False)
        noise.seed(key, 0, 0)
        return torch.randn(4096, device="cuda", generator=noise.generator).cpu()

    base = 12345
    z = [draw(k) for k in (base, base + 2**64, base + 2**100)]
    assert torch.equal(draw(base), z[0])  # the same key replays (resume)
    assert not torch.equal(z[0], z[1]) and not torch.equal(z[0], z[2]) and not torch.equal(z[1], z[2])


def test_secret_key_is_128_bits_and_a_resumed_private_run_stays_in_budget(tmp_path):
    """Private, seedless, resumed from its checkpoint with more epochs: the checkpoint keeps a
    128-bit key and the budget guard stops the resumed run at the target."""
    kwargs = dict(epsilon=2.0, delta=1e-3, batch_size=16, lr=0.1, quiet=True)
    dp_taft.fit(linear_probe(tiny_vit()), DATA, epochs=1, checkpoint_dir=tmp_path, **kwargs)
    key = load_checkpoint(tmp_path / CHECKPOINT_FILE)["run"]["seed"]
    assert key.bit_length() > 64  # a 128-bit key, not a 32- or 64-bit seed
    with pytest.warns(UserWarning, match="privacy budget"):  # the plan was for 1 epoch; the guard stops it
        resumed = dp_taft.fit(linear_probe(tiny_vit()), DATA, epochs=3, checkpoint_dir=tmp_path, **kwargs)
    assert resumed.report.epsilon <= 2.0 and resumed.steps >= 6


def test_grad_sample_hook_sees_each_row_with_its_dataset_position():
    """The per-sample gradient of a linear probe's bias is softmax − onehot(label): its
    negative entry names the row's label, which must be that of the reported position."""
    labels = DATA.tensors[1]
    checked = []

    def hook(indices, params):
        bias = next(p for p in params if p.ndim == 1)
        assert bias.grad_sample.shape[0] == len(indices)
        assert torch.equal(bias.grad_sample.argmin(dim=1), labels[indices])
        checked.append(len(indices))
        for q in params:  # erase every gradient: without noise, nothing may move
            q.grad_sample.zero_()

    model = linear_probe(tiny_vit())
    before = trainable_state(model)
    dp_taft.fit(model, DATA, epsilon=None, epochs=1, batch_size=32, lr=1.0, quiet=True, grad_sample_hook=hook)
    assert sum(checked) > 0
    after = trainable_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
