"""The private engine of one run: Opacus module, DP optimizer, loss, and one physical step.

Everything that touches gradients lives here, so the epoch loop never knows whether
per-sample gradients come from hooks or ghost clipping, nor where the noise comes from.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from opacus.grad_sample import prepare_module
from opacus.optimizers import DPOptimizer, get_optimizer_class
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

from ..tangent import per_sample_gradients_only
from .bookkeeping import BookKeepingModule, make_bk_module
from .distributed import Comm
from .precision import autocast, sample_in_parameter_precision
from .randomness import NoiseStream, noise_optimizer_class

__all__ = ["GradSampleHook", "ClippedSumHook", "PrivateEngine", "NO_CLIP"]

#: ``hook(indices, params)``: after a physical batch's backward, before Opacus clips it.
#: ``indices``: positions in the training set of the batch's rows; ``params``: the trainable
#: parameters, each with ``.grad_sample`` (B, *shape) that the hook may overwrite in place.
GradSampleHook = Callable[[torch.Tensor, Sequence[nn.Parameter]], None]


@runtime_checkable
class ClippedSumHook(Protocol):
    """A :data:`GradSampleHook` that also runs in book-keeping mode, where no per-sample gradient exists.

    Per non-empty physical batch, ``claims(indices)`` -> bool (B,) marks the rows whose
    gradients the hook supplies itself. Those rows are left out of the forward and backward,
    so nothing of their own reaches the clipped sum; after the backward of the other rows
    (each ``p.grad`` = their clipped sum Σ c_i g_i), ``add_clipped(indices, params)`` gets
    the claimed rows' positions and adds to ``p.grad`` one already clipped gradient (norm
    <= C, trusted, not re-clipped) per claimed row. Opacus then noises and scales the sum.
    """

    def claims(self, indices: torch.Tensor) -> torch.Tensor: ...

    def add_clipped(self, indices: torch.Tensor, params: Sequence[nn.Parameter]) -> None: ...


# Non-private training runs the same Opacus path with σ = 0 and a clipping norm no
# gradient reaches (clip factor min(1, C/‖g‖) = 1); C·σ = 0 exactly, so no noise.
NO_CLIP = 1e30


@dataclass
class PrivateEngine:
    """Opacus objects of one run and the physical-batch step.

    ``executed`` counts steps as Opacus takes them (after their noise): the "executed"
    side of the write-ahead ledger, as opposed to the steps it reserved.
    """

    model: nn.Module
    gsm: nn.Module
    optimizer: DPOptimizer
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    ghost: bool
    hook: GradSampleHook | None
    normalize: tuple[float, float] | None = None  # automatic clipping's (C, γ), None for flat clipping
    precision: str = "fp32"  # the forward's autocast (dp_taft.privacy.precision); privacy arithmetic stays fp32
    loss_reduction: str = "mean"  # how loss_fn reduces a batch: "sum" in bf16 (see build)
    executed: int = 0

    @classmethod
    def build(cls, model: nn.Module, module: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module, *,
              grad_sample_mode: str, noise_multiplier: float, max_grad_norm: float | None, expected_batch_size: float,
              noise: NoiseStream, hook: GradSampleHook | None, comm: Comm,
              normalize: tuple[float, float] | None = None, precision: str = "fp32") -> "PrivateEngine":
        """Wrap ``module`` (``model`` or a view of it that shares its parameters) for DP-SGD.

        ``max_grad_norm`` None: non-private (no clipping, σ must be 0). ``noise``: where the
        Gaussian noise comes from (:class:`~dp_taft.privacy.randomness.NoiseStream`).
        ``expected_batch_size``: q·N of the whole logical batch. In a distributed run
        (``comm``) the module is wrapped in Opacus' DPDDP (rank 0's weights broadcast) and
        Opacus' distributed optimizer noises on rank 0 and averages over the ranks.
        ``normalize`` (C, γ): automatic clipping (hooks mode), see :meth:`_normalize`.
        ``precision``: "fp32", or "bf16" (forward under autocast; per-sample gradients, norms,
        clipping, noise and update in float32: :mod:`dp_taft.privacy.precision`).
        """
        clip = NO_CLIP if max_grad_norm is None else max_grad_norm
        ghost, bk = grad_sample_mode == "ghost", grad_sample_mode == "bk"
        # In bf16 the backward starts from the SUMMED loss: a mean's 1/B would be rounded in bf16
        # with the batch size B, so one example joining a batch would move every other
        # example's per-sample gradient (by ~2⁻⁸ each); the optimizer still divides by q·N.
        reduction = "mean" if precision == "fp32" else "sum"
        if comm.distributed:
            module = DPDDP(module)
        if bk:  # book-keeping: p.grad holds the clipped sum after backward, as in ghost mode
            gsm = make_bk_module(module, clip, loss_reduction=reduction)
        else:
            gsm = prepare_module(module, grad_sample_mode=grad_sample_mode, batch_first=True,
                                 loss_reduction=reduction, **({"max_grad_norm": clip} if ghost else {}))
            if precision != "fp32":
                sample_in_parameter_precision(gsm)
        if reduction == "sum":
            criterion = copy.copy(criterion)
            criterion.reduction = "sum"
        base = get_optimizer_class(clipping="flat", distributed=comm.distributed,
                                   grad_sample_mode="ghost" if bk else grad_sample_mode)
        opt_class = base if noise.kind == "cuda" else noise_optimizer_class(base)
        # Each rank divides its (noised on rank 0) sum by its share of q·N, and the all-reduce
        # averages over ranks: together, (Σ clipped gradients + one noise draw) / (q·N).
        dp_opt = opt_class(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=clip,
                           expected_batch_size=expected_batch_size / comm.world, loss_reduction="mean",
                           generator=noise.generator)
        dp_opt.noise_stream = noise
        loss_fn = DPLossFastGradientClipping(gsm, dp_opt, criterion, "mean") if ghost else criterion
        engine = cls(model, gsm, dp_opt, loss_fn, ghost, hook, normalize, precision, reduction)
        dp_opt.attach_step_hook(engine._count)  # Opacus calls it after each noised step
        return engine

    def _count(self, _optimizer: DPOptimizer) -> None:
        self.executed += 1

    @torch.no_grad()
    def _normalize(self, clip: float, gamma: float) -> None:
        """Automatic clipping (Bu, Wang, Zha, Karypis, "Automatic clipping: differentially private
        deep learning made easier and stronger", NeurIPS 2023, eq. 4): g_i ← C·g_i/(‖g_i‖ + γ).

        Every row's norm is then below C (sensitivity C, as with flat clipping at C), so
        Opacus' clip factor min(1, C/‖g_i‖) that follows is 1 and the noise σ·C unchanged.
        """
        samples = [p.grad_sample for p in self.optimizer.params]
        norms = torch.stack([g.reshape(len(g), -1).norm(dim=1) for g in samples], dim=1).norm(dim=1)
        factor = clip / (norms + gamma)
        for g in samples:
            g.mul_(factor.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))

    def _claimed(self, indices: torch.Tensor) -> torch.Tensor | None:
        """Book-keeping mode with a hook: the rows it claims (bool, on the CPU); else None."""
        if self.hook is None or not isinstance(self.gsm, BookKeepingModule) or len(indices) == 0:
            return None
        return self.hook.claims(indices).cpu()

    @contextmanager
    def training(self) -> Iterator[None]:
        """Train mode for the block; afterwards Opacus' hooks are removed and the model is in eval mode."""
        with ExitStack() as stack:
            # In hooks mode the optimizer builds .grad from the per-sample gradients, so the
            # tangent's ΔW layers skip the summed gradient autograd would compute for nothing;
            # ghost clipping's second backward needs it.
            stack.enter_context(nullcontext() if self.ghost else per_sample_gradients_only(self.model))
            stack.enter_context(warnings.catch_warnings())
            # Opacus' backward hooks on the first trainable layer, whose input never needs a
            # gradient, make torch warn on every step; the per-sample gradients are exact.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            try:
                self.gsm.train()
                yield
            finally:
                self.gsm.to_standard_module()  # removes Opacus hooks and per-sample attributes
                self.model.eval()

    def physical_step(self, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor) -> tuple[float, bool]:
        """Forward/backward one physical batch and let Opacus clip, accumulate and (at the end
        of the logical batch) add noise and step.

        Returns (the batch's summed loss, 0 if empty; whether a DP-SGD step was taken).
        """
        before = self.executed
        loss_sum = 0.0
        claimed = self._claimed(indices)
        if claimed is not None:  # a ClippedSumHook's rows: never forwarded, their gradients come from the hook
            x, y = x[~claimed.to(x.device)], y[~claimed.to(y.device)]
        if len(y) == 0:
            # An empty Poisson batch still releases a noisy (all-noise) update: skipping it
            # would reveal that the batch was empty, which the accounting does not cover.
            for p in self.optimizer.params:
                p.grad = torch.zeros_like(p)
                p.grad_sample = p.new_zeros((0, *p.shape))
        else:
            with autocast(x.device, self.precision):  # the backward follows the forward's dtypes
                batch_loss = self.loss_fn(self.gsm(x), y)
            batch_loss.backward()
            if self.hook is not None and claimed is None:
                self.hook(indices, self.optimizer.params)
            if self.normalize is not None:
                self._normalize(*self.normalize)
            loss_sum = float(batch_loss.item()) * (len(y) if self.loss_reduction == "mean" else 1)
        if claimed is not None:
            self.hook.add_clipped(indices[claimed], self.optimizer.params)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss_sum, self.executed != before
