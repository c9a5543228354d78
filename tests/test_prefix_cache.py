"""The frozen-prefix cache: RAM and memory-mapped stores, reuse by key, crash safety, "auto", 16-bit storage."""

from __future__ import annotations

import copy
import gc
import logging
import pickle
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dp_taft
from dp_taft.methods import LinearProbe, NLFTViT, linear_probe, nlft, taft
from dp_taft.privacy import prefix_cache
from dp_taft.privacy.prefix_cache import CacheSpec, build_prefix_cache
from dp_taft.privacy.prefix_keys import cache_key
from dp_taft.tangent import TangentViT
from fit_cases import easy_dataset, tiny_vit, trainable_state

TRAIN, TEST = easy_dataset(96, seed=0), easy_dataset(60, seed=1)
# physical batches of 32: 3 prefix calls for TRAIN, 2 for TEST
FIT = dict(epsilon=2.0, delta=1e-3, epochs=1, batch_size=32, lr=0.1, quiet=True, seed=0)
CPU = torch.device("cpu")


class Killed(Exception):
    """Stands for the process being killed mid-build."""


def counted(model: torch.nn.Module, fail_after: int | None = None) -> torch.nn.Module:
    """``model`` whose ``prefix`` calls are counted in ``model.prefix_calls`` (raising Killed after ``fail_after``)."""
    inner = model.prefix
    model.prefix_calls = 0

    def prefix(x: torch.Tensor) -> torch.Tensor:
        if model.prefix_calls == fail_after:
            raise Killed
        model.prefix_calls += 1
        return inner(x)

    model.prefix = prefix
    return model


def trained(model: torch.nn.Module, **cache) -> tuple[dict[str, torch.Tensor], float]:
    result = dp_taft.fit(model, TRAIN, eval_set=TEST, **FIT, **cache)
    return trainable_state(model), result.history[-1].eval_loss


def test_ram_and_mapped_caches_train_exactly_alike_and_like_no_cache(tmp_path):
    ram_state, ram_loss = trained(taft(tiny_vit(), 1), cache_prefix=True)
    for cache in (dict(cache_prefix="disk"), dict(cache_dir=tmp_path), dict(cache_dir=tmp_path)):  # built, reused
        state, loss = trained(taft(tiny_vit(), 1), **cache)
        assert loss == ram_loss and all(torch.equal(state[k], ram_state[k]) for k in ram_state)
    plain_state, plain_loss = trained(taft(tiny_vit(), 1), cache_prefix=False)
    for k in plain_state:
        torch.testing.assert_close(ram_state[k], plain_state[k], rtol=1e-4, atol=1e-6)
    assert plain_loss == pytest.approx(ram_loss, rel=1e-4)


def test_a_stored_cache_is_reused_exactly_when_prefix_data_and_dtype_match(tmp_path):
    backbone = tiny_vit()

    def calls(model: torch.nn.Module, data=TRAIN, **cache) -> int:
        model = counted(model)
        dp_taft.fit(model, data, eval_set=TEST, cache_dir=tmp_path, **FIT, **cache)
        return model.prefix_calls

    def changed(path: str) -> torch.nn.Module:
        other = copy.deepcopy(backbone)
        with torch.no_grad():
            other.get_parameter(path).add_(1e-3)
        return other

    assert calls(taft(backbone, 1)) == 5
    assert calls(taft(changed("head.weight"), 1)) == 0  # another head (seed, or head-first stage 2)
    assert calls(taft(changed("blocks.1.mlp.fc1.weight"), 1)) == 0  # linearized block: not in the prefix
    assert calls(nlft(backbone, 1)) == 0  # NLFT-k runs the same prefix as TAFT-k
    assert calls(taft(changed("blocks.0.mlp.fc1.weight"), 1)) == 5  # w0 of the prefix changed
    assert calls(taft(changed("pos_embed"), 1)) == 5
    assert calls(taft(backbone, 2)) == 5  # another k: another prefix
    assert calls(linear_probe(backbone)) == 5  # pooled features
    assert calls(taft(backbone, 1), data=easy_dataset(96, seed=7)) == 3  # other training data; eval reused
    assert calls(taft(backbone, 1), cache_dtype="bf16") == 5
    assert calls(taft(backbone, 1), cache_dtype=torch.bfloat16) == 0
    assert len(list(tmp_path.glob("*.meta.pt"))) == len(list(tmp_path.glob("*.bin"))) == 13


