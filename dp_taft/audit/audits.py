"""One-run audits through the real :func:`dp_taft.fit` path: :func:`audit_dirac`, :func:`audit_input`."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset, TensorDataset

from ..privacy.validate import check_int, check_real, resolve_grad_sample_mode
from ..train import FitResult, fit
from .bounds import _check_bound, _check_confidence
from .canaries import (CanaryRows, canary_image, dirac_scores, loss_scores, quiet_coordinates, trainable_vector,
                       with_canaries)
from .guesses import DEFAULT_FRACTIONS, best_guesses
from .result import AuditResult

__all__ = ["audit_dirac", "audit_input", "AUDIT_MODES"]

# fit arguments the audit sets itself: the data and batch come from the canary draw,
# the hook from the canaries; a checkpointed or composed run would not be the run audited.
_RESERVED = ("batch_size", "grad_sample_hook", "checkpoint_dir", "prior")
#: grad_sample_mode values an audit accepts: "auto" (default) is what fit's default runs
#: for the model (book-keeping where it applies, see :func:`_resolve_mode`).
AUDIT_MODES = ("auto", "bk", "hooks")
# Independent streams derived from the audit's seed.
_MEMBERSHIP, _COORDINATES, _TIES, _FIT = range(4)


def audit_dirac(model: nn.Module, train_set: Dataset | None = None, *, m: int, epsilon: float | None, delta: float,
                confidence: float = 0.95, bound: str = "steinke", sample_rate: float = 1.0,
                max_grad_norm: float = 1.0, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                seed: int | None = None, **fit_kwargs: Any) -> AuditResult:
    """Audit one DP-SGD run with m white-box Dirac gradient canaries (as in Steinke et al. 2023's white-box audit).

    Canary j is a dummy row (an all-zero image, label 0) of the training set, included
    with probability 1/2. Its own gradient never counts: each time the Poisson sampler puts
    an included canary's row in a batch, its clipped gradient is C·e_{k_j} (C =
    ``max_grad_norm``, k_j distinct trainable coordinates chosen where the real data's
    gradient is smallest); an excluded canary's row contributes 0, so N, q, σ and the
    divisor do not depend on the coin flips (see :mod:`dp_taft.audit.canaries`). Score j =
    −(w_T − w_0)[k_j]. Everything else is the ordinary :func:`dp_taft.fit`, in the mode its
    default picks: book-keeping ("bk": C·e_k added to the clipped sum, the other rows clipped
    by book-keeping, Opacus' fast-gradient-clipping optimizer) where it applies, else "hooks"
    (C·e_k written into the per-sample gradients before Opacus clips them).

    Args:
        model: a fresh model from :mod:`dp_taft.methods`; TRAINED IN PLACE by the audit.
        train_set: real training examples (may be None or small); fixed, not audited.
        m: canaries, in [1, number of trainable parameters].
        epsilon: the target ε of the audited run (calibrates σ), or None for a non-private run.
        delta: δ in (0, 1/(real + m)) of the run and of the bound.
        confidence: in (0, 1); bound: one of :data:`~dp_taft.audit.bounds.BOUNDS` ("gdp" only with
            sample_rate 1, where the run is exactly μ-GDP).
        sample_rate: Poisson rate q in (0, 1]: the expected batch is round(q·(real + m)) rows; 1 (full
            batch) gives the tightest audit.
        max_grad_norm: clipping norm C > 0, also the canary gradients' norm.
        fractions: guessed shares r/m declared up front (see :func:`~dp_taft.audit.guesses.best_guesses`).
        seed: None draws the canaries and the run's randomness secretly; an integer makes the audit reproducible.
        fit_kwargs: any other :func:`dp_taft.fit` argument (epochs, lr, momentum, optimizer, physical_batch_size,
            accountant, quiet, device, ...); ``grad_sample_mode`` one of :data:`AUDIT_MODES`.
    """
    started = time.perf_counter()
    mode = _check_common(model, confidence, bound, sample_rate, fit_kwargs)
    streams = _streams(seed)
    fit_seed, tie_seed = _seeds(seed, streams)
    membership = streams[_MEMBERSHIP].integers(0, 2, size=_check_m(m)).astype(bool)
    coordinates = quiet_coordinates(model, train_set, m, streams[_COORDINATES])
    image = canary_image(model, train_set)
    canaries = TensorDataset(image.expand(m, *image.shape).clone(), torch.zeros(m, dtype=torch.long))
    hook = CanaryRows.dirac(coordinates, membership, norm=float(max_grad_norm), first_row=_real(train_set),
                            shapes=_shapes(model))
    before = trainable_vector(model)
    run = _fit(model, with_canaries(train_set, canaries), hook, fit_seed, mode, epsilon=epsilon, delta=delta,
               sample_rate=sample_rate, max_grad_norm=max_grad_norm, **fit_kwargs)
    scores = dirac_scores(coordinates, before, trainable_vector(model))
    return _result("dirac", run, mode, scores, membership, tie_seed, epsilon=epsilon, delta=delta,
                   confidence=confidence, bound=bound, fractions=fractions, started=started)


def audit_input(model: nn.Module, train_set: Dataset | None, canaries: Dataset, *, epsilon: float | None,
                delta: float, confidence: float = 0.95, bound: str = "steinke", sample_rate: float = 1.0,
                fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int | None = None,
                **fit_kwargs: Any) -> AuditResult:
    """Audit one run with input-space canaries (e.g. :func:`~dp_taft.audit.canaries.mislabeled`).

    Each example of ``canaries`` (m of them, not in ``train_set``) is a row of the training
    set; it is included with probability 1/2, and an excluded one's row contributes a zero
    gradient (fixed N, q, σ and divisor, as in :func:`audit_dirac`). After the ordinary
    :func:`dp_taft.fit`, score j is −loss of the trained model on canary j. Arguments as in
    :func:`audit_dirac`. The included canaries are plain examples (black-box), far weaker than Dirac canaries.
    """
    started = time.perf_counter()
    mode = _check_common(model, confidence, bound, sample_rate, fit_kwargs)
    streams = _streams(seed)
    fit_seed, tie_seed = _seeds(seed, streams)
    membership = streams[_MEMBERSHIP].integers(0, 2, size=_check_m(len(canaries))).astype(bool)
    hook = CanaryRows.excluded(membership, first_row=_real(train_set), shapes=_shapes(model))
    run = _fit(model, with_canaries(train_set, canaries), hook, fit_seed, mode, epsilon=epsilon, delta=delta,
               sample_rate=sample_rate, **fit_kwargs)
    return _result("input", run, mode, loss_scores(model, canaries), membership, tie_seed, epsilon=epsilon,
                   delta=delta, confidence=confidence, bound=bound, fractions=fractions, started=started)


# --------------------------------------------------------------------------- helpers
def _check_common(model: nn.Module, confidence: float, bound: str, sample_rate: float,
                  fit_kwargs: dict[str, Any]) -> str:
    """Check the audit's own arguments; pops ``grad_sample_mode`` from ``fit_kwargs`` and returns the mode
    the run will use."""
    _check_confidence(confidence)
    _check_bound(bound)
    if not check_real("sample_rate", sample_rate, "Poisson rate q in (0, 1]; 1 = full batch") <= 1:
        raise ValueError(f"sample_rate must be in (0, 1] (Poisson rate q; 1 = full batch), got {sample_rate!r}")
    if bound == "gdp" and sample_rate != 1:
        raise ValueError("bound='gdp' compares with the claim only for full-batch runs (sample_rate=1, exactly "
                         f"μ-GDP); Poisson-subsampled DP-SGD (q={sample_rate}) is not Gaussian: use 'steinke' "
                         "or 'fdp'")
    reserved = sorted(set(fit_kwargs) & set(_RESERVED))
    if reserved:
        raise ValueError(f"the audit sets {reserved} itself: pass sample_rate instead of batch_size; a "
                         "checkpointed or composed (prior) run is not the single run audited")
    return _resolve_mode(model, fit_kwargs.pop("grad_sample_mode", "auto"), fit_kwargs.get("clipping", "flat"))


def _resolve_mode(model: nn.Module, mode: str, clipping: str) -> str:
    """The mode fit runs the audit in. fit's "auto" picks "hooks" whenever a hook is given,
    but the canaries' hook runs in both modes, so "auto" here is what fit's default picks
    for this model WITHOUT a hook: the path users run ("bk" where every trainable layer has
    a book-keeping rule and clipping is flat, else "hooks")."""
    if mode not in AUDIT_MODES:
        raise ValueError(f"the canary rows are replaced in grad_sample_mode 'bk' (book-keeping: in the clipped sum) "
                         f"or 'hooks' (per-sample gradients); grad_sample_mode must be one of {AUDIT_MODES}, "
                         f"got {mode!r}")
    return resolve_grad_sample_mode(model, mode, per_sample_needed=clipping == "automatic")


def _real(train_set: Dataset | None) -> int:
    return 0 if train_set is None else len(train_set)


def _shapes(model: nn.Module) -> tuple[torch.Size, ...]:
    return tuple(p.shape for p in model.parameters() if p.requires_grad)


def _check_m(m: int) -> int:
    return check_int("m", m, "number of canaries", low=1)


def _streams(seed: int | None) -> list[np.random.Generator]:
    """Independent generators for membership, coordinates, tie-breaking and the run's seed."""
    if seed is not None:
        check_int("seed", seed, "audit seed; None keeps the randomness secret", low=0)
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)]


