"""fuse(model): a torchvision ResNet with every conv+BN(+ReLU) swapped for a fused module.

The conversion walks named_children and swaps modules; no class is patched, and the returned
model is still the same torchvision class, so its forward and attribute names are unchanged. In
forward order, a fused module takes the place of the first module it covers and the ones it
absorbs become Identity:

    conv1 -> bn1 -> relu -> maxpool   conv1 = FusedConv2dMaxPool (or FusedConv2d(relu) + maxpool)
    layer1..layer4                    each block a FusedBasicBlock or FusedBottleneck (with
                                      chain_blocks or chain_3x3, each stage a FusedStage)
    avgpool -> flatten -> fc          avgpool = FusedAvgPoolLinear (or both stay torch modules)
"""

import copy
import warnings

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from .graphs import CUDAGraphModule
from .modules import (
    CompileAhead,
    FusedAvgPoolLinear,
    FusedBasicBlock,
    FusedBottleneck,
    FusedConv2d,
    FusedConv2dMaxPool,
    FusedStage,
    warmup,
)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

_BLOCKS = {BasicBlock: FusedBasicBlock, Bottleneck: FusedBottleneck}


def fuse(
    model: nn.Module,
    *,
    dtype: torch.dtype | None = None,
    strict: bool = False,
    residual_epilogue: bool = True,
    merge_downsample: bool = True,
    stem_maxpool: bool = True,
    avgpool_fc: bool = True,
    chain_blocks: bool = False,
    chain_3x3: bool = False,
    cuda_graph: bool = False,
    example: torch.Tensor | None = None,
) -> nn.Module:
    """A fused copy of `model` in eval mode; `model` itself is left untouched.

    Every torchvision BasicBlock and Bottleneck, and a ResNet's stem (conv1, bn1, relu), become
    fused modules with BatchNorm folded in float64. With `dtype`, the weights are cast once to it
    after folding, and the remaining modules are cast too. With `strict=True`, a BatchNorm2d left
    unfused (a block this function does not know) is an error; otherwise it stays as a torch
    module and a warning names it.

    Each fusion beyond conv + bias + ReLU can be switched off, to measure what it buys:
    residual_epilogue: a block's shortcut add and last ReLU run in its last conv's epilogue
        (off: a separate add_relu kernel).
    merge_downsample: a projection shortcut (1x1 conv + BN) runs inside the last conv's GEMM, and
        its output never reaches memory (off: its own kernel). Needs residual_epilogue.
    stem_maxpool: the stem's conv + ReLU + max pooling run as one kernel (off: conv + ReLU, then
        torch's max pooling).
    avgpool_fc: the head's average pooling and fc run as one kernel (off: torch's modules).
    chain_blocks: a Bottleneck whose shortcut is the identity or a merged projection runs its last
        conv and the next block's first conv as one kernel (FusedChain1x1), so the next block does
        not read the block's output back for it; each stage becomes a FusedStage, and a stage's last
        block chains with the next stage's first through a StageHandoff. Off by default
        until GPU timings show it pays (benchmarks/test_fusions.py, `bench --impl fused_chain`).
    chain_3x3: a Bottleneck whose shortcut is the identity or a merged projection runs its 3x3 conv
        inside its last conv's kernel (FusedConvChain1x1): the 3x3's output never goes to memory.
        With chain_blocks, the same kernel also computes the next block's first conv. It applies to
        a single Bottleneck passed alone too. Off by default, as chain_blocks (`bench --impl
        fused_chain3x3`).

    On a GPU, the first call with each new input shape compiles every kernel that forward will
    launch at once, in parallel (a CompileAhead forward pre-hook on the returned network). With an
    `example` input, the fused model is moved to the example's device and run on it once,
    so that every kernel it launches for inputs like it is compiled and configured before fuse
    returns (see fused_resnet.warmup).

    With `cuda_graph=True` the fused model comes wrapped in a CUDAGraphModule (its `.module`):
    each input signature is captured once on CUDA and replayed; see that class for what a call
    returns.
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
    if merge_downsample and not residual_epilogue:
        raise ValueError("fuse: merge_downsample=True needs residual_epilogue=True (the merged shortcut is added "
                         "in the epilogue); pass merge_downsample=False too")
    if not any(type(m) in _BLOCKS for m in model.modules()):
        raise TypeError(
            f"fuse: expected a torchvision ResNet (or a module holding torchvision BasicBlock or Bottleneck "
            f"blocks), got a {type(model).__name__} with none"
        )
    training = [name or type(model).__name__ for name, m in model.named_modules()
                if isinstance(m, nn.BatchNorm2d) and m.training]
    if training:
        warnings.warn(
            f"fuse: the model is in train mode ({len(training)} BatchNorm2d, first '{training[0]}'); fused modules "
            "always compute eval mode, with the running statistics folded in. Call model.eval() first to say so.",
            stacklevel=2,
        )
    options = dict(dtype=dtype, residual_epilogue=residual_epilogue, merge_downsample=merge_downsample)
    if type(model) in _BLOCKS:  # a single block: its fused equivalent (chain_3x3 applies within it)
        original = copy.deepcopy(model).eval()
        fused = _BLOCKS[type(model)].from_torchvision(original, **options)
        if chain_3x3:
            FusedStage.chained([fused], [original], chain_blocks=False, chain_3x3=True)
        return fused if dtype is None else fused.to(dtype)
    fused = copy.deepcopy(model).eval()
    chains = dict(chain_blocks=chain_blocks, chain_3x3=chain_3x3)
    _swap_children(fused, options, stem_maxpool, avgpool_fc, chains, prefix="")
    fused = _finish(fused, dtype, strict)
    fused.register_forward_pre_hook(CompileAhead())  # a plain first call on a GPU compiles in parallel
    if example is not None:
        fused.to(example.device)
        warmup(fused, example)
    return CUDAGraphModule(fused) if cuda_graph else fused


def _finish(fused, dtype, strict):
    """Cast what is left to `dtype` and account for BatchNorms no fused module took."""
    if dtype is not None:
        fused.to(dtype)
    leftovers = [name for name, m in fused.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if leftovers:
        message = (f"fuse: {len(leftovers)} BatchNorm2d module(s) were not fused because their block is "
                   f"not a known torchvision block: {', '.join(leftovers[:5])}")
        if strict:
            raise TypeError(message + " (strict=True)")
        warnings.warn(message + "; they run as torch modules", stacklevel=3)
    return fused


def _swap_children(module, options, stem_maxpool, avgpool_fc, chains, prefix):
    dtype = options["dtype"]
    if _is_resnet_stem(module):
        if stem_maxpool and _is_plain_maxpool(getattr(module, "maxpool", None)):
            module.conv1 = FusedConv2dMaxPool.from_modules(module.conv1, module.bn1, module.maxpool, dtype=dtype)
            module.maxpool = nn.Identity()
        else:
            module.conv1 = FusedConv2d.from_conv_bn(module.conv1, module.bn1, relu=True, dtype=dtype)
        # A ResNet's forward ends in flatten(x, 1), which needs a batch: refuse an unbatched image
        # at the first layer, with the caller's shape, rather than deep inside the network.
        module.conv1.batched_only = True
        module.bn1 = nn.Identity()
        module.relu = nn.Identity()
    if avgpool_fc and _is_resnet_head(module):
        module.avgpool = FusedAvgPoolLinear.from_linear(module.fc, dtype=dtype)
        module.fc = nn.Identity()
    stages = []  # (position among the children, name, fused blocks, torchvision blocks) of each stage
    for position, (name, child) in enumerate(module.named_children()):
        fused_type = _BLOCKS.get(type(child))
        if fused_type is not None:
            try:
                setattr(module, name, fused_type.from_torchvision(child, **options))
            except TypeError as err:
                raise TypeError(f"fuse: cannot fuse '{prefix}{name}': {err}") from err
        elif any(chains.values()) and isinstance(child, nn.Sequential) and any(type(b) in _BLOCKS for b in child):
            originals = list(child)
            _swap_children(child, options, stem_maxpool, avgpool_fc, chains, prefix=f"{prefix}{name}.")
            stages.append((position, name, list(child), originals))
        else:
            _swap_children(child, options, stem_maxpool, avgpool_fc, chains, prefix=f"{prefix}{name}.")
    # Last stage first, so that each stage is built knowing the one after it (layer1 then layer2 are
    # neighbouring children; a stage's last block may chain with the next stage's first).
    following = None  # (position, the next stage, the torchvision block its first block came from)
    for position, name, blocks, originals in reversed(stages):
        after = following[1:] if following is not None and following[0] == position + 1 else None
        stage = FusedStage.chained(blocks, originals, following=after, **chains)
        setattr(module, name, stage)
        following = (position, stage, originals[0])


def _is_resnet_stem(module):
    """A module with torchvision ResNet's stem: conv1 -> bn1 -> relu run in that order."""
    return (
        isinstance(getattr(module, "conv1", None), nn.Conv2d)
        and isinstance(getattr(module, "bn1", None), nn.BatchNorm2d)
        and isinstance(getattr(module, "relu", None), nn.ReLU)
        and hasattr(module, "layer1")
    )


def _is_plain_maxpool(pool):
    return (isinstance(pool, nn.MaxPool2d) and pool.dilation in (1, (1, 1)) and not pool.ceil_mode
            and not pool.return_indices)


def _is_resnet_head(module):
    """A module with torchvision ResNet's head: avgpool to 1x1 -> flatten -> fc (a Linear)."""
    pool = getattr(module, "avgpool", None)
    return (
        isinstance(pool, nn.AdaptiveAvgPool2d)
        and pool.output_size in (1, (1, 1))
        and isinstance(getattr(module, "fc", None), nn.Linear)
        and hasattr(module, "layer4")
    )
