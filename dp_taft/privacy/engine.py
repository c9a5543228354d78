"""The private engine of one run: Opacus module, DP optimizer, loss, and one physical step.

Everything that touches gradients lives here, so the epoch loop never knows whether
per-sample gradients come from hooks or ghost clipping, nor where the noise comes from.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
from opacus.grad_sample import prepare_module
from opacus.optimizers import DPOptimizer, get_optimizer_class
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

from ..tangent import per_sample_gradients_only
from .randomness import secure_optimizer_class

__all__ = ["GradSampleHook", "PrivateEngine", "NO_CLIP"]

#: ``hook(indices, params)``: after a physical batch's backward, before Opacus clips it.
#: ``indices``: positions in the training set of the batch's rows; ``params``: the trainable
#: parameters, each with ``.grad_sample`` (B, *shape) that the hook may overwrite in place.
GradSampleHook = Callable[[torch.Tensor, Sequence[nn.Parameter]], None]

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
    executed: int = 0

    @classmethod
    def build(cls, model: nn.Module, module: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module, *,
              grad_sample_mode: str, noise_multiplier: float, max_grad_norm: float | None, expected_batch_size: float,
              noise_rng: torch.Generator | None, hook: GradSampleHook | None) -> "PrivateEngine":
        """Wrap ``module`` (``model`` or a view of it that shares its parameters) for DP-SGD.

        ``max_grad_norm`` None: non-private (no clipping, σ must be 0). ``noise_rng`` None
        selects secure mode: noise from the OS CSPRNG (:mod:`dp_taft.privacy.randomness`).
        """
        clip = NO_CLIP if max_grad_norm is None else max_grad_norm
        ghost = grad_sample_mode == "ghost"
        gsm = prepare_module(module, grad_sample_mode=grad_sample_mode, batch_first=True, loss_reduction="mean",
                             **({"max_grad_norm": clip} if ghost else {}))
        base = get_optimizer_class(clipping="flat", distributed=False, grad_sample_mode=grad_sample_mode)
        opt_class = secure_optimizer_class(base) if noise_rng is None else base
        dp_opt = opt_class(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=clip,
                           expected_batch_size=expected_batch_size, loss_reduction="mean", generator=noise_rng)
        loss_fn = DPLossFastGradientClipping(gsm, dp_opt, criterion, "mean") if ghost else criterion
        engine = cls(model, gsm, dp_opt, loss_fn, ghost, hook)
        dp_opt.attach_step_hook(engine._count)  # Opacus calls it after each noised step
        return engine

    def _count(self, _optimizer: DPOptimizer) -> None:
        self.executed += 1

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
        if len(y) == 0:
            # An empty Poisson batch still releases a noisy (all-noise) update: skipping it
            # would reveal that the batch was empty, which the accounting does not cover.
            for p in self.optimizer.params:
                p.grad = torch.zeros_like(p)
                p.grad_sample = p.new_zeros((0, *p.shape))
        else:
            batch_loss = self.loss_fn(self.gsm(x), y)
            batch_loss.backward()
            if self.hook is not None:
                self.hook(indices, self.optimizer.params)
            loss_sum = float(batch_loss.item()) * len(y)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss_sum, self.executed != before
