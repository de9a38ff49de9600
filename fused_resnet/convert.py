"""fuse(model): a torchvision ResNet with every conv+BN(+ReLU) swapped for a fused module.

The conversion walks named_children and swaps modules; no class is patched, and the returned
model is still the same torchvision class, so its forward and attribute names are unchanged:
conv1 becomes a FusedConv2d with ReLU (bn1 and relu become Identity), each block becomes a
FusedBasicBlock or FusedBottleneck, and maxpool, avgpool and fc stay torch modules.
"""

import copy
import warnings

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from .modules import FusedBasicBlock, FusedBottleneck, FusedConv2d

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

_BLOCKS = {BasicBlock: FusedBasicBlock, Bottleneck: FusedBottleneck}


def fuse(model: nn.Module, *, dtype: torch.dtype | None = None, strict: bool = False) -> nn.Module:
    """A fused copy of `model` in eval mode; `model` itself is left untouched.

    Every torchvision BasicBlock and Bottleneck, and a ResNet's stem (conv1, bn1, relu), become
    fused modules with BatchNorm folded in float64. With `dtype`, the weights are cast once to it
    after folding, and the remaining modules (pooling, fc) are cast too. With `strict=True`, a
    BatchNorm2d left unfused (a block this function does not know) is an error; otherwise it stays
    as a torch module and a warning names it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse: expected an nn.Module, got {type(model).__name__}")
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"fuse: dtype must be one of {[str(d) for d in FLOAT_DTYPES]}, got {dtype}")
    for name, bn in model.named_modules():
        if isinstance(bn, nn.BatchNorm2d) and bn.running_mean is None:
            raise ValueError(
                f"fuse: BatchNorm2d '{name}' has no running statistics (track_running_stats=False); "
                "folding needs running_mean and running_var"
            )
    fused = copy.deepcopy(model).eval()
    _swap_children(fused, dtype, prefix="")
    if dtype is not None:
        fused.to(dtype)
    leftovers = [name for name, m in fused.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if leftovers:
        message = (f"fuse: {len(leftovers)} BatchNorm2d module(s) were not fused because their block is "
                   f"not a known torchvision block: {', '.join(leftovers[:5])}")
        if strict:
            raise TypeError(message + " (strict=True)")
        warnings.warn(message + "; they run as torch modules", stacklevel=2)
    return fused


def _swap_children(module, dtype, prefix):
    if _is_resnet_stem(module):
        module.conv1 = FusedConv2d.from_conv_bn(module.conv1, module.bn1, relu=True, dtype=dtype)
        module.bn1 = nn.Identity()
        module.relu = nn.Identity()
    for name, child in module.named_children():
        fused_type = _BLOCKS.get(type(child))
        if fused_type is not None:
            try:
                setattr(module, name, fused_type.from_torchvision(child, dtype=dtype))
            except TypeError as err:
                raise TypeError(f"fuse: cannot fuse '{prefix}{name}': {err}") from err
        else:
            _swap_children(child, dtype, prefix=f"{prefix}{name}.")


def _is_resnet_stem(module):
    """A module with torchvision ResNet's stem: conv1 -> bn1 -> relu run in that order."""
    return (
        isinstance(getattr(module, "conv1", None), nn.Conv2d)
        and isinstance(getattr(module, "bn1", None), nn.BatchNorm2d)
        and isinstance(getattr(module, "relu", None), nn.ReLU)
        and hasattr(module, "layer1")
    )
