"""dp_taft.config: one typed vocabulary for fit, finetune, presets, the sweep and the tuner.

Checked against independent references: hand-written dictionaries and TOML text, the tuned
file parsed here with tomllib, and the keyword calls of fit / fit_head_first / dp_taft.methods
that the config must reproduce bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from pathlib import Path

import pytest
import torch

import dp_taft
from dp_taft import TrainConfig, finetune, methods
from dp_taft.config import OPTIONS, REQUIRED
from dp_taft.head_first import fit_head_first
from dp_taft.presets import TUNED_FILE, preset
from experiments import sweep_config as sc
from experiments import tune
from fit_cases import easy_dataset, tiny_vit, trainable_state

DATA = easy_dataset(48)
#: A run that touches every group with non-default values (seeded: reproducible, for the test only).
RUN = dict(epsilon=2.0, delta=1e-3, epochs=2, batch_size=12, lr=0.3, momentum=0.5, lr_schedule="cosine",
           averaging="ema", ema_decay=0.9, max_grad_norm=0.5, seed=7, quiet=True)
#: Every option, by group, as a reader writes it (an independent list: the config must match it).
GROUPS = {
    "method": {"name", "blocks", "head_epochs", "head_lr"},
    "privacy": {"epsilon", "delta", "max_grad_norm", "accountant", "clipping", "clipping_gamma", "seed", "secure_mode"},
    "optim": {"epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay", "loss", "kappa", "lr_schedule",
              "warmup", "averaging", "tail_fraction", "ema_decay"},
    "data": {"physical_batch_size", "grad_sample_mode", "cache_prefix", "cache_dir", "cache_dtype", "num_workers",
             "precision"},
    "run": {"device", "checkpoint_dir", "checkpoint_every", "quiet", "show_train_loss", "distributed"},
}


def toml_text(tables: dict[str, dict]) -> str:
    """A minimal TOML writer for flat tables of str, bool, int, float (inf as ``inf``)."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        return "inf" if v == math.inf else repr(v)

    return "\n".join(f"[{t}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in values.items())
                     for t, values in tables.items())


def outcome(result: dp_taft.FitResult) -> tuple:
    """What a run produced, wall times left out."""
    history = [dataclasses.replace(r, wall_time_s=0.0) for r in result.history]
    return (trainable_state(result.model), result.report.to_json() if result.report else None, history,
            result.noise_multiplier, result.steps)


def assert_same(a: tuple, b: tuple) -> None:
    assert a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert a[1:] == b[1:]


# --------------------------------------------------------------------------- the vocabulary
def test_groups_and_flat_names_are_the_documented_ones():
    assert {g: {f.name for f in dataclasses.fields(getattr(TrainConfig(), g))} for g in GROUPS} == GROUPS
    assert OPTIONS == {name: g for g, names in GROUPS.items() for name in names}  # flat names unique
    for g in GROUPS:
        assert all(f.metadata["doc"] for f in dataclasses.fields(getattr(TrainConfig(), g)))
    assert TrainConfig().privacy.epsilon is REQUIRED


def test_to_dict_is_nested_and_toml_ready():
    config = TrainConfig.create(name="nlft", blocks=1, epsilon=None, lr=0.5, cache_dir=Path("/tmp/c"),
                                cache_dtype=torch.bfloat16, device=torch.device("cpu"), averaging="tail")
    d = config.to_dict()
    assert d["method"] == {"name": "nlft", "blocks": 1, "head_epochs": 1}  # head_lr None: left out
    assert d["privacy"] == {"epsilon": math.inf, "max_grad_norm": 1.0, "accountant": "pld", "clipping": "flat",
                            "clipping_gamma": 0.01, "secure_mode": False}
    assert d["optim"]["lr"] == 0.5 and d["optim"]["averaging"] == "tail"
    assert d["data"] == {"grad_sample_mode": "auto", "cache_prefix": "auto", "cache_dir": "/tmp/c",
                         "cache_dtype": "bfloat16", "num_workers": 0, "precision": "fp32"}
    assert d["run"]["device"] == "cpu" and "checkpoint_dir" not in d["run"]
    assert "epsilon" not in TrainConfig().to_dict()["privacy"]  # a missing epsilon stays missing


