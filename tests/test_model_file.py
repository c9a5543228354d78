"""Model files reload to exactly the trained function (dp_taft.model_file).

The pretrained weights are a small random timm ViT saved as safetensors with 7 classes;
every model is built with 3 classes, so its head is freshly (randomly) initialised and is
in no weights file: exactly the part a bare Δw file loses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import timm
import torch

import dp_taft
from dp_taft import methods
from dp_taft.backbone import BackboneSpec
from dp_taft.model_file import MODEL_FILE, BaseMismatchError, ModelSpec, fingerprint, load_model, save_model

NAME = "vit_tiny_patch16_224"
KWARGS = dict(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=2, num_heads=2)
CLASSES = ("cat", "dog", "owl")
DATA_CONFIG = {"input_size": (1, 28, 28), "interpolation": "bicubic", "mean": (0.5,), "std": (0.5,),
               "crop_pct": 0.9, "crop_mode": "center"}
METHOD_NAMES = ("taft", "taft-head", "nlft", "probe")


def write_weights(path: Path, seed: int) -> Path:
    """A random 7-class ViT saved as a "pretrained weights" file."""
    torch.manual_seed(seed)
    safetensors.torch.save_file(timm.create_model(NAME, num_classes=7, **KWARGS).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return write_weights(tmp_path_factory.mktemp("weights") / "vit_pretrained.safetensors", seed=0)


def backbone_spec(weights: Path) -> BackboneSpec:
    return BackboneSpec(NAME, len(CLASSES), weights=str(weights), model_kwargs=KWARGS)


@torch.no_grad()
def trained_model(method: str, backbone: BackboneSpec, seed: int = 3) -> torch.nn.Module:
    """The method module around a fresh backbone, its trainable parameters set to random nonzero values."""
    torch.manual_seed(seed)
    vit = backbone.create()
    if method == "taft-head":  # as fit_head_first: TAFT around a head that was trained first
        vit.head.weight.copy_(torch.randn_like(vit.head.weight))
        vit.head.bias.copy_(torch.randn_like(vit.head.bias))
    model = {"taft": lambda: methods.taft(vit, 1), "taft-head": lambda: methods.taft(vit, 1),
             "nlft": lambda: methods.nlft(vit, 1), "probe": lambda: methods.linear_probe(vit)}[method]()
    for p in model.parameters():
        if p.requires_grad:
            p.copy_(0.1 * torch.randn_like(p) + 0.01)
    return model.eval()


def spec_of(method: str, backbone: BackboneSpec, **overrides) -> ModelSpec:
    fields = dict(backbone=backbone, method=method, blocks=0 if method == "probe" else 1, classes=CLASSES,
                  data_config=DATA_CONFIG)
    return ModelSpec(**{**fields, **overrides})


def batch(seed: int = 7) -> torch.Tensor:
    return torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_reload_gives_exactly_the_trained_logits(method, weights, tmp_path):
    backbone = backbone_spec(weights)
    model = trained_model(method, backbone)
    written = save_model(tmp_path, model, spec_of(method, backbone))
    torch.manual_seed(12345)  # another seed: a freshly created head would differ
    loaded, spec = load_model(tmp_path)
    assert type(loaded) is type(model) and not loaded.training
    assert spec == written and spec.method == method
    with torch.no_grad():
        assert torch.equal(loaded(batch()), model(batch()))


def test_bare_delta_file_is_the_old_trap_and_the_model_file_fixes_it(weights, tmp_path):
    backbone = backbone_spec(weights)
    model = trained_model("taft", backbone)
    delta = model.delta_state_dict()  # what the README used to save
    torch.manual_seed(999)
    fresh = methods.taft(backbone.create(), 1)
    assert not torch.equal(fresh.head.weight0, model.head.weight0)  # another random head
    fresh.load_delta_state_dict(delta)  # accepted without a word ...
    with torch.no_grad():
        assert not torch.allclose(fresh(batch()), model(batch()), atol=1e-3)  # ... and answers differently
        save_model(tmp_path, model, spec_of("taft", backbone))
        torch.manual_seed(999)
        loaded, _ = load_model(tmp_path)
        assert torch.equal(loaded(batch()), model(batch()))


def test_reload_in_a_new_process(weights, tmp_path):
    backbone = backbone_spec(weights)
    model = trained_model("taft-head", backbone)
    save_model(tmp_path, model, spec_of("taft-head", backbone))
    torch.save(batch(), tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import torch
        from dp_taft.model_file import load_model
        torch.manual_seed(2024)
        model, _ = load_model({str(tmp_path)!r})
        with torch.no_grad():
            torch.save(model(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'logits.pt')!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).parents[1],
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "logits.pt"), model(batch()))


def test_other_pretrained_weights_are_refused_naming_both_fingerprints(weights, tmp_path):
    backbone = backbone_spec(weights)
    model = trained_model("taft", backbone)
    written = save_model(tmp_path / "model", model, spec_of("taft", backbone))
    other = write_weights(tmp_path / "other.safetensors", seed=1)
    # The base the loader rebuilds from the other file: its blocks, and the stored head w0.
    vit = backbone.create(other)
    with torch.no_grad():
        vit.head.weight.copy_(model.head.weight0)
        vit.head.bias.copy_(model.head.bias0)
    rebuilt = fingerprint(methods.taft(vit, 1))
    assert rebuilt != written.fingerprint
    with pytest.raises(BaseMismatchError) as err:
        load_model(tmp_path / "model", weights=other)
    message = str(err.value)
    for part in (written.fingerprint, rebuilt, written.fingerprint[:12], rebuilt[:12], str(other), "--weights"):
        assert part in message
    assert isinstance(err.value, ValueError)


def test_weights_moved_elsewhere_load_with_the_override(weights, tmp_path):
    backbone = backbone_spec(weights)
    model = trained_model("nlft", backbone)
    save_model(tmp_path / "model", model, spec_of("nlft", backbone))
    moved = tmp_path / "elsewhere.safetensors"
    moved.write_bytes(weights.read_bytes())
    loaded, spec = load_model(tmp_path / "model", weights=moved)
    assert spec.backbone.weights == str(weights)  # the file keeps what training used
    with torch.no_grad():
        assert torch.equal(loaded(batch()), model(batch()))


def test_fingerprint_covers_frozen_tensors_and_structure_not_trained_values(weights):
    backbone = backbone_spec(weights)
    model = trained_model("taft", backbone)
    base = fingerprint(model)
    assert len(base) == 64 and int(base, 16) >= 0
    with torch.no_grad():
        for p in model.deltas().values():
            p.add_(1.0)
        assert fingerprint(model) == base  # Δw is what was trained, not the base
        w = model.frozen_prefix.blocks[0].attn.qkv.weight
        w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(10.0))  # one ulp in one frozen weight
    assert fingerprint(model) != base
    assert fingerprint(trained_model("taft", backbone)) != fingerprint(trained_model("taft-head", backbone))
    vit = backbone.create()
    assert fingerprint(methods.taft(vit, 1)) != fingerprint(methods.taft(vit, 2))
    assert fingerprint(methods.taft(vit, 1)) != fingerprint(methods.nlft(vit, 1))


def test_file_metadata_round_trips_and_names_no_private_data(weights, tmp_path):
    backbone = backbone_spec(weights)
    model = trained_model("taft", backbone)
    written = save_model(tmp_path, model, spec_of("taft", backbone, composition="parallel over 4 shards"))
    with safetensors.safe_open(str(tmp_path / MODEL_FILE), framework="pt") as f:
        metadata, keys = f.metadata(), set(f.keys())
    assert set(metadata) == {"format", "spec"} and metadata["format"] == "dp_taft.model/1"
    stored = json.loads(metadata["spec"])
    assert stored["backbone"] == {"name": NAME, "num_classes": 3, "weights": str(weights), "model_kwargs": KWARGS}
    assert (stored["method"], stored["blocks"], stored["classes"]) == ("taft", 1, list(CLASSES))
    assert stored["version"] == dp_taft.__version__ and stored["fingerprint"] == fingerprint(model)
    assert stored["data_config"]["input_size"] == [1, 28, 28] and stored["composition"] == "parallel over 4 shards"
    assert ModelSpec.from_dict(stored) == written == ModelSpec.from_dict(written.to_dict())
    assert keys == {f"delta.{k}" for k in model.delta_state_dict()} | {"base.head.weight", "base.head.bias"}
    assert str(tmp_path) not in metadata["spec"]  # nothing about where the model was written


def test_trained_tensors_are_keyed_by_module_names(weights, tmp_path):
    backbone = backbone_spec(weights)
    model = trained_model("probe", backbone)
    save_model(tmp_path, model, spec_of("probe", backbone))
    with safetensors.safe_open(str(tmp_path / MODEL_FILE), framework="pt") as f:
        assert set(f.keys()) == {"trained.head.weight", "trained.head.bias"}
        assert torch.equal(f.get_tensor("trained.head.weight"), model.head.weight)


def rewrite(path: Path, *, metadata: dict | None = None, extra: dict | None = None) -> None:
    """Rewrite a model file with other metadata and/or extra tensors."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    safetensors.torch.save_file({**tensors, **(extra or {})}, path, metadata=meta if metadata is None else metadata)


