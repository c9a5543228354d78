"""TangentViT's public surface: Δ naming, state round-trip, prefix cache, clear refusals."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import dp_taft
from dp_taft.fingerprint import fingerprint
from dp_taft.tangent import UnsupportedModelError
from vit_cases import images, make_vit, randomize_deltas


def test_deltas_named_like_the_original_and_only_trainable():
    model = make_vit(depth=4, init_values=0.5)
    tangent = dp_taft.linearize(model, blocks=2)
    original = dict(model.named_parameters())
    expected = {n for n in original if n.startswith(("blocks.2.", "blocks.3.", "norm.", "head."))}
    deltas = tangent.deltas()
    assert set(deltas) == expected
    assert "blocks.3.attn.qkv.weight" in deltas and "blocks.3.ls1.gamma" in deltas
    for name, delta in deltas.items():
        assert delta.shape == original[name].shape, name
        assert delta.requires_grad and torch.count_nonzero(delta) == 0, name
    trainable = {id(p) for p in tangent.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in deltas.values()}
    assert all(not p.requires_grad for n, p in tangent.named_parameters() if id(p) not in trainable)


def test_head_only_when_blocks_zero():
    tangent = dp_taft.linearize(make_vit(), blocks=0)
    assert set(tangent.deltas()) == {"norm.weight", "norm.bias", "head.weight", "head.bias"}


def test_delta_state_dict_round_trip(tmp_path):
    model = make_vit()
    trained = dp_taft.linearize(model, blocks=2)
    randomize_deltas(trained)
    torch.save(trained.delta_state_dict(), tmp_path / "delta.pt")
    fresh = dp_taft.linearize(model, blocks=2)
    fresh.load_delta_state_dict(torch.load(tmp_path / "delta.pt"))
    x = images(model)
    torch.testing.assert_close(fresh(x), trained(x), rtol=0, atol=0)
    with pytest.raises(KeyError, match="blocks=1"):
        dp_taft.linearize(model, blocks=1).load_delta_state_dict(trained.delta_state_dict())


def test_prefix_cache_path_is_exact():
    model = make_vit(depth=4, reg_tokens=1)
    tangent = dp_taft.linearize(model, blocks=2)
    randomize_deltas(tangent)
    x = images(model)
    h = tangent.prefix(x)
    assert h.shape == (4, 1 + 1 + 16, 24) and not h.requires_grad
    torch.testing.assert_close(tangent.forward_from_prefix(h), tangent(x), rtol=0, atol=0)


def test_copy_is_independent_and_prefix_stays_eval():
    model = make_vit()
    tangent = dp_taft.linearize(model, blocks=1)
    x = images(model)
    before = tangent(x)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    tangent.train()
    assert tangent.training and not tangent.frozen_prefix.training
    torch.testing.assert_close(tangent(x), before, rtol=0, atol=0)


def test_fingerprint_tracks_w0_and_structure():
    model = make_vit()
    a = dp_taft.linearize(model, blocks=2)
    randomize_deltas(a)
    assert a.fingerprint() == dp_taft.linearize(model, blocks=2).fingerprint()  # Δw does not count
    assert a.fingerprint() != dp_taft.linearize(model, blocks=1).fingerprint()
    assert a.fingerprint() != dp_taft.linearize(make_vit(seed=5), blocks=2).fingerprint()
    assert a.fingerprint() == fingerprint(a)  # one fingerprint: the one model files and shard sets record
    assert a.fingerprint() != copy.deepcopy(a).float().fingerprint()  # the dtype w0 is used in counts (float64 here)


class UnregisteredMlp(timm.layers.Mlp):
    """A subclass has no tangent rule: the registry matches exact classes (it may change forward)."""


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(drop_path_rate=0.1), r"blocks\.\d\.drop_path1.*drop_path_rate=0"),
        (dict(attn_drop_rate=0.1), r"attn\.attn_drop"),
        (dict(drop_rate=0.1), "head_drop"),
        (dict(global_pool="max"), "global_pool='max'"),
        (dict(global_pool="prr"), "global_pool='prr'"),  # 'map' is supported: tests/test_tangent_vit_variants.py
        (dict(num_classes=0), "linear classifier head"),
        (dict(mlp_layer=UnregisteredMlp), r"blocks\.2\.mlp' of type \S*UnregisteredMlp"),
    ],
)
def test_unsupported_variants_are_refused_by_name(kwargs, match):
    with pytest.raises(UnsupportedModelError, match=match):
        dp_taft.linearize(make_vit(**kwargs), blocks=1)


def test_unsupported_layer_error_lists_supported_types():
    with pytest.raises(UnsupportedModelError, match="Supported layer types: .*TangentMlp|Supported layer types: .*Mlp"):
        dp_taft.linearize(make_vit(mlp_layer=UnregisteredMlp), blocks=1)


def test_stochastic_layers_in_the_prefix_are_fine():
    model = make_vit(depth=3, drop_path_rate=0.2)  # rates grow with depth; block 0 has rate 0
    with pytest.raises(UnsupportedModelError):
        dp_taft.linearize(model, blocks=1)
    model.blocks[-1].drop_path1 = torch.nn.Identity()
    model.blocks[-1].drop_path2 = torch.nn.Identity()
    tangent = dp_taft.linearize(model, blocks=1).train()
    x = images(model)
    torch.testing.assert_close(tangent(x), tangent(x), rtol=0, atol=0)  # prefix runs in eval mode


@pytest.mark.parametrize("bad", [-1, 4, 1.5, True])
def test_blocks_out_of_range(bad):
    with pytest.raises(ValueError, match=r"blocks must be an integer in \[0, 3\]"):
        dp_taft.linearize(make_vit(), blocks=bad)


def test_not_a_vit():
    with pytest.raises(UnsupportedModelError, match="takes a timm VisionTransformer"):
        dp_taft.linearize(torch.nn.Linear(3, 3), blocks=0)
