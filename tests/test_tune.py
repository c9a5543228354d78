"""experiments.tune: the design is fair, the proxy is public, the winners reach the sweep.

The end-to-end test runs the ``--smoke`` profile (a 1-epoch proxy backbone, two private and two
non-private trials per method) and then a smoke sweep that reads the written ``tuned.toml``.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections import Counter
from pathlib import Path

import pytest
import torch

from dp_taft.presets import TUNED_FILE
from experiments import results as res
from experiments import sweep as sw
from experiments import sweep_config as sc
from experiments import tune

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def smoke_tune(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tune")
    assert tune.main(["--smoke", "--out", str(out / "run"), "--cache-dir", str(out / "cache"), "--quiet"]) == 0
    return out


# --------------------------------------------------------------------------- the design
def test_design_is_a_balanced_latin_hypercube():
    space = {"lr": {"log": [0.1, 10.0]}, "batch_size": [1, 2, 3], "loss": ["ce", "square"]}
    configs = tune.design(space, 12, seed=0)
    assert len(configs) == 12
    assert Counter(c["batch_size"] for c in configs) == {1: 4, 2: 4, 3: 4}
    assert Counter(c["loss"] for c in configs) == {"ce": 6, "square": 6}
    # one lr per equal log-width stratum of [0.1, 10]
    strata = sorted(int(12 * (math.log(c["lr"]) - math.log(0.1)) / (math.log(10) - math.log(0.1))) for c in configs)
    assert strata == list(range(12))
    assert tune.design(space, 12, seed=0) == configs and tune.design(space, 12, seed=1) != configs


def test_methods_share_the_trials_of_their_common_keys():
    settings, spaces, _ = tune.load_config(tune.DEFAULT_CONFIG, "default")
    taft = tune.design(spaces["taft"], settings["trials"], settings["search_seed"])
    head = tune.design(spaces["taft_head"], settings["trials"], settings["search_seed"])
    assert "head_epochs" in head[0] and "head_epochs" not in taft[0]
    assert [{k: c[k] for k in taft[0]} for c in head] == taft


def test_nonprivate_phase_is_the_private_design_over_its_own_lr_range():
    """Issue 20: the epsilon = inf settings got 3 lr-only trials around the private winner, and
    every method picked the largest lr drawn. They must get the private trials' budget and design:
    trial by trial the same settings, lr in the same stratum of the non-private range."""
    settings, spaces, np_space = tune.load_config(tune.DEFAULT_CONFIG, "default")
    (lo, hi), (p_lo, p_hi), n = np_space["lr"]["log"], spaces["fc"]["lr"]["log"], settings["trials"]
    assert (lo, hi) != (p_lo, p_hi) and lo < p_lo and hi > p_hi  # its own, wider range

    def strata(configs, a, b):
        return [int(n * (math.log(c["lr"]) - math.log(a)) / (math.log(b) - math.log(a))) for c in configs]

    for method in settings["methods"]:
        private = tune.phase_configs(settings, spaces, np_space, "private", method)
        nonprivate = tune.phase_configs(settings, spaces, np_space, "nonprivate", method)
        assert len(nonprivate) == len(private) == n
        assert [{**c, "lr": None} for c in nonprivate] == [{**c, "lr": None} for c in private]
        assert all(lo <= c["lr"] <= hi for c in nonprivate)
        assert strata(nonprivate, lo, hi) == strata(private, p_lo, p_hi)
        assert sorted(strata(nonprivate, lo, hi)) == list(range(n))
        assert {c["clipping"] for c in nonprivate} == set(spaces[method]["clipping"])  # a tuned choice here too
    assert {k for k, v in spaces["taft_head"].items() if isinstance(v, list) and len(v) > 1} >= {
        "epochs", "batch_size", "loss", "averaging", "lr_schedule", "clipping", "momentum", "head_epochs"}


def test_every_method_gets_the_same_budget():
    settings, spaces, _ = tune.load_config(tune.DEFAULT_CONFIG, "default")
    assert set(spaces) == set(settings["methods"]) == set(sc.METHODS)
    assert {len(tune.design(spaces[m], settings["trials"], 0)) for m in spaces} == {settings["trials"]}


@pytest.mark.parametrize("change, match", [
    ({"proxy_classes": [2, 3]}, "never saw"),
    ({"public_classes": [0, 7]}, "public classes in 0..4"),
    ({"epsilon": math.inf}, "finite"),
    ({"trials": 0}, "trials"),
    ({"bogus": 1}, "unknown"),
])
def test_config_errors(tmp_path, change, match):
    head, sep, rest = tune.DEFAULT_CONFIG.read_text().partition("\n[space]\n")
    for key, value in change.items():
        line = f"{key} = {'inf' if value == math.inf else json.dumps(value)}"
        head, n = re.subn(rf"^{key} = .*$", line, head, flags=re.MULTILINE)
        head += "" if n else line + "\n"
    path = tmp_path / "t.toml"
    path.write_text(head + sep + rest)
    with pytest.raises(ValueError, match=match):
        tune.load_config(path, "default")


def test_unknown_hyperparameter_in_space_is_an_error(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(tune.DEFAULT_CONFIG.read_text().replace("[space]\n", "[space]\nlearning_rate = [1.0]\n"))
    with pytest.raises(ValueError, match="learning_rate"):
        tune.load_config(path, "default")


# --------------------------------------------------------------------------- the proxy is public
def test_proxy_holds_only_public_images_of_the_proxy_classes(tmp_path, backbone_file):
    from experiments.data import PUBLIC_MEAN, PUBLIC_STD, load_fashion_mnist

    settings, _, _ = tune.load_config(tune.DEFAULT_CONFIG, "default")
    task = tune.proxy_task(settings, backbone_file)
    raw = load_fashion_mnist()
    images, labels = task.train.tensors
    assert len(labels) == settings["proxy_train_size"] and task.num_classes == 2
    pixels = torch.round((images.squeeze(1) * PUBLIC_STD + PUBLIC_MEAN) * 255).to(torch.uint8)
    public = {bytes(raw.train_images[i].numpy()): int(raw.train_labels[i])
              for i in torch.isin(raw.train_labels, torch.tensor([3, 4])).nonzero().squeeze(1).tolist()}
    assert all(public.get(bytes(p.numpy())) == 3 + int(y) for p, y in zip(pixels, labels))
    test_images, test_labels = task.test.tensors
    assert len(test_labels) == 2000 and set(test_labels.tolist()) == {0, 1}


# --------------------------------------------------------------------------- end to end
def test_smoke_tuning_writes_winners_the_sweep_reads(smoke_tune, tmp_path, backbone_file):
    run = smoke_tune / "run"
    rows = res.read_rows(run / tune.CSV_NAME)
    settings, _, _ = tune.load_config(tune.DEFAULT_CONFIG, "smoke")
    per = Counter((r["phase"], r["method"]) for r in rows)
    assert per == {(p, m): settings["trials"] for m in settings["methods"] for p in tune.PHASES}
    assert all(r["status"] == "ok" for r in rows)
    assert {r["target_epsilon"] for r in rows if r["phase"] == "private"} == {"1"}
    tuned = tomllib.loads((run / tune.TUNED_NAME).read_text())
    for method in settings["methods"]:
        win = tune.select(rows, "private", method)
        assert float(win["accuracy"]) == max(float(r["accuracy"]) for r in rows
                                             if r["method"] == method and r["phase"] == "private")
        assert tuned["hparams"][method] == tune.fit_kwargs(json.loads(win["hparams"]))
        # every setting of the non-private winner, "none" included: it must replace the private one's
        assert tuned["nonprivate"][method] == json.loads(tune.select(rows, "nonprivate", method)["hparams"])
    assert "Budget: 2 trials per method" in (run / tune.TUNED_NAME).read_text()
    # the sweep resolves [hparams] -> [hparams.<method>] -> tuned -> profile
    config = tmp_path / "sweep.toml"
    (tmp_path / "mine.toml").write_text((run / tune.TUNED_NAME).read_text())
    config.write_text(sc.DEFAULT_CONFIG.read_text().replace("[sweep]\n", '[sweep]\ntuned = "mine.toml"\n', 1)
                      .replace('tuned = "dp_taft.presets"', "", 1))
    sweep, hparams, nonprivate = sc.load_config(config, "default")
    inf_runs = {r.method: dict(r.hparams) for r in sw.plan_runs(sweep, hparams, nonprivate) if math.isinf(r.epsilon)}
    for method in settings["methods"]:
        expected = {**tuned["hparams"][method]}
        assert {k: hparams[method][k] for k in expected} == expected
        # the epsilon = inf runs train with the non-private winner's settings, all of them
        assert {k: inf_runs[method][k] for k in tuned["nonprivate"][method]} == tuned["nonprivate"][method]
        config_inf = sc.run_config(method, 2, inf_runs[method], epsilon=None)
        np_winner = json.loads(tune.select(rows, "nonprivate", method)["hparams"])
        assert config_inf.privacy.clipping == np_winner["clipping"] and config_inf.optim.lr == np_winner["lr"]
        assert (config_inf.optim.averaging is None) == (np_winner["averaging"] == "none")
    _, untuned, _ = sc.load_config(config, "default", tuned=False)
    assert untuned["taft"]["lr"] == tomllib.loads(config.read_text())["hparams"]["lr"]


def test_resume_skips_finished_trials_and_refuses_another_configuration(smoke_tune, tmp_path):
    run, cache = smoke_tune / "run", str(smoke_tune / "cache")
    before = res.read_rows(run / tune.CSV_NAME)
    assert tune.main(["--smoke", "--out", str(run), "--cache-dir", cache, "--quiet"]) == 0
    assert len(res.read_rows(run / tune.CSV_NAME)) == len(before)
    other = tmp_path / "t.toml"
    other.write_text(tune.DEFAULT_CONFIG.read_text().replace("search_seed = 0", "search_seed = 5"))
    assert tune.main(["--config", str(other), "--smoke", "--out", str(run), "--quiet"]) == 2
    # another non-private lr range: the private trials, copied into a new --out, are reused as they are
    wider = tmp_path / "w.toml"
    wider.write_text(re.sub(r"(\[nonprivate_space\][^\[]*?)lr = \{[^}]*\}", r"\1lr = { log = [0.02, 20.0] }",
                            tune.DEFAULT_CONFIG.read_text(), flags=re.DOTALL))
    assert tune.load_config(wider, "smoke")[2] == {"lr": {"log": [0.02, 20.0]}}
    assert tune.main(["--config", str(wider), "--smoke", "--out", str(run), "--quiet"]) == 2
    private = [r for r in before if r["phase"] == "private"]
    for row in private:
        res.append_row(tmp_path / "new" / tune.CSV_NAME, row, tune.COLUMNS)
    assert tune.main(["--config", str(wider), "--smoke", "--out", str(tmp_path / "new"), "--cache-dir", cache,
                      "--quiet"]) == 0
    after = res.read_rows(tmp_path / "new" / tune.CSV_NAME)
    assert [r for r in after if r["phase"] == "private"] == private  # not rerun
    assert sorted(json.loads(r["hparams"])["lr"] for r in after if r["phase"] == "nonprivate") != sorted(
        json.loads(r["hparams"])["lr"] for r in before if r["phase"] == "nonprivate")


def test_sweep_says_how_to_get_a_missing_tuned_file(tmp_path):
    config = tmp_path / "sweep.toml"
    config.write_text(sc.DEFAULT_CONFIG.read_text().replace("[sweep]\n", '[sweep]\ntuned = "absent.toml"\n', 1)
                      .replace('tuned = "dp_taft.presets"', "", 1))
    with pytest.raises(ValueError, match="experiments.tune"):
        sc.load_config(config, "default")


def test_every_default_sweep_setting_traces_to_the_proxy_or_an_a_priori_choice():
    """Issue: a setting chosen on private data (momentum from an early probe) was outside the ε.
    Every hyperparameter a default sweep run uses must come from the tuned file (public proxy)
    or be marked in sweep.toml as fixed a priori / without effect on the results; the tuning
    space must cover what the tuned file sets."""
    _, hparams, nonprivate = sc.load_config(sc.DEFAULT_CONFIG, "default")
    tuned = tomllib.loads(TUNED_FILE.read_text())
    declared = {}
    table = re.split(r"^\[hparams\]$", sc.DEFAULT_CONFIG.read_text(), maxsplit=1, flags=re.M)[1]
    for line in table.split("\n[", 1)[0].splitlines():
        if m := re.match(r"(\w+)\s*=[^#]*#\s*(.*)", line):
            declared[m[1]] = m[2]
    a_priori = {k for k, why in declared.items() if why.startswith("a priori") or "no effect on results" in why}
    _, spaces, _ = tune.load_config(tune.DEFAULT_CONFIG, "default")
    for method, hp in hparams.items():
        from_proxy = set(tuned["hparams"][method])
        assert set(hp) <= from_proxy | a_priori, (method, sorted(set(hp) - from_proxy - a_priori))
        assert from_proxy <= set(spaces[method]), method
        assert {"momentum", "lr", "epochs", "batch_size"} <= from_proxy, method
        assert set(nonprivate[method]) <= set(tuned["nonprivate"][method]), method
