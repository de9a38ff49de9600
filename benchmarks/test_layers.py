"""Every distinct resnet50 conv shape: the fused op against cuDNN conv + separate ops and cuDNN's fused op.

The shortcut add is part of the case for the convs that end a block (conv3 of a Bottleneck). The
deeper fusions follow: conv3 with its projection shortcut merged, the stem with its max pooling,
the head's pooling with the fc, a block's last conv chained with the next block's first, and a
block's 3x3 conv inside its last conv's kernel, each against the same op run as separate kernels.
"""

import pytest
import torch
import torchvision
from conftest import DEVICE, HAS_CUDA, measure
from fused_resnet.kernels import backend

from fused_resnet import kernels

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


# The deeper fusions, layer by layer, at resnet50's shapes: under the "reference" and "cudnn" backends
# the same op runs as separate kernels (cuDNN conv, then pooling / the shortcut conv / the add).
DEEPER = {
    # name: (C, K, kernel, stride, padding, H, shortcut (Cs, stride) or None)
    "conv3+downsample layer1": (64, 256, 1, 1, 0, 56, (64, 1)),
    "conv3+downsample layer2": (128, 512, 1, 1, 0, 28, (256, 2)),
    "conv3+downsample layer3": (256, 1024, 1, 1, 0, 14, (512, 2)),
    "conv3+downsample layer4": (512, 2048, 1, 1, 0, 7, (1024, 2)),
}
DEEPER_CASES = list(DEEPER) if HAS_CUDA else list(DEEPER)[:1]


def _nhwc(*shape):
    return torch.randn(*shape, device=DEVICE, dtype=DTYPE).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("name", DEEPER_CASES)
def test_merged_shortcut_layer(benchmark, name, impl):
    c, k, ksize, stride, padding, h, (cs, sc_stride) = DEEPER[name]
    if impl != "cudnn_separate" and not HAS_CUDA:
        pytest.skip("timed on a GPU only; on a CPU the reference path alone runs")
    x, res = _nhwc(BATCH, c, h, h), _nhwc(BATCH, cs, h * sc_stride, h * sc_stride)
    weight = (_nhwc(k, c, ksize, ksize) * (c * ksize * ksize) ** -0.5)
    shortcut_weight = _nhwc(k, cs, 1, 1) * cs**-0.5
    bias = torch.randn(k, device=DEVICE, dtype=DTYPE)

    def run():
        with kernels.use_backend(IMPLS[impl]):
            return kernels.conv2d_bias_act(x, weight, bias, stride, padding, residual=res, relu=True,
                                           shortcut_weight=shortcut_weight, shortcut_stride=sc_stride)

    benchmark.group = f"merged shortcut: {name} C{c} K{k} {h}x{h}, shortcut C{cs}/{sc_stride}"
    measure(benchmark, run, model="resnet50-layer", impl=impl, dtype=str(DTYPE).removeprefix("torch."),
            batch=BATCH, size=h, layer=benchmark.group)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_stem_layer(benchmark, impl):
    if impl != "cudnn_separate" and not HAS_CUDA:
        pytest.skip("timed on a GPU only; on a CPU the reference path alone runs")
    size = 224 if HAS_CUDA else 32
    x = _nhwc(BATCH, 3, size, size)
    weight = _nhwc(64, 3, 7, 7) * 147**-0.5
    bias = torch.randn(64, device=DEVICE, dtype=DTYPE)

    def run():
        with kernels.use_backend(IMPLS[impl]):
            return kernels.conv2d_bias_act_maxpool(x, weight, bias, 2, 3, relu=True, pool_size=3, pool_stride=2,
                                                   pool_padding=1)

    benchmark.group = f"stem conv 7x7/2 + ReLU + maxpool 3x3/2 {size}x{size}"
    measure(benchmark, run, model="resnet50-layer", impl=impl, dtype=str(DTYPE).removeprefix("torch."),
            batch=BATCH, size=size, layer=benchmark.group)


