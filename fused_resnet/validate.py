"""compare(reference, fused, x): the numbers that say whether two networks are the same network."""

import dataclasses

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class Comparison:
    """How far `fused`'s output is from `reference`'s on one batch.

    max_abs_err: the largest |fused - reference| over all outputs.
    max_rel_err: max_abs_err divided by the largest |reference| (a norm-wise relative error, which
        stays meaningful where single outputs are near zero).
    top1_agreement: the fraction of samples whose arg-max class is the same in both.
    worst_index: where max_abs_err occurs, as an index into the output.
    nonfinite_mismatch: outputs where exactly one side is NaN or Inf, or both are but differ.
    """

    max_abs_err: float
    max_rel_err: float
    top1_agreement: float
    worst_index: tuple
    nonfinite_mismatch: int
    reference_dtype: str
    fused_dtype: str

    def as_dict(self):
        return dataclasses.asdict(self)

    def __str__(self):
        return (f"max abs err {self.max_abs_err:.3e}, max rel err {self.max_rel_err:.3e}, "
                f"top-1 agreement {self.top1_agreement:.1%} ({self.fused_dtype} vs {self.reference_dtype})")


def _dtype_device(model):
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype, t.device
    raise ValueError(f"compare: {type(model).__name__} has no floating-point parameters or buffers")


@torch.no_grad()
def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """model(x) in eval mode, with x cast to the model's dtype and device; the mode is restored."""
    dtype, device = _dtype_device(model)
    was_training = model.training
    model.eval()
    try:
        return model(x.to(device=device, dtype=dtype))
    finally:
        if was_training:
            model.train()


def compare(reference: nn.Module, fused: nn.Module, x: torch.Tensor) -> Comparison:
    """Run both networks on `x` (each in its own dtype and device, eval mode) and compare outputs.

    The errors are computed in float64 on the CPU. Outputs are expected as (N, classes) logits for
    top1_agreement; other shapes compare element-wise and count agreement over the last dimension.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("compare: x must be a floating-point tensor")
    ref_out = run(reference, x)
    fused_out = run(fused, x)
    if ref_out.shape != fused_out.shape:
        raise ValueError(f"compare: output shapes differ: reference {tuple(ref_out.shape)}, fused {tuple(fused_out.shape)}")
    r = ref_out.detach().to("cpu", torch.float64)
    f = fused_out.detach().to("cpu", torch.float64)
    same_nonfinite = (torch.isnan(r) & torch.isnan(f)) | ((r == f) & torch.isinf(r))
    nonfinite = ~torch.isfinite(r) | ~torch.isfinite(f)
    mismatch = int((nonfinite & ~same_nonfinite).sum())
    diff = torch.where(nonfinite, torch.zeros_like(r), (f - r).abs())
    if diff.numel():
        flat = int(diff.argmax())
        worst = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
        max_abs = float(diff.max())
        scale = float(torch.where(nonfinite, torch.zeros_like(r), r.abs()).max())
    else:
        worst, max_abs, scale = (), 0.0, 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    if r.dim() >= 1 and r.shape[-1] > 0 and r.numel():
        top1 = float((r.argmax(-1) == f.argmax(-1)).double().mean())
    else:
        top1 = 1.0
    return Comparison(max_abs, max_rel, top1, worst, mismatch, str(_dtype_device(reference)[0]),
                      str(_dtype_device(fused)[0]))