def test_round_trip_through_dict_json_and_toml(tmp_path):
    configs = [
        TrainConfig.create(**RUN, name="taft-head", blocks=1, head_epochs=2, head_lr=0.05, cache_dir=tmp_path,
                           cache_dtype="bf16", checkpoint_dir=tmp_path / "ck", distributed=False, loss="square"),
        TrainConfig.create(epsilon=None, name="probe", clipping="automatic", secure_mode=True, cache_prefix=False),
        TrainConfig.create(lr=2),  # epsilon still missing
    ]
    for config in configs:
        d = config.to_dict()
        assert TrainConfig.from_dict(d) == config
        assert TrainConfig.from_dict(json.loads(json.dumps(d))) == config
        path = tmp_path / "c.toml"
        path.write_text(toml_text(d))
        assert tomllib.loads(path.read_text()) == d
        assert TrainConfig.from_toml(path) == config
    flat = {"lr": 0.3, "privacy.epsilon": 2.0, "optim": {"epochs": 2}}
    assert TrainConfig.from_dict(flat) == TrainConfig.create(lr=0.3, epsilon=2.0, epochs=2)


def test_serialised_none_and_inf_but_not_in_python():
    config = TrainConfig.from_dict({"privacy": {"epsilon": math.inf, "seed": "none"}, "optim": {"averaging": "none"}})
    assert config.privacy.epsilon is None and config.privacy.seed is None and config.optim.averaging is None
    assert TrainConfig.create(epsilon=math.inf).privacy.epsilon == math.inf  # Python: a value fit refuses
    with pytest.raises(ValueError, match="epsilon must be a finite number"):
        TrainConfig.create(epsilon=math.inf).validate()
    with pytest.raises(ValueError, match="unknown loss 'none'"):  # "none" only where None is allowed
        TrainConfig.from_dict({"loss": "none"})


@pytest.mark.parametrize("bad, match", [
    (dict(lrr=1.0), r"unknown option 'lrr' \(did you mean 'lr'\?\); known: .*batch_size"),
    ({"optim.epsilon": 1.0}, r"'epsilon' belongs to \[privacy\], not \[optim\]"),
    ({"optm.lr": 1.0}, r"unknown option group 'optm' \(did you mean 'optim'\?\)"),
    (dict(lr="fast"), r"lr must be a number, got 'fast'"),
    (dict(epochs=True), r"epochs must be an integer, got True"),
    (dict(seed=1.5), r"seed must be an integer or None"),
    (dict(quiet="no"), r"quiet must be True or False"),
    (dict(optimizer="lbfgs"), r"unknown optimizer 'lbfgs'"),
    (dict(name="lora"), r"unknown name 'lora'.*'taft-head'"),
    (dict(blocks=-1), r"blocks must be an integer >= 0"),
    (dict(cache_prefix="yes"), r"cache_prefix must be 'auto'"),
])
def test_unknown_names_and_bad_values_are_refused_with_the_name(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.create(**bad)


def test_unknown_tables_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"unknown table 'optimiser' \(did you mean 'optim'\?\)"):
        TrainConfig.from_dict({"optimiser": {"lr": 1.0}})
    path = tmp_path / "bad.toml"
    path.write_text("[privacy]\nepsilon = 1.0\n[optim]\nlearning_rate = 1.0\n")
    with pytest.raises(ValueError, match=rf"{path}: unknown option 'learning_rate'"):
        TrainConfig.from_toml(path)


