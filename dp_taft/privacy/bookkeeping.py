"""Book-keeping (BK) clipping: one forward, one backward, no per-example gradient tensor.

Bu, Wang, Zha, Karypis, *Differentially Private Optimization on Large Model at Small
Cost* (ICML 2023; fastDP). Every trainable Δ of a tangent model acts on the primal
input only (:class:`~dp_taft.tangent.linear.DeltaLinear`, LayerNorm affine,
:class:`~dp_taft.tangent.layerscale.DeltaScale`), so a forward hook can keep each Δ
layer's input A (B, T, d_in) and a tensor hook its output gradient G (B, T, d_out).
The per-example gradient of a linear Δ is ``g_i = A_iᵀ G_i`` and

    ‖g_i‖² = ⟨A_i A_iᵀ, G_i G_iᵀ⟩   (ghost norm, ~T²·(d_in + d_out) per example), or
    ‖g_i‖² = ‖A_iᵀ G_i‖²           (direct, ~T·d_in·d_out per example, in batch chunks),

whichever is cheaper for the layer (:func:`norm_method`), after dropping the token rows
whose output gradient is zero for the whole batch (:meth:`BookKeepingModule.nonzero_rows`).
No tensor of per-example gradients of a linear Δ is held (the direct branch forms them a
batch chunk at a time, for their norms only); LayerNorm and scale Δ have C-entry
per-example gradients, materialized in the hook. When the backward ends, an autograd callback
clips all Δ jointly (flat clipping, Opacus' factor ``min(1, C / (‖g_i‖ + 1e-6))``) and
writes ``p.grad = Σ_i c_i g_i`` — for a linear Δ one weighted matmul ``(c·G)ᵀ A`` over
the B·T rows. Opacus' ``DPOptimizerFastGradientClipping`` then accumulates physical
batches, adds the noise σ·C and scales, exactly as in ghost mode. See
:func:`make_bk_module` for the calling contract.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial

import timm.layers
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..tangent import UnsupportedModelError
from ..tangent.layerscale import DeltaScale
from ..tangent.linear import DeltaLinear, per_sample_gradients_only

__all__ = ["BK_RULES", "BookKeepingModule", "make_bk_module", "register_bk_rule", "require_bk_layers", "norm_method",
           "trainable_layers"]

#: Largest temporary (elements) a norm or clipped-sum chunk may allocate; the batch is split to fit.
CHUNK_ELEMENTS = 1 << 24
NORM_METHODS = ("auto", "ghost", "direct")


@dataclass
class _LinearState:
    """What a linear Δ keeps until the clip factors are known: A, G (flattened to (B, M, d))."""

    a: torch.Tensor | None  # None when the weight is frozen
    g: torch.Tensor | None
    g_sum: torch.Tensor | None  # Σ_t G_t (B, d_out), for the bias; None without a trainable bias
    weight: nn.Parameter
    bias: nn.Parameter | None
    sq_norms: torch.Tensor  # (B,) squared per-example norm of this layer's gradient

    def clipped_sum(self, w: torch.Tensor) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
        if self.a is not None:
            yield self.weight, _weighted_gram(self.g, self.a, w).view_as(self.weight)
        if self.g_sum is not None:
            yield self.bias, w @ self.g_sum


@dataclass
class _SampledState:
    """Small per-example gradients (C entries each), materialized in the hook."""

    grads: dict[nn.Parameter, torch.Tensor]  # param -> (B, *param.shape)
    sq_norms: torch.Tensor

    def clipped_sum(self, w: torch.Tensor) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
        for p, gs in self.grads.items():
            yield p, torch.tensordot(w, gs, dims=1)


Rule = Callable[[nn.Module, torch.Tensor, torch.Tensor, "BookKeepingModule"], "_LinearState | _SampledState"]
#: Exact layer class -> rule(layer, input A, output gradient G, the BookKeepingModule) -> state.
BK_RULES: dict[type[nn.Module], Rule] = {}


def register_bk_rule(*classes: type[nn.Module]) -> Callable[[Rule], Rule]:
    """Register a BK rule for layers of exactly these classes (subclasses are not matched)."""

    def decorate(rule: Rule) -> Rule:
        for cls in classes:
            BK_RULES[cls] = rule
        return rule

    return decorate


def norm_method(tokens: int, d_in: int, d_out: int) -> str:
    """"ghost" or "direct": the cheaper way to get ‖A_iᵀG_i‖² for one example.

    Ghost forms two T×T Gram matrices, T²·(d_in + d_out) multiply-adds; direct forms the
    d_out×d_in per-example gradient, T·d_in·d_out. Ghost wins iff T·(d_in+d_out) <= d_in·d_out.
    """
    return "ghost" if tokens * (d_in + d_out) <= d_in * d_out else "direct"


def _chunks(total: int, per_item: int) -> Iterator[slice]:
    step = max(1, CHUNK_ELEMENTS // max(per_item, 1))
    for start in range(0, total, step):
        yield slice(start, min(start + step, total))


def _by_chunks(fn: Callable[..., torch.Tensor], per_item: int, *tensors: torch.Tensor) -> torch.Tensor:
    """fn over batch chunks of ``tensors`` (at most CHUNK_ELEMENTS temporaries each), results concatenated."""
    parts = [fn(*(t[s] for t in tensors)) for s in _chunks(tensors[0].shape[0], per_item)]
    return parts[0] if len(parts) == 1 else torch.cat(parts) if parts else tensors[0].new_zeros(0)


def _ghost_sq(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """‖A_iᵀG_i‖² = ⟨A_iA_iᵀ, G_iG_iᵀ⟩ for every example i of the chunk."""
    gram_a = torch.bmm(a, a.transpose(1, 2)).flatten(1)
    return torch.linalg.vecdot(gram_a, torch.bmm(g, g.transpose(1, 2)).flatten(1)).clamp_(min=0)


def _direct_sq(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """‖A_iᵀG_i‖² from the chunk's per-example gradients."""
    per_example = torch.bmm(g.transpose(1, 2), a).flatten(1)
    return torch.linalg.vecdot(per_example, per_example)


