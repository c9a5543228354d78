"""compose(): averaging Δw equals averaging outputs; mismatched models are refused."""

from __future__ import annotations

import pytest
import torch

import dp_taft
from vit_cases import images, make_vit, randomize_deltas


def trained_copies(model, n, blocks=2):
    out = []
    for i in range(n):
        t = dp_taft.linearize(model, blocks=blocks)
        randomize_deltas(t, scale=0.2, seed=10 + i)
        out.append(t)
    return out


@pytest.mark.parametrize("weights", [None, [0.5, 0.3, 0.2], [1.5, -0.25, -0.25]])
def test_output_is_the_weighted_average(weights):
    model = make_vit(init_values=0.3)
    models = trained_copies(model, 3)
    composed = dp_taft.compose(models, weights)
    x = images(model, n=6)
    w = weights or [1 / 3] * 3
    expected = sum(wi * m(x) for wi, m in zip(w, models))
    got = composed(x)
    assert ((got - expected).norm() / expected.norm()).item() <= 1e-10
    # non-trivial: the members really differ from each other
    assert (models[0](x) - models[1](x)).norm() > 1e-3 * expected.norm()


def test_inputs_untouched():
    model = make_vit()
    models = trained_copies(model, 2)
    before = [m.delta_state_dict() for m in models]
    dp_taft.compose(models)
    for m, b in zip(models, before):
        for k, v in m.delta_state_dict().items():
            assert torch.equal(v, b[k])


def test_different_w0_refused():
    a = trained_copies(make_vit(seed=0), 1)[0]
    b = trained_copies(make_vit(seed=1), 1)[0]
    with pytest.raises(ValueError, match="different pretrained weights w0"):
        dp_taft.compose([a, b])


def test_different_blocks_refused():
    model = make_vit()
    with pytest.raises(ValueError, match="blocks=1 vs 2"):
        dp_taft.compose([dp_taft.linearize(model, 2), dp_taft.linearize(model, 1)])


@pytest.mark.parametrize(
    ("weights", "match"),
    [([0.5, 0.6], "sum to 1"), ([1.0], "one weight per model"), ([float("nan"), 1.0], "finite")],
)
def test_bad_weights(weights, match):
    models = trained_copies(make_vit(), 2)
    with pytest.raises(ValueError, match=match):
        dp_taft.compose(models, weights)


def test_empty_and_wrong_type():
    with pytest.raises(ValueError, match="at least one"):
        dp_taft.compose([])
    with pytest.raises(ValueError, match="TangentViT"):
        dp_taft.compose([torch.nn.Linear(2, 2)])