def test_damaged_and_foreign_files_are_refused(weights, tmp_path):
    backbone = backbone_spec(weights)
    model = trained_model("taft", backbone)
    path = tmp_path / MODEL_FILE
    with pytest.raises(ValueError, match="no model file"):
        load_model(tmp_path)
    save_model(tmp_path, model, spec_of("taft", backbone))
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_model(tmp_path)
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_model(tmp_path)
    safetensors.torch.save_file(model.delta_state_dict(), path)  # a bare Δw file: no format, no base
    with pytest.raises(ValueError, match="format None"):
        load_model(tmp_path)
    path.write_bytes(good)
    rewrite(path, metadata={"format": "dp_taft.model/2", "spec": "{}"})
    with pytest.raises(ValueError, match="dp_taft.model/2"):
        load_model(tmp_path)
    path.write_bytes(good)
    rewrite(path, extra={"delta.blocks.9.mlp.fc1.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"unexpected \['blocks.9.mlp.fc1.weight'\]"):
        load_model(tmp_path)
    path.write_bytes(good)
    rewrite(path, extra={"optimizer.state": torch.zeros(2)})
    with pytest.raises(ValueError, match="unexpected tensor 'optimizer.state'"):
        load_model(tmp_path)


def test_spec_must_describe_the_model(weights, tmp_path):
    backbone = backbone_spec(weights)
    model = trained_model("taft", backbone)
    with pytest.raises(ValueError, match="unknown method"):
        spec_of("lora", backbone)
    with pytest.raises(ValueError, match="2 class names"):
        spec_of("taft", backbone, classes=("a", "b"))
    with pytest.raises(ValueError, match="JSON-able"):
        spec_of("taft", backbone, data_config={"mean": object()})
    with pytest.raises(ValueError, match="NLFTViT"):
        save_model(tmp_path, model, spec_of("nlft", backbone))
    with pytest.raises(ValueError, match="set blocks=1"):
        save_model(tmp_path, model, spec_of("taft", backbone, blocks=2))
    with pytest.raises(ValueError, match="describes another base"):
        save_model(tmp_path, model, spec_of("taft", backbone, fingerprint="0" * 64))
    assert not (tmp_path / MODEL_FILE).exists()


#: One small model per ViT family (timm name, kwargs); each loads from a weights file of its own.
FAMILIES = {
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=16, patch_size=4, embed_dim=32, depth=2,
                                                               num_heads=2)),
    "siglip_map": ("vit_base_patch16_siglip_224", dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)),
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                                             ref_feat_shape=(4, 4))),
    "beit": ("beit_base_patch16_224", dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=16, patch_size=4, window_size=2, embed_dim=16,
                                                  depths=(2, 2), num_heads=(2, 2), drop_path_rate=0.0)),
    "swin_v2": ("swinv2_tiny_window8_256", dict(img_size=16, patch_size=4, window_size=2, embed_dim=16,
                                                depths=(2, 2), num_heads=(2, 2), drop_path_rate=0.0)),
}


@pytest.mark.parametrize("method", ["taft", "nlft"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_reloads_exactly(family, method, tmp_path):
    """A family's subclass (TangentSwin, NLFTEva, ...) saves, and reloads to exactly the trained logits."""
    name, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file(timm.create_model(name, num_classes=7, **kwargs).state_dict(), path)
    backbone = BackboneSpec(name, len(CLASSES), weights=str(path), model_kwargs=kwargs)
    with torch.no_grad():
        model = (methods.taft if method == "taft" else methods.nlft)(backbone.create(), 1)
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.1 * torch.randn_like(p) + 0.01)
    config = {**DATA_CONFIG, "input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    save_model(tmp_path / "model", model.eval(), spec_of(method, backbone, data_config=config))
    torch.manual_seed(12345)
    loaded, _ = load_model(tmp_path / "model")
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert type(loaded) is type(model) and torch.equal(loaded(x), model(x))
