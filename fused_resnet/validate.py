"""compare(reference, fused, x): the numbers that say whether two networks are the same network."""

import dataclasses

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck


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
                f"top-1 agreement {self.top1_agreement:.1%} "
                f"(fused {self.fused_dtype} vs reference {self.reference_dtype})")


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
        raise ValueError(
            f"compare: output shapes differ: reference {tuple(ref_out.shape)}, fused {tuple(fused_out.shape)}"
        )
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
    return Comparison(max_abs, max_rel, top1, worst, mismatch, str(ref_out.dtype), str(fused_out.dtype))


@torch.no_grad()
def synthetic_batchnorm(model: nn.Module, *, seed: int = 0, batches: int = 2, batch_size: int = 8,
                        size: int = 64) -> nn.Module:
    """Give every BatchNorm2d of a randomly initialised model non-trivial, realistic parameters.

    The affine weight and bias are drawn at random, then the running statistics are estimated on
    a few batches of synthetic images, as training would leave them. With torchvision's initial
    statistics (mean 0, var 1, weight 1, bias 0) folding is nearly the identity and a comparison
    proves nothing; with statistics drawn at random, activations grow through deep networks until
    they overflow. The last BatchNorm of each residual block gets small weights, as in trained
    ResNets: otherwise a random deep ResNet amplifies rounding errors a thousandfold, and no
    implementation, torchvision's included, matches its own float64 result in float32.
    Works in place on `model` and returns it, in eval mode.
    """
    g = torch.Generator().manual_seed(seed)
    dtype, device = _dtype_device(model)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    last_in_block = {id(_last_bn(block)) for block in model.modules() if isinstance(block, (BasicBlock, Bottleneck))}
    saved_momentum = [bn.momentum for bn in bns]
    for bn in bns:
        if bn.weight is not None:
            low, high = (0.1, 0.4) if id(bn) in last_in_block else (0.5, 1.5)
            bn.weight.copy_(torch.rand(bn.num_features, generator=g) * (high - low) + low)
            bn.bias.copy_((torch.rand(bn.num_features, generator=g) - 0.5) * 0.5)
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the calibration batches
    model.train()
    for _ in range(batches):
        x = torch.randn(batch_size, 3, size, size, generator=g)
        model(x.to(device=device, dtype=dtype))
    for bn, momentum in zip(bns, saved_momentum):
        bn.momentum = momentum
    return model.eval()


def _last_bn(block):
    return block.bn3 if isinstance(block, Bottleneck) else block.bn2
