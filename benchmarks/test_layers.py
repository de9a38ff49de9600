"""Every distinct resnet50 conv shape: the fused op against cuDNN conv + separate ops and cuDNN's fused op.

The shortcut add is part of the case for the convs that end a block (conv3 of a Bottleneck).
"""

import pytest
import torch
import torchvision
from conftest import DEVICE, HAS_CUDA, measure

import kernels

BATCH = 32 if HAS_CUDA else 2
DTYPE = torch.float16 if HAS_CUDA else torch.float32
IMPLS = {"fused": "triton", "cudnn_separate": "reference", "cudnn_fused": "cudnn"}


def resnet50_convs(size=224):
    """(C, K, kernel, stride, padding, H, ends_block) of each distinct resnet50 conv, at its real map size."""
    model = torchvision.models.resnet50().eval()
    seen = {}

    def hook(module, inputs, _output):
        x = inputs[0]
        ends = getattr(module, "_ends_block", False)
        key = (module.in_channels, module.out_channels, module.kernel_size[0], module.stride[0],
               module.padding[0], x.shape[2], ends)
        seen.setdefault(key, None)

    for block in model.modules():
        if isinstance(block, torchvision.models.resnet.Bottleneck):
            block.conv3._ends_block = True
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    for h in handles:
        h.remove()
    return list(seen)


SHAPES = resnet50_convs() if HAS_CUDA else resnet50_convs(32)[:4]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "C{}-K{}-k{}-s{}-H{}{}".format(*s[:4], s[5], "-add" * s[6]))
def test_conv_layer(benchmark, shape, impl):
    c, k, ksize, stride, padding, h, ends_block = shape
    if impl == "cudnn_fused" and not HAS_CUDA:
        pytest.skip("cuDNN's fused op needs CUDA")
    if impl == "fused" and not HAS_CUDA:
        pytest.skip("the Triton kernel is timed compiled on a GPU; the interpreter is for correctness only")
    x = torch.randn(BATCH, c, h, h, device=DEVICE, dtype=DTYPE).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(k, c, ksize, ksize, device=DEVICE) * (c * ksize * ksize) ** -0.5).to(DTYPE)
    weight = weight.contiguous(memory_format=torch.channels_last)
    bias = torch.randn(k, device=DEVICE, dtype=DTYPE)
    p = (h + 2 * padding - ksize) // stride + 1
    res = torch.randn(BATCH, k, p, p, device=DEVICE, dtype=DTYPE).contiguous(memory_format=torch.channels_last) \
        if ends_block else None

    def run():
        with kernels.use_backend(IMPLS[impl]):
            return kernels.conv2d_bias_act(x, weight, bias, stride, padding, residual=res, relu=True)

    benchmark.group = f"conv C{c} K{k} {ksize}x{ksize}/{stride} {h}x{h}" + (" +add" if ends_block else "")
    measure(benchmark, run, model="resnet50-conv", impl=impl, dtype=str(DTYPE).removeprefix("torch."),
            batch=BATCH, size=h, layer=benchmark.group)
