"""dp_taft.methods: the prefix protocol, what is trainable, copies, and refusals."""

from __future__ import annotations

import pytest
import torch

import dp_taft
from dp_taft.methods import linear_probe, nlft, taft
from fit_cases import tiny_vit


@pytest.mark.parametrize("build", [lambda m: taft(m, 1), lambda m: nlft(m, 1), lambda m: nlft(m, 2),
                                   lambda m: nlft(m, 0), linear_probe], ids=["taft1", "nlft1", "nlft2", "nlft0", "probe"])
def test_prefix_protocol_matches_the_model(build):
    vit = tiny_vit().eval()
    x = torch.randn(4, 3, 16, 16)
    method = build(vit)
    method.train()  # the frozen prefix must stay deterministic in train mode
    h = method.prefix(x)
    assert not h.requires_grad
    out = method.forward_from_prefix(h)
    torch.testing.assert_close(out, method(x))
    # At initialization every method computes the pretrained network's function.
    torch.testing.assert_close(out, vit(x), rtol=1e-5, atol=1e-5)
    assert method.num_classes == vit.num_classes


def test_nlft_trains_exactly_last_k_blocks_norm_and_head():
    method = nlft(tiny_vit(), 1)
    names = {k for k, p in method.named_parameters() if p.requires_grad}
    assert names and all(k.startswith(("blocks.0.", "norm.", "net.head.", "net.fc_norm.")) for k in names)
    assert any(k.startswith("blocks.0.") for k in names) and "net.head.weight" in names
    assert not any(p.requires_grad for p in method.net.blocks.parameters())  # the frozen first block
    assert method.prefix(torch.randn(2, 3, 16, 16)).shape == (2, 17, 32)  # tokens after block 0


def test_probe_trains_head_only_and_caches_pooled_features():
    method = linear_probe(tiny_vit())
    assert {k for k, p in method.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    assert method.prefix(torch.randn(2, 3, 16, 16)).shape == (2, 32)


def test_methods_copy_the_model():
    vit = tiny_vit()
    a, b = nlft(vit, 1), linear_probe(vit)
    with torch.no_grad():
        a.net.head.weight.add_(1.0)
    torch.testing.assert_close(b.head.weight, vit.head.weight)
    assert a.net.head.weight.data_ptr() != vit.head.weight.data_ptr()


def test_frozen_part_stays_in_eval_mode():
    method = nlft(tiny_vit(pos_drop_rate=0.5), 1)
    method.train()
    assert not method.net.pos_drop.training and method.blocks.training
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(method(x), method(x))  # prefix dropout is off


@pytest.mark.parametrize("kwargs", [dict(drop_path_rate=0.1), dict(proj_drop_rate=0.1), dict(drop_rate=0.1)])
def test_nlft_refuses_dropout_in_trainable_part(kwargs):
    with pytest.raises(dp_taft.UnsupportedModelError, match="stochastic layer"):
        nlft(tiny_vit(**kwargs), 1)


def test_bad_blocks_and_models():
    with pytest.raises(ValueError, match=r"blocks must be an integer in \[0, 2\]"):
        nlft(tiny_vit(), 3)
    with pytest.raises(dp_taft.UnsupportedModelError, match="VisionTransformer"):
        linear_probe(torch.nn.Linear(3, 3))
    with pytest.raises(dp_taft.UnsupportedModelError, match="num_classes > 0"):
        nlft(tiny_vit(num_classes=0), 1)
