"""Book-keeping (BK) clipping: one forward, one backward, no per-example gradient tensor.

Bu, Wang, Zha, Karypis, *Differentially Private Optimization on Large Model at Small
Cost* (ICML 2023; fastDP). Every trainable Δ of a tangent model acts on the primal
input only (:class:`~dp_taft.tangent.linear.DeltaLinear`, LayerNorm affine,
:class:`~dp_taft.tangent.layerscale.DeltaScale`), so a forward hook can keep each Δ
layer's input A (B, T, d_in) and a tensor hook its output gradient G (B, T, d_out).
The per-example gradient of a linear Δ is ``g_i = A_iᵀ G_i`` and

    ‖g_i‖² = ⟨A_i A_iᵀ, G_i G_iᵀ⟩   (ghost norm, ~T²·(d_in + d_out) per example), or
    ‖g_i‖² = ‖A_iᵀ G_i‖²           (direct, ~T·d_in·d_out per example, in batch chunks),

whichever is cheaper for the layer (:func:`~.bk_kernels.norm_method`), after dropping the token rows
whose output gradient is zero for the whole batch (:meth:`BookKeepingModule.nonzero_rows`).
No tensor of per-example gradients of a linear Δ is held (the direct branch forms them a
batch chunk at a time, for their norms only); LayerNorm and scale Δ have C-entry
per-example gradients, materialized in the hook. When the backward ends, an autograd callback
clips all Δ jointly (flat clipping, Opacus' factor ``min(1, C / (‖g_i‖ + 1e-6))``) and
writes ``p.grad = Σ_i c_i g_i`` — for a linear Δ one weighted matmul ``(c·G)ᵀ A`` over
the B·T rows. Opacus' ``DPOptimizerFastGradientClipping`` then accumulates physical
batches, adds the noise σ·C and scales, exactly as in ghost mode. See
:func:`make_bk_module` for the calling contract; the rule of each layer class (linear Δ,
LayerNorm, scales, position tables, added parameters) is in :mod:`dp_taft.privacy.bk_rules`.
"""

from __future__ import annotations

from typing import Any
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn

from ..tangent import UnsupportedModelError
from ..tangent.linear import per_sample_gradients_only
from .bk_rules import BK_RULES, BookState
from .precision import full_precision

__all__ = ["BookKeepingModule", "make_bk_module", "require_bk_layers", "trainable_layers"]

NORM_METHODS = ("auto", "ghost", "direct")  # how a linear layer's per-example norms are computed


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
            "use grad_sample_mode='hooks' or 'ghost', or add a rule with dp_taft.privacy.bk_rules.register_bk_rule."
        )


