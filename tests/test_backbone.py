"""dp_taft.backbone: local weights through timm's loader, architecture checks, the model's input pipeline."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from PIL import Image

from dp_taft.backbone import BackboneSpec, WeightsMismatchError, create_backbone, data_config, eval_transform

NAME = "vit_tiny_patch16_224"
TINY = dict(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # an accidental download fails instead of hanging


def _source(num_classes: int = 5, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(NAME, pretrained=False, num_classes=num_classes, **{**TINY, **overrides})


def _save(state: dict[str, torch.Tensor], path, fmt: str) -> None:
    if fmt == "safetensors":
        safetensors.torch.save_file(state, str(path))
    elif fmt == "checkpoint":  # what training scripts write: the weights under "state_dict"
        torch.save({"state_dict": state, "epoch": 3}, path)
    else:
        torch.save(state, path)


@pytest.mark.parametrize("fmt, suffix", [("safetensors", ".safetensors"), ("plain", ".pth"), ("plain", ".bin"),
                                         ("checkpoint", ".pt")])
def test_loads_the_saved_weights(tmp_path, fmt, suffix):
    source = _source()
    path = tmp_path / f"w{suffix}"
    _save(source.state_dict(), path, fmt)
    model = create_backbone(NAME, 5, weights=path, model_kwargs=TINY)
    assert not model.training
    want, got = source.state_dict(), model.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)  # the head too: same class count


def test_other_class_count_gets_a_fresh_head_and_the_rest_of_the_weights(tmp_path):
    source = _source()
    safetensors.torch.save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    torch.manual_seed(123)
    model = create_backbone(NAME, 7, weights=tmp_path / "w.safetensors", model_kwargs=TINY)
    want, got = source.state_dict(), model.state_dict()
    assert got["head.weight"].shape == (7, 32)
    assert all(torch.equal(want[k], got[k]) for k in want if not k.startswith("head."))


def test_three_channel_weights_are_adapted_to_a_grey_model_as_timm_does(tmp_path):
    source = _source(in_chans=3)
    torch.save(source.state_dict(), tmp_path / "rgb.pth")
    model = create_backbone(NAME, 5, weights=tmp_path / "rgb.pth", model_kwargs=TINY)
    # timm's adapt_input_conv for one channel: the sum over the pretrained RGB filters
    want = source.state_dict()["patch_embed.proj.weight"].sum(dim=1, keepdim=True)
    assert torch.allclose(model.patch_embed.proj.weight, want)


@pytest.mark.parametrize("num_classes", [5, 7])
def test_weights_of_another_depth_are_refused(tmp_path, num_classes):
    path = tmp_path / "depth2.safetensors"
    safetensors.torch.save_file(_source().state_dict(), str(path))
    deeper = {**TINY, "depth": 3}
    if num_classes != 5:  # the case timm lets through: non-strict load because the head is dropped
        silent = timm.create_model(NAME, pretrained=True, num_classes=num_classes,
                                   pretrained_cfg_overlay=dict(file=str(path)), **deeper)
        assert len(silent.blocks) == 3
    with pytest.raises(WeightsMismatchError) as info:
        create_backbone(NAME, num_classes, weights=path, model_kwargs=deeper)
    message = str(info.value)
    assert "missing from the file (12)" in message  # block 2: norm1/2, qkv, proj, fc1, fc2 (weight + bias)
    assert "blocks.2.attn.qkv.weight" in message and str(path) in message and "--model-kwargs" in message


def test_weights_of_another_width_list_the_shapes(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(_source().state_dict(), path)
    with pytest.raises(WeightsMismatchError, match=r"blocks\.0\.norm1\.weight \(32,\) vs \(64,\)"):
        create_backbone(NAME, 5, weights=path, model_kwargs={**TINY, "embed_dim": 64})


def test_bad_files_and_names(tmp_path):
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"w\.npz.*\.safetensors, \.pth, \.pt, \.bin"):
        create_backbone(NAME, 5, weights=tmp_path / "w.npz", model_kwargs=TINY)
    for kind in (FileNotFoundError, ValueError):
        with pytest.raises(kind, match="nowhere.pth"):
            create_backbone(NAME, 5, weights=tmp_path / "nowhere.pth", model_kwargs=TINY)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors"):
        create_backbone(NAME, 5, weights=tmp_path / "junk.safetensors", model_kwargs=TINY)
    with pytest.raises(ValueError, match="vit_tiny_patch16_224"):
        create_backbone("vit_tiny_patch16_2244", 5)
    with pytest.raises(ValueError, match="pretrained"):
        create_backbone(NAME, 5, weights=tmp_path / "w.npz", pretrained=False)
    with pytest.raises(ValueError, match="model-kwargs"):
        create_backbone(NAME, 5, model_kwargs={**TINY, "dept": 2}, pretrained=False)


def test_without_a_file_timm_downloads_its_own_weights(monkeypatch):
    calls = []
    def fake(*args, **kwargs):
        calls.append((args, kwargs))
        return torch.nn.Linear(1, 1)

    monkeypatch.setattr(timm, "create_model", fake)
    BackboneSpec(NAME, 10, model_kwargs={"img_size": 32}).create()
    assert calls == [((NAME,), {"pretrained": True, "num_classes": 10, "img_size": 32})]


def test_overlay_from_model_kwargs_is_merged_with_the_file(tmp_path):
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(_source().state_dict(), str(path))
    kwargs = {**TINY, "pretrained_cfg_overlay": {"mean": [0.2, 0.4, 0.6], "std": [0.1, 0.2, 0.3]}}
    model = create_backbone(NAME, 5, weights=path, model_kwargs=kwargs)
    assert model.pretrained_cfg["file"] == str(path)
    config = data_config(model)
    assert config["input_size"] == (1, 28, 28)  # timm alone reports (3, 224, 224)
    assert config["mean"] == pytest.approx((0.4,)) and config["std"] == pytest.approx((0.2,))
    assert json.loads(json.dumps(config))["input_size"] == [1, 28, 28]


def test_eval_transform_converts_resizes_normalises_deterministically():
    config = data_config(_source())
    assert config["input_size"] == (1, 28, 28) and len(config["mean"]) == len(config["std"]) == 1
    transform = eval_transform({**config, "mean": (0.4,), "std": (0.3,)})
    image = Image.new("L", (40, 50), 128)
    x = transform(image)
    assert x.shape == (1, 28, 28)
    assert torch.allclose(x, torch.full_like(x, (128 / 255 - 0.4) / 0.3), atol=1e-6)
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (33, 61, 3), dtype=np.uint8))
    first, second = transform(rgb), transform(rgb)
    assert first.shape == (1, 28, 28) and torch.equal(first, second)
    colour = eval_transform({**config, "input_size": (3, 28, 28), "mean": (0.5,) * 3, "std": (0.5,) * 3})
    assert colour(image).shape == (3, 28, 28)


def test_spec_round_trip_and_weights_moved(tmp_path):
    source = _source()
    first = tmp_path / "a" / "w.safetensors"
    first.parent.mkdir()
    safetensors.torch.save_file(source.state_dict(), str(first))
    spec = BackboneSpec(NAME, 5, weights=str(first), model_kwargs=TINY)
    again = BackboneSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    moved = tmp_path / "b.safetensors"
    shutil.move(first, moved)
    model = again.create(weights=moved)
    assert torch.equal(model.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    with pytest.raises(ValueError, match="JSON"):
        BackboneSpec(NAME, 5, model_kwargs={"act_layer": torch.nn.GELU})
    with pytest.raises(ValueError, match="unknown"):
        BackboneSpec.from_dict({**spec.to_dict(), "pretrained": True})
