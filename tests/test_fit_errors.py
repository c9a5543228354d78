"""Every bad input to dp_taft.fit is refused before training, with a message saying what to change."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import dp_taft
from dp_taft.methods import linear_probe, nlft
from fit_cases import easy_dataset, tiny_vit

DATA = easy_dataset(30)
OK = dict(epsilon=2.0, delta=1e-3, epochs=1, batch_size=10, quiet=True)


def probe():
    return linear_probe(tiny_vit())


def call(model=None, data=DATA, **overrides):
    return dp_taft.fit(model if model is not None else probe(), data, **{**OK, **overrides})


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(epsilon=0.0), r"epsilon must be a finite number > 0 .*pass None"),
        (dict(epsilon=-1.0), r"epsilon must be a finite number > 0"),
        (dict(epsilon=math.nan), r"epsilon must be a finite number > 0"),
        (dict(delta=0.0), r"delta must be a finite number > 0"),
        (dict(delta=1.0), r"delta must be in \(0, 1\)"),
        (dict(delta=0.05), r"delta=0.05 is >= 1/N .*N=30.*delta < 1/N"),
        (dict(max_grad_norm=-1), r"max_grad_norm must be a finite number > 0 \(per-sample clipping norm C\), got -1"),
        (dict(max_grad_norm=0.0), r"max_grad_norm must be a finite number > 0"),
        (dict(batch_size=31), r"batch_size must be an integer in \[1, 30\]"),
        (dict(batch_size=0), r"batch_size must be an integer in \[1, 30\]"),
        (dict(epochs=0), r"epochs must be an integer >= 1"),
        (dict(loss="hinge"), r"unknown loss 'hinge': use one of \['ce', 'square'\]"),
        (dict(optimizer="lbfgs"), r"unknown optimizer 'lbfgs': use one of \['adam', 'adamw', 'sgd'\]"),
        (dict(accountant="prv"), r"unknown accountant 'prv': use one of \['pld', 'rdp'\]"),
        (dict(grad_sample_mode="functorch"), r"unknown grad_sample_mode 'functorch'"),
        (dict(lr=-0.1), r"lr must be a finite number >= 0"),
        (dict(physical_batch_size=0), r"physical_batch_size must be an integer >= 1"),
        (dict(checkpoint_every=0), r"checkpoint_every must be an integer >= 1"),
        (dict(epsilon=1e-4, epochs=50, batch_size=30), r"unreachable .*Raise epsilon"),
        (dict(seed=-1), r"seed must be an integer >= 0 .*None \(default\) keeps the randomness secret"),
        (dict(seed=1.5), r"seed must be an integer"),
        (dict(secure_mode=True, seed=3), r"secure_mode=True draws from the OS CSPRNG, which cannot be seeded"),
        (dict(secure_mode="yes"), r"secure_mode must be True or False"),
        (dict(grad_sample_hook=lambda i, p: None, grad_sample_mode="ghost"), r"grad_sample_hook needs grad_sample_mode='hooks'"),
        (dict(grad_sample_hook=3), r"grad_sample_hook must be a callable"),
        (dict(stage=""), r"stage must be a non-empty string"),
    ],
)
def test_bad_arguments(overrides, match):
    with pytest.raises(ValueError, match=match):
        call(**overrides)


def test_empty_dataset():
    empty = TensorDataset(torch.zeros(0, 3, 16, 16), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="train_set is empty"):
        call(data=empty)


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        (torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long), r"shape \(3, 8, 8\), the model expects \(C, H, W\) = \(3, 16, 16\)"),
        (torch.zeros(4, 1, 16, 16), torch.zeros(4, dtype=torch.long), r"shape \(1, 16, 16\)"),
        (torch.zeros(4, 3, 16, 16, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), r"floating-point tensors"),
        (torch.zeros(4, 3, 16, 16), torch.tensor([0, 1, 3, 2]), r"example 2 has label 3, outside \[0, 3\)"),
        (torch.zeros(4, 3, 16, 16), torch.tensor([0, -1, 1, 2]), r"example 1 has label -1"),
        (torch.zeros(4, 3, 16, 16), torch.zeros(4), r"labels must be integer class indices"),
    ],
    ids=["small-image", "channels", "uint8", "label-high", "label-negative", "float-labels"],
)
def test_bad_examples(x, y, match):
    with pytest.raises(ValueError, match=match):
        call(data=TensorDataset(x, y), batch_size=2, delta=1e-2)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_inputs_are_refused_before_any_budget_is_spent(tmp_path, bad):
    x = easy_dataset(30).tensors[0].clone()
    x[17, 1, 3, 4] = bad
    with pytest.raises(ValueError, match="example 17 has NaN or inf pixels.*no privacy budget was spent"):
        call(data=TensorDataset(x, DATA.tensors[1]), checkpoint_dir=tmp_path)
    assert not (tmp_path / "ledger.jsonl").exists()


def test_model_without_trainable_parameters():
    model = probe().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        call(model)


def test_layers_opacus_cannot_sample_exactly_are_named():
    model = nlft(tiny_vit(), 1)
    model.net.cls_token.requires_grad_(True)  # owned directly by the VisionTransformer: no Opacus sampler
    with pytest.raises(dp_taft.UnsupportedModelError,
                       match=r"'net' \(timm\.models\.vision_transformer\.VisionTransformer, owning cls_token\)"):
        call(model)


def test_raw_timm_vit_names_its_parameters_and_points_to_the_conversions():
    with pytest.raises(dp_taft.UnsupportedModelError,
                       match=r"'<the model itself>' .*owning cls_token, pos_embed.*dp_taft\.linearize.*methods\.nlft"):
        call(tiny_vit())


def test_pil_images_are_refused_with_what_to_add():
    from PIL import Image

    class PilImages(torch.utils.data.Dataset):
        def __len__(self):
            return 30

        def __getitem__(self, i):
            return Image.new("RGB", (16, 16)), i % 3

    with pytest.raises(ValueError, match=r"PIL\.Image\.Image, not tensors: add torchvision\.transforms\.ToTensor\(\)"):
        call(data=PilImages())


def test_plain_data_loader_is_refused():
    with pytest.raises(ValueError, match="plain torch DataLoader.*Poisson.*DPDataLoader"):
        call(data=DataLoader(DATA, batch_size=10, shuffle=True))


def test_resume_with_other_privacy_settings_is_refused(tmp_path):
    call(checkpoint_dir=tmp_path, epsilon=None)
    with pytest.raises(ValueError, match="other privacy settings.*epsilon: saved None, now 2.0"):
        call(checkpoint_dir=tmp_path)