@pytest.mark.parametrize("impl", ["fused", "cudnn_separate"])
def test_head_layer(benchmark, impl):
    if impl != "cudnn_separate" and not HAS_CUDA:
        pytest.skip("timed on a GPU only; on a CPU the reference path alone runs")
    x = _nhwc(BATCH, 2048, 7, 7)
    weight = torch.randn(1000, 2048, device=DEVICE, dtype=DTYPE) * 2048**-0.5
    bias = torch.randn(1000, device=DEVICE, dtype=DTYPE)

    def run():
        with kernels.use_backend(IMPLS[impl]):
            return kernels.avgpool_linear(x, weight, bias)

    benchmark.group = "head avgpool 7x7 + fc 2048->1000"
    measure(benchmark, run, model="resnet50-layer", impl=impl, dtype=str(DTYPE).removeprefix("torch."),
            batch=BATCH, size=7, layer=benchmark.group)


# A block's last conv chained with the next block's first (chain_1x1), at resnet50's chained shapes:
# one kernel ("fused"), the two fused conv kernels apart ("fused_apart"), cuDNN's fused op twice
# ("cudnn_fused") and cuDNN's conv with separate ops ("cudnn_separate").
CHAINS = {
    # name: (C, K, J, H, shortcut (Cs, stride) or None)
    "layer1.0 -> layer1.1": (64, 256, 64, 56, (64, 1)),
    "layer1.1 -> layer1.2": (64, 256, 64, 56, None),
    "layer2.0 -> layer2.1": (128, 512, 128, 28, (256, 2)),
    "layer2.1 -> layer2.2": (128, 512, 128, 28, None),
    "layer3.1 -> layer3.2": (256, 1024, 256, 14, None),
}
CHAIN_CASES = list(CHAINS) if HAS_CUDA else list(CHAINS)[:1]
CHAIN_IMPLS = {"fused": "triton", "fused_apart": "triton", "cudnn_fused": "cudnn", "cudnn_separate": "reference"}


def one_kernel(plan):
    """A chain's one-kernel plan: on a GPU a chain plan runs the faster of it and the convs apart
    (kernels.backend.PlanChoice), and here the one kernel itself is timed."""
    return plan.plans[0] if isinstance(plan, backend.PlanChoice) else plan


@pytest.mark.parametrize("impl", list(CHAIN_IMPLS))
@pytest.mark.parametrize("name", CHAIN_CASES)
def test_chain_layer(benchmark, name, impl):
    c, k, j, h, shortcut = CHAINS[name]
    if impl != "cudnn_separate" and not HAS_CUDA:
        pytest.skip("timed on a GPU only; on a CPU the reference path alone runs")
    x = _nhwc(BATCH, c, h, h)
    weight, next_weight = _nhwc(k, c, 1, 1) * c**-0.5, _nhwc(j, k, 1, 1) * k**-0.5
    bias, next_bias = (torch.randn(n, device=DEVICE, dtype=DTYPE) for n in (k, j))
    keywords = {}
    if shortcut is None:
        res = _nhwc(BATCH, k, h, h)
    else:
        cs, sc_stride = shortcut
        res = _nhwc(BATCH, cs, h * sc_stride, h * sc_stride)
        keywords = dict(shortcut_weight=_nhwc(k, cs, 1, 1) * cs**-0.5, shortcut_stride=sc_stride)

    if impl == "fused":
        chain = one_kernel(kernels.plan_chain_1x1(x, weight, bias, res, next_weight, next_bias, **keywords))

    def run():
        with kernels.use_backend(CHAIN_IMPLS[impl]):
            if impl == "fused":
                return chain(x, res)
            if impl == "fused_apart":
                y = kernels.conv2d_bias_act(x, weight, bias, residual=res, relu=True, **keywords)
                return y, kernels.conv2d_bias_act(y, next_weight, next_bias, relu=True)
            return kernels.chain_1x1(x, weight, bias, res, next_weight, next_bias, **keywords)

    benchmark.group = f"chain: {name} C{c} K{k} J{j} {h}x{h}" + (f", shortcut C{shortcut[0]}/{shortcut[1]}"
                                                                  if shortcut else "")
    measure(benchmark, run, model="resnet50-layer", impl=impl, dtype=str(DTYPE).removeprefix("torch."),
            batch=BATCH, size=h, layer=benchmark.group)