def test_with_sets_parses_toml_values_in_order():
    config = TrainConfig.create(epsilon=1.0).with_sets(
        ["optim.lr=1.0", "lr=2", "epsilon=inf", "averaging=none", "loss=square", 'name="nlft"', "cache_dir=/tmp/x",
         "clipping = automatic", "secure_mode=true"])
    assert config.optim.lr == 2 and config.privacy.epsilon is None and config.optim.averaging is None
    assert config.optim.loss == "square" and config.method.name == "nlft" and config.data.cache_dir == Path("/tmp/x")
    assert config.privacy.clipping == "automatic" and config.privacy.secure_mode is True
    for item, match in (("lr", "expected KEY=VALUE"), ("lrr=1", r"--set 'lrr=1': unknown option 'lrr'"),
                        ("epsilon=abc", r"epsilon must be a number or None, got 'abc'")):
        with pytest.raises(ValueError, match=match):
            TrainConfig().with_sets([item])


# --------------------------------------------------------------------------- fit, fit_head_first, finetune
def test_fit_with_a_config_equals_fit_with_keywords():
    by_keywords = outcome(dp_taft.fit(methods.linear_probe(tiny_vit()), DATA, **RUN))
    config = TrainConfig.create(**RUN)
    assert_same(outcome(dp_taft.fit(methods.linear_probe(tiny_vit()), DATA, config)), by_keywords)
    # keywords override the config; a different config gives a different model
    mixed = outcome(dp_taft.fit(methods.linear_probe(tiny_vit()), DATA, config.replace(lr=0.01), lr=0.3))
    assert_same(mixed, by_keywords)
    other = outcome(dp_taft.fit(methods.linear_probe(tiny_vit()), DATA, config.replace(lr=0.01)))
    assert not torch.equal(other[0]["head.weight"], by_keywords[0]["head.weight"])


def test_fit_refuses_unknown_options_and_a_missing_epsilon():
    model = methods.linear_probe(tiny_vit())
    with pytest.raises(TypeError, match=r"fit\(\) got an unknown option 'lrr' \(did you mean 'lr'\?\)"):
        dp_taft.fit(model, DATA, epsilon=1.0, lrr=0.1)
    with pytest.raises(TypeError, match=r"'blocks'.*dp_taft.finetune"):
        dp_taft.fit(model, DATA, epsilon=1.0, blocks=2)
    for call in (lambda: dp_taft.fit(model, DATA, batch_size=12), lambda: dp_taft.fit(model, DATA, TrainConfig()),
                 lambda: finetune(tiny_vit(), DATA, TrainConfig()), TrainConfig().validate):
        with pytest.raises(ValueError, match=r"epsilon is required: a target ε > 0, or None to train without privacy"):
            call()


@pytest.mark.parametrize("name", ["probe", "taft", "nlft", "taft-head"])
def test_finetune_builds_and_trains_what_the_method_names(name):
    options = dict(RUN, epochs=1)
    config = TrainConfig.create(name=name, blocks=1, head_epochs=1, head_lr=0.1, **options)
    got = outcome(finetune(tiny_vit(), DATA, config, eval_set=DATA))
    if name == "taft-head":  # the existing keyword API of the two-stage method
        want = fit_head_first(tiny_vit(), 1, DATA, eval_set=DATA, head_epochs=1, head_lr=0.1, **options)
    else:
        model = {"probe": methods.linear_probe, "taft": lambda v: methods.taft(v, 1),
                 "nlft": lambda v: methods.nlft(v, 1)}[name](tiny_vit())
        want = dp_taft.fit(model, DATA, eval_set=DATA, **options)
    assert_same(got, outcome(want))
    assert got[2][-1].eval_accuracy is not None


# --------------------------------------------------------------------------- presets
def test_preset_is_the_tuned_file():
    tuned = tomllib.loads(TUNED_FILE.read_text())
    labels = {"probe": "fc", "taft": "taft", "taft-head": "taft_head", "nlft": "nlft"}
    defaults = TrainConfig.create(epsilon=3.0)
    for name, label in labels.items():
        private, nonprivate = preset(name, epsilon=3.0), preset(name, private=False)
        assert private.method.name == name and private.privacy.epsilon == 3.0 and nonprivate.privacy.epsilon is None
        for option in OPTIONS:
            if option in ("name", "epsilon"):
                continue
            want = tuned["hparams"][label].get(option, defaults.to_dict()[OPTIONS[option]].get(option))
            assert private.to_dict()[OPTIONS[option]].get(option) == want, (name, option)
            want_np = tuned["nonprivate"][label].get(option, want)
            want_np = None if want_np == "none" else want_np  # the file's spelling of None (averaging)
            assert nonprivate.to_dict()[OPTIONS[option]].get(option) == want_np, (name, option)
    assert preset("nlft").privacy.epsilon is REQUIRED
    with pytest.raises(ValueError, match=r"unknown method 'fc'; known: .*label of 'probe'"):
        preset("fc")
    with pytest.raises(ValueError, match="private=False"):
        preset("taft", private=False, epsilon=1.0)