def test_an_interrupted_build_is_never_reused(tmp_path):
    with pytest.raises(Killed):
        dp_taft.fit(counted(taft(tiny_vit(), 1), fail_after=2), TRAIN, cache_dir=tmp_path, **FIT)
    assert list(tmp_path.iterdir()) == []  # partial file deleted, no completion marker
    model = counted(taft(tiny_vit(), 1))
    dp_taft.fit(model, TRAIN, cache_dir=tmp_path, **FIT)
    assert model.prefix_calls == 3
    # killed between the data file and its marker: the data is there, the marker is not
    next(tmp_path.glob("*.meta.pt")).unlink()
    # and the partial file of a builder killed on this host stays behind
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    key = cache_key(model, TRAIN, torch.float32)
    stale = tmp_path / f"{key}.{socket.gethostname()}.{int(dead.stdout)}.part"
    stale.write_bytes(b"torn")
    model = counted(taft(tiny_vit(), 1))
    dp_taft.fit(model, TRAIN, cache_dir=tmp_path, **FIT)
    assert model.prefix_calls == 3 and not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{key}.bin", f"{key}.meta.pt"]
    assert {p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {0o600}  # features and labels of private data


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == prefix_cache.__name__]


def test_auto_maps_a_temporary_file_when_memory_is_short_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(prefix_cache, "available_memory", lambda: 100_000)  # bytes; TRAIN's cache needs 208,896
    with caplog.at_level(logging.INFO, logger=prefix_cache.__name__):
        state, loss = trained(taft(tiny_vit(), 1))
    train, evaluation = _messages(caplog)
    assert train.startswith("prefix cache (train): 96 x (17, 32) float32, 0.00 GiB, memory-mapped file "
                            "(over 50% of 0.0 GiB available), in ")
    assert "(deleted after use; name a cache_dir to keep it)" in evaluation
    temporary = [Path(re.search(r", in (\S+) \(deleted", m).group(1)) for m in (train, evaluation)]
    gc.collect()
    assert not any(p.exists() for p in temporary)
    caplog.clear()
    monkeypatch.setattr(prefix_cache, "available_memory", lambda: 1 << 40)
    with caplog.at_level(logging.INFO, logger=prefix_cache.__name__):
        ram_state, ram_loss = trained(taft(tiny_vit(), 1))
    assert _messages(caplog)[0].endswith("in RAM (within 50% of 1024.0 GiB available)")
    assert loss == ram_loss and all(torch.equal(state[k], ram_state[k]) for k in state)


def test_available_memory_reads_meminfo():
    free = prefix_cache.available_memory()
    assert free is None or 0 < free <= 1 << 50


@pytest.mark.parametrize("dtype, bits", [("bf16", 8), ("fp16", 11)])
def test_16_bit_storage_rounds_within_its_precision(tmp_path, dtype, bits):
    model = taft(tiny_vit(), 1).eval()
    exact = build_prefix_cache(model, TRAIN, CacheSpec("ram"), batch_size=32, device=CPU, quiet=True, desc="t")
    for spec in (CacheSpec("ram", dtype=prefix_cache.STORAGE_DTYPES[dtype]),
                 CacheSpec("disk", tmp_path, prefix_cache.STORAGE_DTYPES[dtype])):
        stored = build_prefix_cache(model, TRAIN, spec, batch_size=32, device=CPU, quiet=True, desc="t")
        assert stored.nbytes * 2 == exact.nbytes and torch.equal(stored.y, exact.y)
        h = torch.stack([stored[i][0] for i in range(len(stored))])
        assert h.dtype == torch.float32
        error = (h - exact.h).abs()
        # round to nearest: half a unit in the last of `bits` significant bits (2^-25: fp16 subnormals)
        assert (error <= 2.0 ** -bits * exact.h.abs() + 2.0 ** -25).all() and error.max() > 0


