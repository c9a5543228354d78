"""Mixed precision with the DP guarantee intact: the model in bf16, the privacy arithmetic in fp32.

``fit(precision="bf16")`` runs the forward pass (and so the backward, which follows the
forward's dtypes) under ``torch.autocast`` in bfloat16: the matmuls of the model, its
tangent and the frozen prefix. Everything the sensitivity argument of DP-SGD rests on is
computed in the parameters' precision (float32):

* per-sample gradients are formed from the layer inputs and output gradients cast to
  float32 (book-keeping: :mod:`~dp_taft.privacy.bookkeeping`; Opacus' hooks: the samplers
  wrapped by :func:`in_parameter_precision`), so each example's gradient g_i, its norm
  ‖g_i‖, the clip factor c_i = min(1, C / (‖g_i‖ + 1e-6)) and the clipped sum Σ c_i g_i are
  float32 computations on the same g_i;
* the backward starts from the summed loss, not the mean: a 1/B rounded in bf16 would make
  every example's gradient depend on how many others share its batch (measured: the others'
  clipped sum moved by 2-3 % of C when one example joined a batch of 32);
* the noise N(0, σ²C²) is drawn in float64 on CPU and in secure mode, in float32 (torch's
  Philox) on CUDA, and added to the float32 sum; the update of Δw, the optimiser state and
  the parameters stay float32.

So each clipped contribution has norm ≤ C up to float32 rounding of its own norm, which we
test to ≤ C·(1 + :data:`CLIP_TOLERANCE`) (``tests/test_precision.py``), and the noise has
std σ·C exactly as in a float32 run: the guarantee is the float32 run's. bf16 changes *which*
g_i an example produces (its activations are rounded to 8 significant bits), a function of
that example (tested: unchanged to 1e-4·C when another example joins its batch), hence not
the privacy argument, only the accuracy. Kernels whose rounding depends on the batch size
can still move it in its last bits, as in float32.

Ghost clipping is refused in bf16: its clipped sum is a second backward pass, which would
run in bf16 and could carry a contribution above C by the rounding of bf16 (2⁻⁸).
fp16 is not offered (the config refuses it): it needs loss scaling, and a scaled per-sample
gradient must be unscaled before its norm, which Opacus' and our samplers do not do; bf16
has float32's range.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
import torch.nn as nn

__all__ = ["PRECISIONS", "CLIP_TOLERANCE", "autocast", "check_precision", "full_precision", "in_parameter_precision",
           "sample_in_parameter_precision"]

#: ``precision`` name -> autocast dtype (None: no autocast, every op in the parameters' dtype).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}
#: Relative excess over C that float32 rounding of a per-sample norm may leave on a clipped
#: contribution (measured ≤ 1.3e-7 on the models of tests/test_precision.py; this bound is the one
#: tested). Opacus' own mixed precision takes the norms of bf16 per-sample gradients: measured
#: up to 1.8e-3 there, which is why the samplers are wrapped.
CLIP_TOLERANCE = 1e-5


def check_precision(precision: str, device: str | torch.device, grad_sample_mode: str) -> None:
    """Refuse a precision this device (``"cpu"``, ``"cuda:1"``, ...) or clipping mode cannot run with the
    guarantee intact."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return
    if grad_sample_mode == "ghost":
        raise ValueError("precision='bf16' with grad_sample_mode='ghost' is refused: ghost clipping forms the clipped "
                         "sum in a second bf16 backward, where a contribution may exceed C by bf16 rounding. Use "
                         "grad_sample_mode='bk' or 'hooks' (or 'auto'), whose clipped sums are float32")
    if str(device).startswith("cuda") and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision='bf16' needs a GPU with bfloat16 support; {torch.cuda.get_device_name()} "
                         "has none: use precision='fp32'")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The forward pass's context: ``torch.autocast`` to the precision's dtype, or nothing for fp32."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off: the privacy arithmetic runs in its inputs' dtype even when a backward is
    started inside an autocast region (book-keeping's public dummy pass is)."""
    return torch.autocast(device.type, enabled=False)


def in_parameter_precision(sampler: Callable[..., dict[nn.Parameter, torch.Tensor]]
                           ) -> Callable[..., dict[nn.Parameter, torch.Tensor]]:
    """An Opacus grad or norm sampler fed with float32 (the layer's parameter dtype) inputs.

    Under autocast a layer's saved input may be float32 and its output gradient bf16; the
    sampler then forms every per-sample gradient (or norm) in the parameters' dtype.
    """

    @functools.wraps(sampler)
    def sampled(layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor
                ) -> dict[nn.Parameter, torch.Tensor]:
        dtype = next(layer.parameters()).dtype
        cast = [a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in activations]
        with full_precision(backprops.device):
            return sampler(layer, cast, backprops.to(dtype))

    return sampled


def sample_in_parameter_precision(gsm: nn.Module) -> None:
    """Make Opacus' ``gsm`` (a GradSampleModule, hooks mode) use :func:`in_parameter_precision` samplers.

    Opacus looks its samplers up as ``self.GRAD_SAMPLERS``: an instance copy with wrapped
    functions leaves the class-wide registry untouched. (Ghost mode's norm samplers are not
    wrapped: ghost clipping is refused in bf16.)
    """
    gsm.GRAD_SAMPLERS = {cls: in_parameter_precision(fn) for cls, fn in gsm.GRAD_SAMPLERS.items()}

