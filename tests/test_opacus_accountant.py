"""The Opacus accountant bridge: PrivacyEngine(accountant="dp_taft_pld") accounts with `accounting`."""

from __future__ import annotations

import accounting
import pytest
import torch
import torch.nn as nn
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

import dp_taft  # noqa: F401  (registers the accountants)
from dp_taft.privacy.accountant import OpacusPLDAccountant, OpacusRDPAccountant

N, BATCH, DELTA = 64, 8, 1e-3
# Opacus' own notices for a plain research loop; irrelevant to accounting.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
]


def _private(engine: PrivacyEngine, **kwargs):
    """(engine, model, optimizer, loader) from make_private (σ given) or make_private_with_epsilon."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(N, 5), torch.randint(0, 2, (N,)))
    model = nn.Linear(5, 2)
    make = engine.make_private if "noise_multiplier" in kwargs else engine.make_private_with_epsilon
    return engine, *make(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=BATCH), max_grad_norm=1.0, **kwargs,
    )


def _train(model, optimizer, loader, steps: int) -> None:
    done = 0
    while done < steps:
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            done += 1
            if done == steps:
                return


@pytest.mark.parametrize("method", ["pld", "rdp"])
def test_opacus_loop_reports_accountings_epsilon(method):
    engine, model, optimizer, loader = _private(PrivacyEngine(accountant=f"dp_taft_{method}"), noise_multiplier=1.1)
    _train(model, optimizer, loader, steps=20)
    q = 1 / len(loader)
    assert len(engine.accountant) == 20
    assert engine.accountant.history == [(1.1, q, 20)]
    assert engine.get_epsilon(DELTA) == pytest.approx(accounting.epsilon(1.1, q, 20, DELTA, method=method), rel=1e-12)


def test_make_private_with_epsilon_calibrates_with_our_pld():
    engine, model, optimizer, loader = _private(PrivacyEngine(accountant="dp_taft_pld"), target_epsilon=2.0,
                                                target_delta=DELTA, epochs=2)
    q, steps = 1 / len(loader), 2 * len(loader)
    sigma = optimizer.noise_multiplier
    eps = accounting.epsilon(sigma, q, steps, DELTA)
    # Opacus bisects on sigma until epsilon is within its tolerance 0.01 below the target.
    assert 2.0 - 0.011 <= eps <= 2.0
    _train(model, optimizer, loader, steps=steps)
    assert engine.get_epsilon(DELTA) == pytest.approx(eps, rel=1e-12)


def test_state_dict_round_trip_and_mechanism_names():
    acc = OpacusPLDAccountant()
    for _ in range(3):
        acc.step(noise_multiplier=1.0, sample_rate=0.1)
    acc.step(noise_multiplier=2.0, sample_rate=0.1)
    assert acc.history == [(1.0, 0.1, 3), (2.0, 0.1, 1)] and len(acc) == 4
    other = OpacusPLDAccountant()
    other.load_state_dict(acc.state_dict())
    assert other.get_epsilon(DELTA) == acc.get_epsilon(DELTA) > 0
    assert OpacusPLDAccountant.mechanism() == "dp_taft_pld" and OpacusRDPAccountant.mechanism() == "dp_taft_rdp"
    assert OpacusPLDAccountant().get_epsilon(DELTA) == 0.0