def test_fp16_overflow_is_refused(tmp_path):
    model = taft(tiny_vit(), 1).eval()
    with torch.no_grad():
        model.frozen_prefix.pos_embed.add_(1e5)
    spec = CacheSpec("disk", tmp_path, torch.float16)
    with pytest.raises(ValueError, match="overflow cache_dtype torch.float16 .* use cache_dtype='bf16'"):
        build_prefix_cache(model, TRAIN, spec, batch_size=32, device=CPU, quiet=True, desc="t")
    assert list(tmp_path.iterdir()) == []


def test_a_mapped_cache_is_shared_read_only_and_pickles_as_its_path(tmp_path):
    cache = build_prefix_cache(taft(tiny_vit(), 1).eval(), TRAIN, CacheSpec("disk", tmp_path), batch_size=32,
                               device=CPU, quiet=True, desc="t")
    maps = Path("/proc/self/maps")
    if maps.exists():
        # A private writable mapping would be charged to the memory commitment, which Linux
        # refuses for a file larger than RAM, the case the file is for.
        modes = {line.split()[1] for line in maps.read_text().splitlines() if line.endswith(str(cache.path))}
        assert modes == {"r--s"}
    x, _ = cache[0]
    x.add_(1.0)  # a copy: the store is untouched
    assert not torch.equal(x, cache.h[0])
    blob = pickle.dumps(cache)
    assert len(blob) < cache.nbytes / 10
    back = pickle.loads(blob)
    assert back.path == cache.path and torch.equal(back.h, cache.h) and torch.equal(back.y, cache.y)


@pytest.mark.parametrize("cache, match", [
    (dict(cache_prefix="yes"), "cache_prefix must be 'auto'"),
    (dict(cache_prefix=None), "cache_prefix must be 'auto'"),
    (dict(cache_dtype="int8"), "cache_dtype must be None"),
    (dict(cache_dtype=torch.float64), "cache_dtype must be None"),
    (dict(cache_dir=3), "cache_dir must be a directory path"),
    (dict(cache_prefix=True, cache_dir="somewhere"), "never reads cache_dir"),
    (dict(cache_prefix=False, cache_dtype="bf16"), "cache_prefix=False turns off"),
])
def test_bad_cache_arguments_are_refused(cache, match):
    with pytest.raises(ValueError, match=match):
        dp_taft.fit(linear_probe(tiny_vit()), TRAIN, **FIT, **cache)


def test_the_sweep_computes_each_distinct_prefix_once(tmp_path, backbone_file, monkeypatch):
    sweep = pytest.importorskip("experiments.sweep")
    calls = []
    for cls in (TangentViT, NLFTViT, LinearProbe):
        def prefix(self, x, original=cls.prefix):
            calls.append(type(self).__name__)
            return original(self, x)

        monkeypatch.setattr(cls, "prefix", prefix)
    argv = ["--smoke", "--checkpoint", str(backbone_file), "--methods", "fc", "taft", "nlft", "--epsilons", "1",
            "--no-progress"]
    # smoke: 128 training and 128 test images in physical batches of 32, so 8 calls per
    # prefix; the distinct ones are FC's pooled features and the tokens TAFT-2 and NLFT-2 share
    assert sweep.main([*argv, "--out", str(tmp_path / "reused")]) == 0
    assert calls == ["LinearProbe"] * 8 + ["TangentViT"] * 8
    calls.clear()
    assert sweep.main([*argv, "--out", str(tmp_path / "recomputed"), "--no-prefix-reuse"]) == 0
    assert calls == ["LinearProbe"] * 8 + ["TangentViT"] * 8 + ["NLFTViT"] * 8