def test_preset_is_what_the_default_sweep_runs():
    """The library's presets and the published sweep's settings are one and the same."""
    sweep, hparams, nonprivate = sc.load_config(sc.DEFAULT_CONFIG, "default")
    for label, hp in hparams.items():
        name = {"fc": "probe", "taft_head": "taft-head"}.get(label, label)
        k = 0 if label == "fc" else sweep["blocks"][0]
        assert sc.run_config(label, k, hp, epsilon=3.0) == preset(name, epsilon=3.0).replace(blocks=k)
        assert (sc.run_config(label, k, {**hp, **nonprivate[label]}, epsilon=None)
                == preset(name, private=False).replace(blocks=k))


# --------------------------------------------------------------------------- the sweep and the tuner
def test_sweep_and_tune_accept_exactly_the_config_options(tmp_path):
    assert sc.HPARAM_KEYS | sc.RUN_OPTIONS == set(OPTIONS) and not sc.HPARAM_KEYS & sc.RUN_OPTIONS
    assert sc.RUN_OPTIONS >= {"name", "blocks", "epsilon", "delta", "seed", "show_train_loss"}
    hp = {m: {} for m in sc.METHODS}
    defaults = {option: v for group in TrainConfig().to_dict().values() for option, v in group.items()}
    values = {k: defaults.get(k, "none") for k in sc.HPARAM_KEYS}  # None is "none" in TOML
    sc.apply_sets(hp, [f"{k}={json.dumps(v)}" for k, v in values.items()], None)
    assert hp["taft"] == values
    sc.apply_sets(hp, ["optim.lr=0.7", "nlft.optim.lr=0.9"], None)  # "group.name" keys too
    assert hp["taft"]["lr"] == 0.7 and hp["nlft"]["lr"] == 0.9
    for key in sc.RUN_OPTIONS:
        with pytest.raises(ValueError, match=f"'{key}' is not a hyperparameter: the sweep sets it"):
            sc.apply_sets(hp, [f"{key}=1"], None)
    # the tuner's search space takes the same keys
    space = "".join(f"{k} = [{json.dumps(v)}]\n" for k, v in values.items())
    head, rest = tune.DEFAULT_CONFIG.read_text().split("\n[space]\n", 1)
    text = f"{head}\n[space]\n{space}\n[nonprivate_space]\n{rest.split('[nonprivate_space]', 1)[1]}"
    (tmp_path / "t.toml").write_text(text)
    _, spaces, _ = tune.load_config(tmp_path / "t.toml", "default")
    assert set(spaces["taft_head"]) == sc.HPARAM_KEYS
    (tmp_path / "u.toml").write_text(text.replace("[space]\n", "[space]\nseed = [1]\n", 1))
    with pytest.raises(ValueError, match="'seed' is not a hyperparameter"):
        tune.load_config(tmp_path / "u.toml", "default")


def test_sweep_and_tune_check_values_with_the_config():
    _, hparams, nonprivate = sc.load_config(sc.DEFAULT_CONFIG, "smoke")
    sc.check_hparams(hparams, nonprivate)
    sc.apply_sets(hparams, ["nonprivate.nlft.lr=fast"], nonprivate)
    with pytest.raises(ValueError, match=r"nlft \(non-private\): lr must be a number, got 'fast'"):
        sc.check_hparams(hparams, nonprivate)
    with pytest.raises(ValueError, match=r"\[space\].loss: unknown loss 'hinge'"):
        tune._check_spec("loss", ["ce", "hinge"], "[space]")
