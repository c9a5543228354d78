"""The frozen-prefix cache: RAM and memory-mapped stores, reuse by key (every example checked), crash safety,
salted names, owner-only files, "auto", 16-bit storage."""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import logging
import multiprocessing
import os
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
from dp_taft.privacy import memory, prefix_cache
from dp_taft.privacy.distributed import Comm
from dp_taft.privacy.prefix_cache import CacheSpec, build_prefix_cache
from dp_taft.privacy.prefix_keys import CacheKey, load_salt, prefix_fingerprint, tensor_digest
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
    assert [p.name for p in tmp_path.iterdir()] == ["salt"]  # partial file deleted, no completion marker
    model = counted(taft(tiny_vit(), 1))
    dp_taft.fit(model, TRAIN, cache_dir=tmp_path, **FIT)
    assert model.prefix_calls == 3
    # killed between the data file and its marker: the data is there, the marker is not
    next(tmp_path.glob("*.meta.pt")).unlink()
    # and the partial file of a builder killed on this host stays behind
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    salt = load_salt(tmp_path)
    key = CacheKey.of(salt, model, len(TRAIN), torch.float32)
    stale = tmp_path / f"{key.layout}.{socket.gethostname()}.{int(dead.stdout)}.part"
    stale.write_bytes(b"torn")
    model = counted(taft(tiny_vit(), 1))
    dp_taft.fit(model, TRAIN, cache_dir=tmp_path, **FIT)
    assert model.prefix_calls == 3 and not stale.exists()
    name = key.name(tensor_digest(TRAIN, salt))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{name}.bin", f"{name}.meta.pt", "salt"]
    assert {p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {0o600}  # features and labels of private data


class Examples(torch.utils.data.Dataset):
    """A map-style data set that is not a TensorDataset (read example by example), editable in place."""

    def __init__(self, data: torch.utils.data.TensorDataset) -> None:
        self.x, self.y = (t.clone() for t in data.tensors)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def test_a_stored_cache_is_reused_only_for_the_same_data_every_example_of_it(tmp_path, caplog):
    data = Examples(easy_dataset(300, seed=3))
    # the former key hashed N and these 256 evenly spaced examples of anything but a small TensorDataset
    sampled = {round(j * (len(data) - 1) / 255) for j in range(256)}
    edited = min(set(range(len(data))) - sampled)

    def run(**cache) -> tuple[int, float, dict[str, torch.Tensor], list[str]]:
        caplog.clear()
        model = counted(taft(tiny_vit(), 1))
        with caplog.at_level(logging.INFO, logger=prefix_cache.__name__):
            result = dp_taft.fit(model, data, eval_set=data, **FIT, **cache)  # eval reads the same data
        return model.prefix_calls, result.history[-1].eval_loss, trainable_state(model), _messages(caplog)

    calls, old_loss, old_state, log = run(cache_dir=tmp_path)
    assert calls == 10 and "verified against every example" in log[1]  # train built (10 batches); eval reused it
    calls, loss, _, log = run(cache_dir=tmp_path)
    assert calls == 0 and loss == old_loss and len(log) == 2
    assert all("verified against every example of the data (each one read and hashed)" in m for m in log)
    data.x[edited], data.y[edited] = data.x[edited].flip(-1) + 1.0, (data.y[edited] + 1) % 3  # a correction
    calls, loss, state, log = run(cache_dir=tmp_path)
    assert calls == 10 and "did not match the data" in log[0] and "verified against every example" in log[-1]
    _, fresh_loss, fresh_state, _ = run(cache_prefix=True)  # in RAM, nothing stored: the new data
    assert loss == fresh_loss != old_loss and all(torch.equal(state[k], fresh_state[k]) for k in state)
    assert any(not torch.equal(state[k], old_state[k]) for k in state)
    model = taft(tiny_vit(), 1).eval()
    stored = build_prefix_cache(model, data, CacheSpec("disk", tmp_path), batch_size=32, device=CPU, quiet=True,
                                desc="t")
    exact = build_prefix_cache(model, data, CacheSpec("ram"), batch_size=32, device=CPU, quiet=True, desc="t")
    assert torch.equal(stored.y, data.y) and torch.equal(stored.h, exact.h)
    assert len(list(tmp_path.glob("*.bin"))) == 2  # the cache of the data before the correction stays


class Drifting(Examples):
    """Examples that read differently every time, as under a random transform."""

    reads = 0

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.reads += 1
        x, y = super().__getitem__(i)
        return x + 1e-3 * self.reads, y


def test_a_data_set_that_reads_differently_every_time_is_never_reused(tmp_path):
    data = Drifting(TRAIN)
    for _ in range(2):
        model = counted(taft(tiny_vit(), 1).eval())
        build_prefix_cache(model, data, CacheSpec("disk", tmp_path), batch_size=32, device=CPU, quiet=True, desc="t")
        assert model.prefix_calls == 3
    assert len(list(tmp_path.glob("*.bin"))) == 2


def _old_fingerprints(model: torch.nn.Module, data: torch.utils.data.TensorDataset) -> tuple[str, str]:
    """The former, unsalted (name of ``data``'s float32 cache, data fingerprint): anyone who knows every
    example computes them."""
    digest = hashlib.sha256(f"{type(data).__qualname__};n={len(data)}".encode())
    for t in data.tensors:
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
    blob = json.dumps(["dp_taft.prefix_cache/1", prefix_fingerprint(model), digest.hexdigest(), str(torch.float32)])
    return hashlib.sha256(blob.encode()).hexdigest()[:32], digest.hexdigest()


def test_cache_names_are_salted_and_no_fingerprint_is_logged_or_printed(tmp_path, caplog, capsys):
    model = taft(tiny_vit(), 1)
    quiet = {**FIT, "quiet": False}  # progress bars and the cache lines printed too
    with caplog.at_level(logging.DEBUG):
        for directory in ("a", "b", "a"):  # built twice, in two directories; reused once
            dp_taft.fit(model, TRAIN, eval_set=Examples(TEST), cache_dir=tmp_path / directory, **quiet)
    out = capsys.readouterr()
    shown = f"{caplog.text}\n{out.out}\n{out.err}"
    names = {d: sorted(p.name for p in (tmp_path / d).iterdir()) for d in ("a", "b")}
    listed = "\n".join(names["a"] + names["b"])
    assert "reusing the cache in" in shown and str(tmp_path / "a") in shown
    # The attack on the old scheme: the adversary knows every example and the code.
    for secret in (*_old_fingerprints(model, TRAIN), prefix_fingerprint(model)):
        assert secret[:16] not in shown and secret[:16] not in listed
    # The same data and prefix are named apart in two directories: the name depends on each one's secret salt,
    salts = [(tmp_path / d / "salt").read_bytes() for d in ("a", "b")]
    assert len(salts[0]) == 32 and salts[0] != salts[1] and names["a"] != names["b"]
    # and the salt is what names them (an adversary's guess of it, here zeros, names nothing there).
    key = CacheKey.of(salts[0], model, len(TRAIN), torch.float32)
    assert f"{key.name(tensor_digest(TRAIN, salts[0]))}.bin" in names["a"]
    guess = CacheKey.of(bytes(32), model, len(TRAIN), torch.float32)
    assert f"{guess.name(tensor_digest(TRAIN, bytes(32)))}.bin" not in names["a"]
    assert not any(name.split("-")[0] in shown for name in names["a"] + names["b"] if name != "salt")


@pytest.mark.parametrize("umask", [0o022, 0o277])
def test_cache_directories_are_0700_and_files_0600_whatever_the_umask(tmp_path, umask):
    model = taft(tiny_vit(), 1)
    earlier = tmp_path / "earlier"
    earlier.mkdir(mode=0o755)  # a cache dir made with the umask's mode, e.g. by an older version
    before = os.umask(umask)
    try:
        dp_taft.fit(model, TRAIN, eval_set=Examples(TEST), cache_dir=tmp_path / "new" / "cache", **FIT)
        caches = [build_prefix_cache(model.eval(), TRAIN, spec, batch_size=32, device=CPU, quiet=True, desc="t")
                  for spec in (CacheSpec("disk"), CacheSpec("disk", earlier))]  # a temporary directory; earlier
    finally:
        os.umask(before)
    directories = [tmp_path / "new", tmp_path / "new" / "cache", caches[0].path.parent, earlier]
    assert [d.stat().st_mode & 0o777 for d in directories] == [0o700] * 4
    files = [p for d in directories for p in d.iterdir() if p.is_file()]
    # new/cache: salt, train and eval (data, marker); temporary: data, marker; earlier: salt, data, marker
    assert len(files) == 10 and {f.stat().st_mode & 0o777 for f in files} == {0o600}


def _salt_of(directory: Path, start: multiprocessing.synchronize.Barrier, out: multiprocessing.Queue) -> None:
    start.wait()
    out.put(load_salt(directory))


def test_processes_sharing_a_cache_dir_agree_on_one_salt(tmp_path):
    context = multiprocessing.get_context("fork")  # load_salt runs no torch: forking a torch process is safe here
    start, out = context.Barrier(4), context.Queue()
    racers = [context.Process(target=_salt_of, args=(tmp_path, start, out)) for _ in range(4)]
    for p in racers:
        p.start()
    salts = [out.get(timeout=60) for _ in racers]
    for p in racers:
        p.join(timeout=60)
    assert set(salts) == {(tmp_path / "salt").read_bytes()} and len(salts[0]) == 32
    assert [p.name for p in tmp_path.iterdir()] == ["salt"]  # no temporary file left


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


def test_ranks_on_one_machine_share_its_memory(monkeypatch, caplog):
    """A rank's part needs half of TRAIN's 208,896 bytes; 300 kB fit one part, not each of 4 ranks' parts."""
    monkeypatch.setattr(prefix_cache, "available_memory", lambda: 300_000)
    rank = Comm(rank=1, world=2)
    for local, where in (("1", "in RAM"), ("4", "memory-mapped file")):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=prefix_cache.__name__):
            part = build_prefix_cache(taft(tiny_vit(), 1).eval(), TRAIN, CacheSpec(), batch_size=32, device=CPU,
                                      quiet=True, desc="train", comm=rank)
        assert len(part) == 48 and torch.equal(part.y, TRAIN.tensors[1][48:])  # its block: the second half
        (message,) = _messages(caplog)
        assert message.startswith("prefix cache (train, rank 1 of 2: 48 of 96 examples): 48 x (17, 32)")
        assert where in message and ("this rank's 1/4 of" in message) == (local == "4")


def test_available_memory_reads_meminfo():
    free = memory.available_memory()
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
    assert [p.name for p in tmp_path.iterdir()] == ["salt"]


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


def test_stored_parts_reads_back_every_rank_layout_of_this_prefix_and_nothing_else(tmp_path):
    salt, model = load_salt(tmp_path), taft(tiny_vit(), 1)
    key = CacheKey.of(salt, model, len(TRAIN), torch.float32)
    other_n = CacheKey.of(salt, model, len(TRAIN) + 1, torch.float32)
    for k in (CacheKey(salt, key.fields, "w2r0"), CacheKey(salt, key.fields, "w2r1"), key, other_n):
        (tmp_path / f"{k.name('d' * 32)}.meta.pt").touch()
    (tmp_path / f"{CacheKey(salt, key.fields, 'w3r2').layout}.host.1.part").touch()  # unfinished: not stored
    assert key.stored_parts(tmp_path) == ["w1r0", "w2r0", "w2r1"]
    assert other_n.stored_parts(tmp_path) == ["w1r0"]
