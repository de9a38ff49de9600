"""Folding an inference-mode BatchNorm into the convolution before it.

BN(conv(x)) = gamma * (W*x + b - mean) / sqrt(var + eps) + beta
            = (scale * W) * x + (scale * (b - mean) + beta),   scale = gamma / sqrt(var + eps)

so the pair becomes one convolution with weight scale[k] * W[k] and a bias, per output channel k.
"""

import torch
from torch import nn


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, *, dtype: torch.dtype | None = None):
    """Fold `bn` into `conv`: returns (weight, bias) of the one conv equal to bn(conv(x)) in eval mode.

    The arithmetic runs in float64; the result is cast once, to `dtype` if given, else to the
    conv's dtype. BatchNorm's running statistics are used, as in eval mode.
    """
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"fold_bn: conv must be an nn.Conv2d, got {type(conv).__name__}")
    if not isinstance(bn, nn.BatchNorm2d):
        raise TypeError(f"fold_bn: bn must be an nn.BatchNorm2d, got {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            "fold_bn: the BatchNorm2d has no running statistics (track_running_stats=False); "
            "folding needs running_mean and running_var"
        )
    if bn.num_features != conv.out_channels:
        raise ValueError(
            f"fold_bn: BatchNorm2d has {bn.num_features} features, the conv has {conv.out_channels} output channels"
        )
    dtype = dtype or conv.weight.dtype
    with torch.no_grad():
        weight = conv.weight.detach().to(torch.float64)
        k = weight.shape[0]
        bias = conv.bias.detach().to(torch.float64) if conv.bias is not None else weight.new_zeros(k)
        mean = bn.running_mean.detach().to(torch.float64)
        var = bn.running_var.detach().to(torch.float64)
        gamma = bn.weight.detach().to(torch.float64) if bn.weight is not None else torch.ones_like(mean)
        beta = bn.bias.detach().to(torch.float64) if bn.bias is not None else torch.zeros_like(mean)
        scale = gamma / torch.sqrt(var + bn.eps)
        folded_weight = weight * scale.reshape(-1, 1, 1, 1)
        folded_bias = (bias - mean) * scale + beta
    return folded_weight.to(dtype), folded_bias.to(dtype)