def _weighted_gram(g: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i G_iᵀ A_i (d_out, d_in) as matmuls over the B·M rows, scaling the narrower side."""
    b, m, d_in = a.shape
    d_out = g.shape[2]
    out = None
    for s in _chunks(b, m * min(d_in, d_out)):
        ws = w[s, None, None]
        if d_out <= d_in:
            left, right = (g[s] * ws).reshape(-1, d_out).T, a[s].reshape(-1, d_in)
        else:
            left, right = g[s].reshape(-1, d_out).T, (a[s] * ws).reshape(-1, d_in)
        out = torch.mm(left, right) if out is None else out.addmm_(left, right)
    return a.new_zeros(d_out, d_in) if out is None else out


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(B, ..., d) -> (B, M, d), M the product of the middle dimensions (1 for (B, d))."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:-1]), t.shape[-1])


@register_bk_rule(DeltaLinear, nn.Linear)
def _linear_rule(layer: nn.Module, a: torch.Tensor, g: torch.Tensor, owner: "BookKeepingModule") -> _LinearState:
    a, g = owner.nonzero_rows(layer, _flat(a.to(g.dtype)), _flat(g))
    b, m, d_in = a.shape
    parts = []
    keep = layer.weight.requires_grad
    if keep:
        use = norm_method(m, d_in, g.shape[2]) if owner.norm_method == "auto" else owner.norm_method
        chunk_size = 2 * m * m if use == "ghost" else d_in * g.shape[2]  # temporaries per example
        parts.append(_by_chunks(_ghost_sq if use == "ghost" else _direct_sq, chunk_size, a, g))
    bias = layer.bias if layer.bias is not None and layer.bias.requires_grad else None
    g_sum = g.sum(dim=1) if bias is not None else None
    if g_sum is not None:
        parts.append(torch.linalg.vecdot(g_sum, g_sum))
    sq = parts[0] if len(parts) == 1 else parts[0] + parts[1]
    return _LinearState(a if keep else None, g if keep else None, g_sum, layer.weight, bias, sq)


def _sampled(grads: dict[nn.Parameter | None, Callable[[], torch.Tensor]], batch: int) -> _SampledState:
    """Per-example gradients of the trainable params: ``make()`` summed over all but batch and param dims."""
    out = {p: (full := make()).reshape(batch, math.prod(full.shape[1:]) // p.numel(), *p.shape).sum(dim=1)
           for p, make in grads.items() if p is not None and p.requires_grad}
    return _SampledState(out, torch.stack([torch.linalg.vecdot(g.flatten(1), g.flatten(1)) for g in out.values()]).sum(0))


@register_bk_rule(nn.LayerNorm, timm.layers.LayerNorm)
def _layer_norm_rule(layer: nn.LayerNorm, a: torch.Tensor, g: torch.Tensor, owner: "BookKeepingModule") -> _SampledState:
    x_hat = lambda: F.layer_norm(a.to(g.dtype), layer.normalized_shape, eps=layer.eps) * g  # noqa: E731
    return _sampled({layer.weight: x_hat, layer.bias: lambda: g}, g.shape[0])


@register_bk_rule(DeltaScale, timm.layers.LayerScale)
def _scale_rule(layer: nn.Module, a: torch.Tensor, g: torch.Tensor, owner: "BookKeepingModule") -> _SampledState:
    param = layer.weight if isinstance(layer, DeltaScale) else layer.gamma
    return _sampled({param: lambda: a.to(g.dtype) * g}, g.shape[0])


def trainable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module that owns a parameter with ``requires_grad``."""
    return [(n, m) for n, m in model.named_modules() if any(p.requires_grad for p in m.parameters(recurse=False))]


def require_bk_layers(model: nn.Module) -> None:
    """Refuse any trainable layer without an exact BK rule (before any budget is spent)."""
    bad = [f"'{n}' ({type(m).__module__}.{type(m).__qualname__})" for n, m in trainable_layers(model)
           if type(m) not in BK_RULES]
    if bad:
        supported = ", ".join(sorted(f"{c.__module__}.{c.__qualname__}" for c in BK_RULES))
        raise UnsupportedModelError(
            f"book-keeping clipping (grad_sample_mode='bk') has no rule for the trainable layer(s) {', '.join(bad)}. "
            f"Supported layer classes (exact match): {supported}. Freeze those layers (requires_grad_(False)), "
            "use grad_sample_mode='hooks' or 'ghost', or add a rule with dp_taft.privacy.bookkeeping.register_bk_rule."
        )


@dataclass
class _Pass:
    """Book of one forward/backward pass."""

    inputs: dict[nn.Module, torch.Tensor] = field(default_factory=dict)  # captured A, until G arrives
    states: dict[nn.Module, _LinearState | _SampledState] = field(default_factory=dict)
    checks: list[torch.Tensor] = field(default_factory=list)  # max |G| over rows dropped by the cache
    queued: bool = False


class BookKeepingModule(nn.Module):
    """Wraps ``module``; after each ``loss.backward()``, every trainable ``p.grad`` holds the
    flat-clipped sum ``Σ_i c_i g_i`` of this batch's per-example gradients. Build with
    :func:`make_bk_module`.

    ``per_sample_gradient_norms`` and ``clip_factors`` (B,) of the last batch are kept
    for tests and debugging; they are NOT private.
    """

    def __init__(self, module: nn.Module, *, max_grad_norm: float, loss_reduction: str = "mean",
                 norm_method: str = "auto") -> None:
        super().__init__()
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum' (how the loss reduces the batch), got {loss_reduction!r}")
        if norm_method not in NORM_METHODS:
            raise ValueError(f"norm_method must be one of {NORM_METHODS}, got {norm_method!r}")
        if not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 (per-sample clipping norm C), got {max_grad_norm!r}")
        require_bk_layers(module)
        self._module = module
        self.max_grad_norm = float(max_grad_norm)
        self.loss_reduction = loss_reduction
        self.norm_method = norm_method
        self._layers = [m for _, m in trainable_layers(module)]
        self._params = [p for m in self._layers for p in m.parameters(recurse=False) if p.requires_grad]
        self._pass = _Pass()
        self._capturing = False
        self._rows: dict[nn.Module, tuple[int, torch.Tensor | None, torch.Tensor | None]] = {}
        self._pending_check: tuple[torch.Tensor, torch.cuda.Event | None] | None = None
        self.defer_row_checks = False  # CPU: check before writing .grad (CUDA always defers, see _check_rows)
        self._handles = [m.register_forward_hook(self._capture) for m in self._layers]
        self.per_sample_gradient_norms: torch.Tensor | None = None
        self.clip_factors: torch.Tensor | None = None

    def forward(self, *args, **kwargs):
        self._settle_checks()
        self._pass = _Pass()  # a pass whose backward never ran is dropped
        self._capturing = True  # only forwards through this wrapper are booked
        try:
            with per_sample_gradients_only(self._module):  # BK writes .grad: autograd skips ΔW's sum
                return self._module(*args, **kwargs)
        finally:
            self._capturing = False

    def to_standard_module(self) -> nn.Module:
        """Remove the hooks and return the wrapped module (as Opacus' GradSampleModule does)."""
        self._settle_checks()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._pass = _Pass()
        return self._module

    def nonzero_rows(self, layer: nn.Module, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, G) (B, M, d) restricted to the token rows whose output gradient is non-zero for some example.

        A row t with G[:, t] = 0 adds exactly nothing to any A_iᵀG_i. With token pooling, the
        last block's proj, fc1 and fc2 only matter through the class token: their norms and
        clipped sums then cost 1/T of the dense ones. Which rows are zero is structural, so it
        is found once per layer (one host sync) and cached; later passes only check, on the
        device, that the dropped rows are still zero (:meth:`_check_rows`). Dropping a row
        wrongly would not weaken privacy, since norms and clipped sums use the same rows.
        """
        b, m, _ = g.shape
        if b == 0 or m == 1:
            return a, g
        cached = self._rows.get(layer)
        if cached is not None and cached[0] == m and cached[1] is None:
            return a, g  # dense layer: nothing to find or check
        hi, lo = g.amax(dim=2).amax(dim=0), g.amin(dim=2).amin(dim=0)  # (M,); no temporary of G's size
        if cached is None or cached[0] != m:
            keep = (hi != 0) | (lo != 0)  # NaN rows are kept
            dense = bool(keep.all())  # host sync: first pass of this layer only
            cached = (m, None, None) if dense else (m, keep.nonzero().squeeze(1), ~keep)
            self._rows[layer] = cached
            if dense:
                return a, g
        else:
            dropped = cached[2]
            self._pass.checks.append(torch.where(dropped, torch.maximum(hi.abs(), lo.abs()), 0).amax())
        rows = cached[1]
        return a.index_select(1, rows), g.index_select(1, rows)

    def _check_rows(self, book: _Pass) -> None:
        """Were the rows dropped by the cache zero in this pass? On CPU, answered now (before
        anything is written); on CUDA, copied to the host without a sync and answered at the
        next forward, so the optimizer's kernels still queue behind the backward's."""
        if not book.checks:
            return
        bad = torch.stack(book.checks).amax() != 0  # NaN counts as non-zero
        if not (bad.is_cuda or self.defer_row_checks):
            if bad:
                self._rows_failed(deferred=False)
            return
        host, event = bad, None
        if bad.is_cuda:
            host, event = torch.empty((), dtype=torch.bool, pin_memory=True), torch.cuda.Event()
            host.copy_(bad, non_blocking=True)
            event.record()
        self._pending_check = (host, event)

    def _settle_checks(self) -> None:
        """Raise if the previous pass's deferred row check failed."""
        pending, self._pending_check = self._pending_check, None
        if pending is None:
            return
        host, event = pending
        if event is not None:
            event.synchronize()
        if bool(host):
            self._rows_failed(deferred=True)

    def _rows_failed(self, *, deferred: bool) -> None:
        self._rows.clear()
        for p in [] if deferred else self._params:  # autograd's unclipped LayerNorm/scale sums: never step on them
            p.grad = None
        what = ("the previous batch's update was computed without them: still differentially private (its norms "
                "and clipped sums came from the same rows) but not exact" if deferred
                else "nothing was written to .grad (cleared): rerun this batch")
        raise RuntimeError(
            "book-keeping: token rows whose output gradient was zero in earlier batches were not zero (or "
            f"held NaN/inf); {what}. The row cache is cleared and will be rebuilt."
        )

    def _capture(self, layer: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not (self._capturing and layer.training and torch.is_grad_enabled()):
            return
        if not torch.is_tensor(output):
            raise UnsupportedModelError(f"book-keeping needs a tensor output from {type(layer).__name__}")
        if not output.requires_grad:
            return
        if layer in self._pass.inputs or layer in self._pass.states:
            raise NotImplementedError(
                f"{type(layer).__name__} ran twice in one forward pass (parameter tying): book-keeping "
                "clipping needs one call per layer; use grad_sample_mode='hooks'."
            )
        self._pass.inputs[layer] = inputs[0].detach()
        output.register_hook(partial(self._on_grad, layer, self._pass))

    def _on_grad(self, layer: nn.Module, book: _Pass, grad: torch.Tensor) -> None:
        if book is not self._pass:
            return
        a = book.inputs.pop(layer)
        book.states[layer] = BK_RULES[type(layer)](layer, a, grad.detach(), self)
        if not book.queued:
            book.queued = True
            torch.autograd.Variable._execution_engine.queue_callback(partial(self._finish, book))

    def _finish(self, book: _Pass) -> None:
        """At the end of backward: joint norms, clip factors, p.grad = Σ_i c_i g_i."""
        if book is self._pass:
            self._pass = _Pass()  # hooks of a later backward through the same graph find no book
        states = book.states
        sizes = {len(s.sq_norms) for s in states.values()}
        if len(sizes) != 1:
            raise RuntimeError(f"book-keeping: layers saw different batch sizes {sorted(sizes)} in one pass")
        (batch,) = sizes
        self._check_rows(book)
        scale = float(batch) if self.loss_reduction == "mean" else 1.0  # per-example loss = B · (its share of the mean)
        norms = torch.stack([s.sq_norms for s in states.values()]).sum(dim=0).sqrt_().mul_(scale)
        clip = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        self.per_sample_gradient_norms, self.clip_factors = norms, clip
        weights = clip * scale
        done = set()
        for layer in list(states):
            for p, grad in states.pop(layer).clipped_sum(weights):
                p.grad = grad.to(p.dtype)
                done.add(p)
        for p in self._params:  # layers that did not run or got no gradient: zero per-example gradient
            if p not in done:
                p.grad = torch.zeros_like(p)
        book.inputs.clear()


def make_bk_module(module: nn.Module, max_grad_norm: float, *, loss_reduction: str = "mean",
                   norm_method: str = "auto") -> BookKeepingModule:
    """Wrap ``module`` (all trainable layers of a class in :data:`BK_RULES`) for book-keeping clipping.

    Per physical batch: ``criterion(bk(x), y).backward()`` (the criterion reducing by
    ``loss_reduction``), after which every trainable ``p.grad`` is the batch's clipped sum
    Σ_i c_i g_i, c_i = min(1, C / (‖g_i‖ + 1e-6)) over all Δ jointly; then ``dp_opt.step();
    dp_opt.zero_grad()`` with Opacus' ``DPOptimizerFastGradientClipping``
    (``get_optimizer_class("flat", False, "ghost")``), which accumulates the physical batches
    of a logical batch, adds N(0, σ²C²) and divides by the expected batch size. ``norm_method``:
    "auto" (the cheaper per layer, :func:`norm_method`), or "ghost"/"direct" everywhere.
    """
    return BookKeepingModule(module, max_grad_norm=max_grad_norm, loss_reduction=loss_reduction,
                             norm_method=norm_method)