# A Bottleneck's 3x3 conv inside its last conv's kernel (conv_chain_1x1), with the next block's first
# conv where it chains: one kernel ("fused"), the fused conv kernels apart ("fused_apart"), cuDNN's
# fused op for each conv ("cudnn_fused") and cuDNN's convs with separate ops ("cudnn_separate").
HEADS = {
    # name: (Ch, C, K, J (0: none), H (the 3x3's input map), stride, shortcut Cs or None)
    "layer1.1 -> layer1.2": (64, 64, 256, 64, 56, 1, None),
    "layer1.2": (64, 64, 256, 0, 56, 1, None),
    "layer2.0 -> layer2.1": (128, 128, 512, 128, 56, 2, 256),
    "layer2.1 -> layer2.2": (128, 128, 512, 128, 28, 1, None),
    "layer3.1 -> layer3.2": (256, 256, 1024, 256, 14, 1, None),
}
HEAD_CASES = list(HEADS) if HAS_CUDA else list(HEADS)[:1]


@pytest.mark.parametrize("impl", list(CHAIN_IMPLS))
@pytest.mark.parametrize("name", HEAD_CASES)
def test_chain3x3_layer(benchmark, name, impl):
    ch, c, k, j, h, stride, shortcut = HEADS[name]
    if impl != "cudnn_separate" and not HAS_CUDA:
        pytest.skip("timed on a GPU only; on a CPU the reference path alone runs")
    p = (h - 1) // stride + 1
    x = _nhwc(BATCH, ch, h, h)
    head_weight, weight = _nhwc(c, ch, 3, 3) * (9 * ch) ** -0.5, _nhwc(k, c, 1, 1) * c**-0.5
    next_weight = _nhwc(j, k, 1, 1) * k**-0.5 if j else None
    head_bias, bias = (torch.randn(n, device=DEVICE, dtype=DTYPE) for n in (c, k))
    next_bias = torch.randn(j, device=DEVICE, dtype=DTYPE) if j else None
    keywords = {}
    if shortcut is None:
        res = _nhwc(BATCH, k, p, p)
    else:  # the projection shortcut reads the block's input, on the 3x3's input map
        res = _nhwc(BATCH, shortcut, h, h)
        keywords = dict(shortcut_weight=_nhwc(k, shortcut, 1, 1) * shortcut**-0.5, shortcut_stride=stride)

    if impl == "fused":
        chain = one_kernel(kernels.plan_conv_chain_1x1(x, head_weight, head_bias, weight, bias, res, next_weight,
                                                       next_bias, stride=stride, padding=1, **keywords))

    def run():
        with kernels.use_backend(CHAIN_IMPLS[impl]):
            if impl == "fused":
                return chain(x, res)
            if impl == "fused_apart":
                mid = kernels.conv2d_bias_act(x, head_weight, head_bias, stride, 1, relu=True)
                y = kernels.conv2d_bias_act(mid, weight, bias, residual=res, relu=True, **keywords)
                return y, kernels.conv2d_bias_act(y, next_weight, next_bias, relu=True) if j else None
            return kernels.conv_chain_1x1(x, head_weight, head_bias, weight, bias, res, next_weight, next_bias,
                                          stride=stride, padding=1, **keywords)

    benchmark.group = (f"chain3x3: {name} Ch{ch} 3x3/{stride} {h}x{h} C{c} K{k}" + (f" J{j}" if j else "")
                       + (f", shortcut C{shortcut}" if shortcut else ""))
    measure(benchmark, run, model="resnet50-layer", impl=impl, dtype=str(DTYPE).removeprefix("torch."),
            batch=BATCH, size=h, layer=benchmark.group)