@dataclass
class _Pass:
    """Book of one forward/backward pass."""

    inputs: dict[nn.Module, torch.Tensor] = field(default_factory=dict)  # captured A, until G arrives
    states: dict[nn.Module, BookState] = field(default_factory=dict)
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
        self._rows_found = False  # by a public dummy pass (_find_rows), before the first real batch
        self._probing = False
        self._pending_check: tuple[torch.Tensor, torch.cuda.Event | None] | None = None
        self.defer_row_checks = False  # CPU: check before writing .grad (CUDA always defers, see _check_rows)
        self._handles = [m.register_forward_hook(self._capture) for m in self._layers]
        self.per_sample_gradient_norms: torch.Tensor | None = None
        self.clip_factors: torch.Tensor | None = None

    def forward(self, *args, **kwargs):
        self._settle_checks()
        if not self._rows_found and self._module.training and torch.is_grad_enabled():
            self._find_rows(args, kwargs)
        return self._booked_forward(*args, **kwargs)

    def _booked_forward(self, *args, **kwargs):
        self._pass = _Pass()  # a pass whose backward never ran is dropped
        self._capturing = True  # only forwards through this wrapper are booked
        try:
            with per_sample_gradients_only(self._module):  # BK writes .grad: autograd skips ΔW's sum
                return self._module(*args, **kwargs)
        finally:
            self._capturing = False

    def _find_rows(self, args: tuple, kwargs: dict) -> None:
        """Decide which token rows each layer may drop from a public dummy pass, not from data.

        Two examples of Gaussian noise with the real batch's shape (shape, dtype and device only)
        and a Gaussian output gradient, from a fixed public seed: a row that is zero for them is
        zero for every input (token pooling), any other row is non-zero with probability 1. So
        the choice never depends on the private data, and no later batch can contradict it
        (only NaN/inf can, see :meth:`_check_rows`; or a model whose zero rows depend on its
        input, which no layer here has). Nothing of the pass is kept but the rows; its own
        draws come from a private generator (a dropout left active in the module would still
        draw from torch's global one).
        """
        tensors = [t for t in (*args, *kwargs.values()) if torch.is_tensor(t)]
        self._rows_found = True
        if not tensors or not all(t.is_floating_point() and t.dim() >= 1 for t in tensors):
            return  # not an image/feature input: every row is kept (exact, only slower)
        gen = torch.Generator(device=tensors[0].device).manual_seed(0)

        def dummy(t: Any) -> Any:
            if not torch.is_tensor(t):
                return t
            return torch.randn((2, *t.shape[1:]), generator=gen, device=t.device, dtype=t.dtype)

        self._probing = True
        try:
            out = self._booked_forward(*map(dummy, args), **{k: dummy(v) for k, v in kwargs.items()})
            if out.requires_grad:
                out.backward(torch.randn(out.shape, generator=gen, device=out.device, dtype=out.dtype))
        finally:
            self._probing = False
            self._pass = _Pass()
            for p in self._params:
                p.grad = None
            self.per_sample_gradient_norms = self.clip_factors = None

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
        clipped sums then cost 1/T of the dense ones. Which rows are zero is structural: it is
        found once per layer from the public dummy pass of :meth:`_find_rows` (one host sync)
        and cached; real passes only check, on the device, that the dropped rows are still
        zero (:meth:`_check_rows`), and a layer the dummy pass did not settle (another token
        count) keeps every row, as does a layer marked ``bk_every_row = True``, whose zero rows
        move with its trained parameters (Swin v2's position-bias MLP under NLFT). Dropping a
        row wrongly would not weaken privacy, since norms and clipped sums use the same rows.
        """
        b, m, _ = g.shape
        if b == 0 or m == 1 or getattr(layer, "bk_every_row", False):
            return a, g
        cached = self._rows.get(layer)
        settled = cached is not None and cached[0] == m
        if (settled and cached[1] is None) or not (settled or self._probing):
            return a, g  # dense, or not settled by the dummy pass: never decided from private data
        hi, lo = g.amax(dim=2).amax(dim=0), g.amin(dim=2).amin(dim=0)  # (M,); no temporary of G's size
        if not settled:
            keep = (hi != 0) | (lo != 0)
            # host sync: first pass of this layer only. No structure zeroes every row: a layer with
            # no gradient at all in the dummy pass is silenced by its parameters (e.g. Swin v2's
            # zero-initialised post-norms), which training changes; it keeps every row.
            dense = bool(keep.all()) or not bool(keep.any())
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
        self._rows_found = False
        for p in [] if deferred else self._params:  # autograd's unclipped LayerNorm/scale sums: never step on them
            p.grad = None
        what = ("the previous batch's update was computed without them: still differentially private (its norms "
                "and clipped sums came from the same rows) but not exact" if deferred
                else "nothing was written to .grad (cleared): rerun this batch")
        raise RuntimeError(
            "book-keeping: token rows whose output gradient was zero in earlier batches were not zero (or "
            f"held NaN/inf); {what}. Check the batch for NaN/inf; the row cache is cleared and found again from "
            "a dummy pass (if this repeats, the model's zero rows depend on its input: use grad_sample_mode='hooks')."
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
        # In the parameters' precision (float32 under bf16 autocast): the norms, clip factors
        # and clipped sums the sensitivity argument rests on (dp_taft.privacy.precision).
        dtype = next(p for p in layer.parameters(recurse=False) if p.requires_grad).dtype
        a = book.inputs.pop(layer)
        with full_precision(grad.device):
            book.states[layer] = BK_RULES[type(layer)](layer, a.to(dtype), grad.detach().to(dtype), self)
        if not book.queued:
            book.queued = True
            torch.autograd.Variable._execution_engine.queue_callback(partial(self._finish, book))

    def _finish(self, book: _Pass) -> None:
        """At the end of backward: joint norms, clip factors, p.grad = Σ_i c_i g_i."""
        with full_precision(self._params[0].device):
            self._clip(book)

    def _clip(self, book: _Pass) -> None:
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