def _seeds(seed: int | None, streams: list[np.random.Generator]) -> tuple[int | None, int]:
    """(the run's seed: None keeps fit's secret randomness when the audit is unseeded; the tie-break seed)."""
    fit_seed = None if seed is None else int(streams[_FIT].integers(0, 2**62))
    return fit_seed, int(streams[_TIES].integers(0, 2**62))


def _fit(model: nn.Module, data: Dataset, hook: CanaryRows, fit_seed: int | None, mode: str, *, sample_rate: float,
         **fit_kwargs: Any) -> FitResult:
    """fit on real + all m canary rows: N, hence the batch q·N, q, σ and the divisor, never see the coin flips."""
    n = len(data)
    batch_size = min(n, max(1, round(sample_rate * n)))  # at q = 1 exactly the full batch
    fit_kwargs.setdefault("quiet", True)
    return fit(model, data, batch_size=batch_size, seed=fit_seed, grad_sample_hook=hook, grad_sample_mode=mode,
               **fit_kwargs)


def _result(canary: str, run: FitResult, mode: str, scores: np.ndarray, membership: np.ndarray, tie_seed: int, *,
            epsilon: float | None, delta: float, confidence: float, bound: str, fractions: Sequence[float],
            started: float) -> AuditResult:
    best = best_guesses(scores, membership, delta=delta, confidence=confidence, bound=bound,
                        fractions=fractions, tie_seed=tie_seed)
    return AuditResult(
        epsilon_lb=best.epsilon_lb, claimed_epsilon=None if run.report is None else float(run.report.epsilon),
        target_epsilon=epsilon, delta=delta, confidence=confidence, bound=bound, canary=canary,
        m=len(membership), included=int(membership.sum()), r=best.r, v=best.v, k_in=best.k_in, k_out=best.k_out,
        fractions=tuple(fractions), noise_multiplier=run.noise_multiplier, sample_rate=run.sample_rate,
        steps=run.steps, grad_sample_mode=mode, wall_time_s=time.perf_counter() - started,
        scores=tuple(float(s) for s in scores),
        membership=tuple(bool(b) for b in membership), tie_seed=tie_seed,
    )
