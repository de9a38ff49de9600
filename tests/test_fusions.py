"""The deeper fusions: projection shortcut inside the conv's GEMM, conv + max pooling, avgpool + fc,
two 1x1 convs back to back.

Kernels and modules against PyTorch in float64, through the real Triton kernels (interpreted on
a CPU, compiled on a GPU), on small maps with real channel counts. Each case checks with the
profiler that the fused op ran and that no aten conv, pooling or linear op did.
"""

import functools
import importlib

import pytest
import torch
import torch.nn.functional as F
import triton
from conftest import (
    DEVICE,
    HAS_CUDA,
    KERNEL_TOL,
    assert_close,
    compile_ahead,
    conv_expected,
    everywhere,
    make_case,
    randomize_bn,
    results_of,
    run_forced,
)
from torch import nn
from torch.profiler import ProfilerActivity, profile

from fused_resnet import FusedAvgPoolLinear, FusedConv2dMaxPool, kernels

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
UNFUSED_OPS = ("conv", "pool", "linear", "addmm", "mean")


@pytest.fixture(autouse=True)
def _ieee_fp32():
    prev = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = prev


def run_fused(op, fn):
    """fn() under the profiler: the fused op `op` ran, and no aten conv, pooling or linear op did."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    names = {e.key for e in prof.key_averages()}
    assert f"fused_resnet::{op}" in names, sorted(names)
    assert not any(n.startswith("aten::") and any(u in n for u in UNFUSED_OPS) for n in names), sorted(names)
    return out


def check_close(out, exp, dtype):
    tol = KERNEL_TOL[dtype]
    assert out.dtype == dtype
    assert_close(out, exp, rtol=tol, atol=tol * max(1.0, exp.abs().max().item()))


# ---- projection shortcut in the conv's GEMM ------------------------------------------------

SHORTCUTS = [
    # main conv (c, k, ksize, padding) on an hw map; shortcut input (cs, stride) on an hw*stride map
    ((64, 256, 1, 0), 5, (64, 1)),  # resnet50 layer1[0]: conv3 + downsample, stride 1
    ((128, 512, 1, 0), 4, (256, 2)),  # resnet50 layer2[0]: conv3 + downsample, stride 2
    ((128, 128, 3, 1), 4, (64, 2)),  # resnet18 layer2[0]: conv2 (3x3) + downsample
    ((8, 24, 3, 1), 3, (5, 3)),  # C below the flat-K threshold, odd stride
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SHORTCUTS, ids=lambda c: "C{}-K{}-k{}-Cs{}-s{}".format(*c[0][:3], *c[2]))
def test_conv_with_projection_shortcut(case, dtype):
    (c, k, ksize, padding), hw, (cs, stride) = case
    x, weight, bias = make_case(2, c, hw, hw, k, ksize, ksize, dtype=dtype)
    # Both edge cases of a strided 1x1 conv: the last row and column used, and not.
    shortcut_in, shortcut_weight, _ = make_case(2, cs, hw * stride, (hw - 1) * stride + 1, k, 1, 1, dtype=dtype)
    out = run_fused("conv2d_bias_act", lambda: kernels.conv2d_bias_act(
        x, weight, bias, 1, padding, residual=shortcut_in, relu=True,
        shortcut_weight=shortcut_weight, shortcut_stride=stride))
    projected = F.conv2d(shortcut_in.cpu().double(), shortcut_weight.cpu().double(), None, stride)
    exp = conv_expected(x, weight, bias, 1, padding, 1, 1, projected, True)
    check_close(out, exp, dtype)


def test_projection_shortcut_reference_and_float64():
    x, weight, bias = make_case(1, 8, 4, 4, 16, 3, 3, dtype=torch.float64)
    shortcut_in, shortcut_weight, _ = make_case(1, 4, 8, 8, 16, 1, 1, dtype=torch.float64)
    exp = conv_expected(x, weight, bias, 1, 1, 1, 1, F.conv2d(shortcut_in, shortcut_weight, None, 2), True)
    out = kernels.conv2d_bias_act(x, weight, bias, 1, 1, residual=shortcut_in, relu=True,
                                  shortcut_weight=shortcut_weight, shortcut_stride=2)
    assert_close(out, exp, rtol=1e-12, atol=1e-12)
    with kernels.use_backend("reference"):
        out = kernels.conv2d_bias_act(x.float(), weight.float(), bias.float(), 1, 1, residual=shortcut_in.float(),
                                      relu=True, shortcut_weight=shortcut_weight.float(), shortcut_stride=2)
    assert_close(out, exp, rtol=1e-5, atol=1e-5)


def test_projection_shortcut_bad_inputs():
    x, weight, bias = make_case(2, 8, 4, 4, 16, 3, 3)
    shortcut_in, shortcut_weight, _ = make_case(2, 4, 8, 8, 16, 1, 1)

    def bad(match, **kwargs):
        args = dict(residual=shortcut_in, shortcut_weight=shortcut_weight, shortcut_stride=2) | kwargs
        with pytest.raises(ValueError, match=match):
            kernels.conv2d_bias_act(x, weight, bias, 1, 1, **args)

    bad("shortcut_weight needs a residual", residual=None)
    bad(r"must be a 1x1 conv weight \(16, C, 1, 1\)", shortcut_weight=torch.randn(16, 4, 3, 3))
    bad(r"residual must be \(2, 4, H, W\)", residual=torch.randn(2, 5, 8, 8))
    bad("maps the .* residual to", shortcut_stride=1)
    x8, w8, _ = make_case(2, 8, 4, 4, 16, 3, 3, groups=2)
    with pytest.raises(ValueError, match="needs groups=1"):
        kernels.conv2d_bias_act(x8, w8, None, 1, 1, groups=2, residual=shortcut_in, shortcut_weight=shortcut_weight,
                                shortcut_stride=2)


# ---- conv + bias + ReLU + max pooling ------------------------------------------------------

STEMS = [
    # n, c, h, w, k, ksize, stride, padding, pool (size, stride, padding)
    (2, 3, 16, 16, 64, 7, 2, 3, (3, 2, 1)),  # the ResNet stem
    (1, 3, 13, 11, 64, 7, 2, 3, (3, 2, 1)),  # the stem on an odd map: windows hang over the edge
    (2, 16, 7, 7, 24, 3, 1, 1, (2, 2, 0)),  # a 2x2/2 pool with no padding
    (1, 20, 6, 5, 8, 3, 1, 0, (3, 1, 1)),  # overlapping stride-1 pool, unpadded conv
]


# Each stem as it is, and the stride-2 ones (and an even filter over 2 channels) also as
# space-to-depth: a stride-1 conv over 2x2 pixel blocks (igemm.SPACE_TO_DEPTH).
STEM_PLANS = [(case, False) for case in STEMS] + [
    (case, True) for case in [s for s in STEMS if s[6] == 2] + [(1, 2, 10, 9, 8, 4, 2, 1, (2, 2, 0))]]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case,blocks", STEM_PLANS,
                         ids=lambda c: "x".join(map(str, c[:6])) if isinstance(c, tuple) else ("s2d" if c else ""))
def test_conv_relu_maxpool(case, blocks, dtype, monkeypatch):
    from fused_resnet.kernels import igemm

    monkeypatch.setattr(igemm, "SPACE_TO_DEPTH", blocks)
    blocked = results_of(monkeypatch, igemm, "space_to_depth")
    n, c, h, w, k, ksize, stride, padding, (pool, pool_stride, pool_padding) = case
    x, weight, bias = make_case(n, c, h, w, k, ksize, ksize, dtype=dtype)
    out = run_fused("conv2d_bias_act_maxpool", lambda: kernels.conv2d_bias_act_maxpool(
        x, weight, bias, stride, padding, relu=True, pool_size=pool, pool_stride=pool_stride,
        pool_padding=pool_padding))
    exp = F.max_pool2d(conv_expected(x, weight, bias, stride, padding, 1, 1, None, True), pool, pool_stride,
                       pool_padding)
    check_close(out, exp, dtype)
    assert out.is_contiguous(memory_format=torch.channels_last)
    # space-to-depth ran where asked, as a filter of ceil(R/2) x ceil(S/2) taps over 16 channels
    assert [b[2].shape[1:] for b in blocked] == ([(16, (ksize + 1) // 2, (ksize + 1) // 2)] if blocks else [])


def test_conv_maxpool_without_bias_or_relu_keeps_negatives_and_nan():
    x, weight, _ = make_case(1, 4, 6, 6, 8, 3, 3, bias=False)
    x[0, 1, 2, 2] = float("nan")
    out = kernels.conv2d_bias_act_maxpool(x, weight, None, 1, 1, pool_size=2)
    exp = F.max_pool2d(conv_expected(x, weight, None, 1, 1, 1, 1, None, False), 2)
    assert (exp < 0).any() and torch.isnan(exp).any()
    assert torch.equal(torch.isnan(out.cpu()), torch.isnan(exp)), "NaN positions differ"
    finite = ~torch.isnan(exp)
    assert_close(out.cpu()[finite], exp[finite], rtol=1e-5, atol=1e-5)


def test_conv_maxpool_float64_unbatched_and_empty():
    x, weight, bias = make_case(1, 3, 9, 9, 8, 3, 3, dtype=torch.float64)
    out = kernels.conv2d_bias_act_maxpool(x[0], weight, bias, 2, 1, relu=True, pool_size=3, pool_stride=2,
                                          pool_padding=1)
    exp = F.max_pool2d(conv_expected(x, weight, bias, 2, 1, 1, 1, None, True), 3, 2, 1)[0]
    assert_close(out, exp, rtol=1e-12, atol=1e-12)
    empty = kernels.conv2d_bias_act_maxpool(x[:0].float(), weight.float(), None, 2, 1, pool_size=3, pool_stride=2)
    assert empty.shape == (0, 8, 2, 2)


def test_conv_maxpool_bad_inputs():
    x, weight, bias = make_case(1, 3, 8, 8, 8, 3, 3)
    with pytest.raises(ValueError, match="at most half of pool_size"):
        kernels.conv2d_bias_act_maxpool(x, weight, bias, pool_size=2, pool_padding=2)
    with pytest.raises(ValueError, match="does not fit"):
        kernels.conv2d_bias_act_maxpool(x, weight, bias, pool_size=7)
    with pytest.raises(ValueError, match="conv2d_bias_act_maxpool: input has 3 channels"):
        kernels.conv2d_bias_act_maxpool(x, weight[:, :2].contiguous(), bias)


@pytest.mark.parametrize("blocks", [True, False], ids=["space_to_depth", "direct"])
def test_the_stem_on_a_gpu_may_run_as_one_kernel_or_as_its_conv_and_pooling_over_either_layout(
        monkeypatch, blocks):
    # For an H100 (compiled here, nothing run): resnet50's stem at batch 8. Its first call times the
    # conv with its pooling in one kernel against the conv kernel and torch's max pooling, each over
    # the pixels as they are and over their 2x2 blocks, so the kernels of all four are listed to
    # compile; igemm.SPACE_TO_DEPTH names the layout of way 0.
    from fused_resnet.kernels import backend, igemm, precompile

    monkeypatch.setattr(igemm, "SPACE_TO_DEPTH", blocks)
    x = torch.empty(8, 3, 224, 224, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    w = torch.empty(64, 3, 7, 7, dtype=torch.float16)
    with precompile.compile_only("H100") as jobs:
        plan = kernels.plan_conv2d_bias_act_maxpool(x, w, None, 2, 3, relu=True, pool_size=3, pool_stride=2,
                                                    pool_padding=1)
        y = plan(x)
    assert y.shape == (8, 64, 56, 56) and y.is_contiguous(memory_format=torch.channels_last)
    # The conv as space_to_depth runs it is a 4x4 filter over 16 channels; as it is, 7x7 over 3.
    filters = {(job.op, "R=4" in job.key.split(",")) for job in jobs if job.op}  # (and the copy into blocks)
    assert filters == {(op, r4) for op in ("conv2d_bias_act_maxpool", "conv2d_bias_act") for r4 in (True, False)}
    assert isinstance(plan, backend.PlanChoice) and len(plan.plans) == 3
    assert ("R=4" in plan.key.split(",")) == blocks  # way 0: the layout SPACE_TO_DEPTH names


def test_a_conv_that_space_to_depth_fits_times_both_layouts_on_a_gpu_and_no_other_conv_does():
    from fused_resnet.kernels import backend, precompile

    x = torch.empty(2, 3, 32, 32, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    with precompile.compile_only("H100"):
        stem = kernels.plan_conv2d_bias_act(x, torch.empty(16, 3, 7, 7, dtype=torch.float16), None, 2, 3)
        strided_1 = kernels.plan_conv2d_bias_act(x, torch.empty(16, 3, 7, 7, dtype=torch.float16), None, 1, 3)
        wide = torch.empty(2, 8, 32, 32, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
        eight = kernels.plan_conv2d_bias_act(wide, torch.empty(16, 8, 3, 3, dtype=torch.float16), None, 2, 1)
    assert isinstance(stem, backend.PlanChoice) and stem.op == "conv2d_bias_act:plan" and len(stem.plans) == 2
    assert not isinstance(strided_1, backend.PlanChoice) and not isinstance(eight, backend.PlanChoice)
    stem_cpu = kernels.plan_conv2d_bias_act(x, torch.randn(16, 3, 7, 7, dtype=torch.float16), None, 2, 3)
    assert not isinstance(stem_cpu, backend.PlanChoice)  # nothing to time: the layout SPACE_TO_DEPTH names


@pytest.mark.gpu
# (fp32 with the slow gpu tests: the candidates of every way compile one after another)
@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.float32, marks=pytest.mark.slow)], ids=str)
def test_every_way_the_stem_may_run_gives_its_output(dtype):
    from fused_resnet.kernels import backend

    x = torch.randn(4, 3, 64, 64, device=DEVICE).to(dtype).contiguous(memory_format=torch.channels_last)
    w, b = (torch.randn(64, 3, 7, 7, device=DEVICE) / 12).to(dtype), torch.randn(64, device=DEVICE).to(dtype)
    plan = kernels.plan_conv2d_bias_act_maxpool(x, w, b, 2, 3, relu=True, pool_size=3, pool_stride=2, pool_padding=1)
    assert isinstance(plan, backend.PlanChoice) and len(plan.plans) == 3
    conv_expected = F.conv2d(x.double(), w.double(), b.double(), 2, 3).relu()
    for way in plan.plans:  # pooled, conv then pooling, pooled over the other layout
        check_close(way(x), F.max_pool2d(conv_expected, 3, 2, 1), dtype)
    conv = kernels.plan_conv2d_bias_act(x, w, b, 2, 3, relu=True)
    assert isinstance(conv, backend.PlanChoice) and len(conv.plans) == 2
    for way in conv.plans:  # over the 2x2 blocks of pixels, and over the pixels as they are
        check_close(way(x, None), conv_expected, dtype)


def test_conv_maxpool_opcheck():
    x, weight, bias = make_case(2, 3, 9, 8, 8, 3, 3)
    torch.library.opcheck(torch.ops.fused_resnet.conv2d_bias_act_maxpool.default,
                          (x, weight, bias, [2, 2], [1, 1, 1, 1], [1, 1], 1, True, [3, 3], [2, 2], [1, 1], "auto"))


# ---- global average pooling + linear --------------------------------------------------------

HEADS = [
    # n, c, h, w, classes
    (3, 512, 2, 2, 1000),  # resnet18's head on a small map
    (2, 2048, 1, 1, 100),  # resnet50's, one pixel
    (5, 40, 3, 2, 7),  # sizes of no block
    (2, 80, 7, 7, 10),  # resnet's 7x7 map: pixels read in rounds of 16, the last one partial
]


def avgpool_linear_expected(x, weight, bias):
    """float64, with the pooled mean rounded to the input's dtype, as torch's pool stores it."""
    pooled = x.double().mean((2, 3)).to(x.dtype).double()
    return F.linear(pooled.cpu(), weight.cpu().double(), None if bias is None else bias.cpu().double())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", HEADS, ids=lambda c: "x".join(map(str, c)))
def test_avgpool_linear(case, dtype):
    n, c, h, w, classes = case
    x = torch.randn(n, c, h, w, device=DEVICE).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(classes, c, device=DEVICE) / c**0.5).to(dtype)
    bias = torch.randn(classes, device=DEVICE).to(dtype)
    out = run_fused("avgpool_linear", lambda: kernels.avgpool_linear(x, weight, bias))
    assert out.shape == (n, classes)
    check_close(out, avgpool_linear_expected(x, weight, bias), dtype)


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter's split-K switch; on a GPU each config names it")
@pytest.mark.parametrize("ways", [2, 3, 7])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_head_split_k(ways, dtype, monkeypatch):
    # The channel blocks split among `ways` programs a tile (the interpreter's blocks are up to 128
    # channels: 2 and 3 blocks here, so some splits get none); the last sums the partial products.
    from fused_resnet.kernels import backend, igemm

    monkeypatch.setattr(igemm, "INTERPRETER_SPLIT_K", ways)
    counts = results_of(monkeypatch, backend, "zeroed_counts")
    for n, c, h, w, classes in [(3, 200, 5, 4, 40), (1, 384, 7, 7, 24)]:
        x = torch.randn(n, c, h, w, device=DEVICE).to(dtype).contiguous(memory_format=torch.channels_last)
        weight = (torch.randn(classes, c, device=DEVICE) / c**0.5).to(dtype)
        bias = torch.randn(classes, device=DEVICE).to(dtype)
        check_close(kernels.avgpool_linear(x, weight, bias), avgpool_linear_expected(x, weight, bias), dtype)
    assert len(counts) == 2 and all(int(t.abs().sum()) == 0 for t in counts)


@pytest.mark.parametrize("dtype,where", everywhere(DTYPES))
def test_the_head_in_every_candidate(dtype, where):
    # ResNet-50's head on 20 images (two tiles of 16, the second mostly masked) and on one, in each
    # first-call candidate: pixels read 8 or 16 at a time over a 7x7 map, 1000 classes in tiles of
    # up to 256; with so few tiles, the first two split-K over the channels too. (On a CPU over
    # resnet18's 512 channels: the same tiles, split fewer ways.)
    from fused_resnet.kernels import configs

    channels = 2048 if where == "gpu" else 512

    def head(config, x, weight, bias):
        return run_forced(config, lambda: kernels.avgpool_linear(x, weight, bias))

    cases = []
    for n in (20, 1):
        x = torch.randn(n, channels, 7, 7, device=DEVICE).to(dtype).contiguous(memory_format=torch.channels_last)
        weight = (torch.randn(1000, channels, device=DEVICE) / channels**0.5).to(dtype)
        bias = torch.randn(1000, device=DEVICE).to(dtype)
        found = configs.head_candidates(n, 1000, channels, 49, x.element_size())
        assert any(c.get("SPLIT_K", 1) > 1 for c in found)
        cases += [(config, x, weight, bias) for config in found]
    compile_ahead([functools.partial(head, *case) for case in cases])  # all at once, in parallel
    for config, x, weight, bias in cases:
        check_close(head(config, x, weight, bias), avgpool_linear_expected(x, weight, bias), dtype)


def test_avgpool_linear_layouts_float64_and_empty():
    base = torch.randn(2, 16, 5, 6, device=DEVICE)
    weight = torch.randn(10, 16, device=DEVICE)
    for x in (base, base.contiguous(memory_format=torch.channels_last), base.transpose(2, 3), base[:, :, 1:, ::2]):
        out = kernels.avgpool_linear(x, weight)
        assert_close(out, avgpool_linear_expected(x, weight, None), rtol=1e-5, atol=1e-5)
    out = kernels.avgpool_linear(base.double(), weight.double())
    assert_close(out, F.linear(base.double().mean((2, 3)), weight.double()), rtol=1e-12, atol=1e-12)
    assert kernels.avgpool_linear(base[:0], weight).shape == (0, 10)


def test_avgpool_linear_bad_inputs_and_opcheck():
    x = torch.randn(2, 16, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight must be \(out_features, 16\)"):
        kernels.avgpool_linear(x, torch.randn(10, 8, device=DEVICE))
    with pytest.raises(ValueError, match="input must be 4-D"):
        kernels.avgpool_linear(x[0], torch.randn(10, 16, device=DEVICE))
    with pytest.raises(ValueError, match=r"bias must have shape \(10,\)"):
        kernels.avgpool_linear(x, torch.randn(10, 16, device=DEVICE), torch.randn(3, device=DEVICE))
    torch.library.opcheck(torch.ops.fused_resnet.avgpool_linear.default,
                          (x, torch.randn(10, 16, device=DEVICE), torch.randn(10, device=DEVICE), "auto"))


# ---- two 1x1 convs back to back (chain_1x1) --------------------------------------------------

CHAINS = [
    # (n, c, k, j, h, w, shortcut): x of c channels -> y of k (with the residual, or with a projection
    # shortcut of cs channels at a stride) -> z of j
    (2, 64, 256, 64, 3, 5, None),  # resnet50 layer1: conv3 of one block, conv1 of the next
    (1, 128, 512, 128, 4, 3, None),  # layer2
    (1, 256, 128, 256, 2, 3, None),  # the widest x and z one program holds (layer3 has k=1024)
    (3, 24, 40, 20, 3, 3, None),  # sizes of no block: channels not a power of two, rows past a tile
    (2, 64, 256, 64, 3, 5, (64, 1)),  # layer1.0 with its projection shortcut, into layer1.1's conv1
    (1, 128, 512, 128, 3, 2, (256, 2)),  # layer2.0: the shortcut reads every other pixel of a 6x4 map
    (2, 24, 40, 20, 3, 3, (10, 3)),  # odd sizes and stride
    (1, 32, 48, 16, 3, 2, (300, 2)),  # a shortcut input past what one program holds (layer3.0's 512): streamed
]


def shortcut_block(cs, dtype):
    """chain_candidates' block_s for a shortcut input of cs channels (0: none): all of them, or past
    MAX_CHANNELS the step of the loop that streams them."""
    from fused_resnet.kernels import configs

    if not cs:
        return 0
    # (the module: fused_resnet.kernels.chain_1x1 names the op)
    if cs > importlib.import_module("fused_resnet.kernels.chain_1x1").MAX_CHANNELS:
        return configs.chain_block_k(cs, torch.empty((), dtype=dtype).element_size())
    return triton.next_power_of_2(cs)


def chain_operands(n, c, k, j, h, w, shortcut, dtype, bias=True):
    """(x, weight, bias, residual, next_weight, next_bias) and chain_1x1's shortcut keywords."""
    x, weight, b = make_case(n, c, h, w, k, 1, 1, dtype=dtype, bias=bias)
    _, next_weight, next_b = make_case(n, k, h, w, j, 1, 1, dtype=dtype, bias=bias)
    if shortcut is None:
        residual = torch.randn(n, k, h, w, device=DEVICE).to(dtype).contiguous(memory_format=torch.channels_last)
        return (x, weight, b, residual, next_weight, next_b), {}
    cs, stride = shortcut
    residual, shortcut_weight, _ = make_case(n, cs, (h - 1) * stride + 1, (w - 1) * stride + 1, k, 1, 1, dtype=dtype)
    return (x, weight, b, residual, next_weight, next_b), dict(shortcut_weight=shortcut_weight, shortcut_stride=stride)


def chain_expected(x, weight, b, residual, next_weight, next_b, y, shortcut_weight=None, shortcut_stride=1):
    """float64 answers: y from the operands, and z (None without a next conv) from the kernel's own
    (rounded) y, as the next conv would read it back."""
    if shortcut_weight is not None:
        residual = F.conv2d(residual.cpu().double(), shortcut_weight.cpu().double(), None, shortcut_stride)
    return (conv_expected(x, weight, b, 1, 0, 1, 1, residual, True),
            None if next_weight is None else conv_expected(y, next_weight, next_b, 1, 0, 1, 1, None, True))


def launched_kernels(monkeypatch):
    """The names of the Triton kernels launched while the test runs, in order."""
    from fused_resnet.kernels import backend

    launched = []
    real = backend.KernelLaunch._launch
    monkeypatch.setattr(backend.KernelLaunch, "_launch",
                        lambda self, tensors: launched.append(self.kernel.__name__) or real(self, tensors))
    return launched


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CHAINS, ids=lambda c: "C{1}-K{2}-J{3}".format(*c) + ("-Cs{}-s{}".format(*c[6]) if c[6]
                                                                                  else ""))
def test_chain_1x1(case, dtype, monkeypatch):
    operands, shortcut = chain_operands(*case, dtype)
    launched = launched_kernels(monkeypatch)
    y, z = run_fused("chain_1x1", lambda: kernels.chain_1x1(*operands, **shortcut))
    n, c, k, j, h, w, sc = case
    # One kernel, but where no config holds the chain within the register budget (fp32 in IEEE
    # precision, this file's setting, with 256 channels anywhere): then the two convs apart.
    from fused_resnet.kernels import configs

    fits = configs.chain_candidates(*(triton.next_power_of_2(v) for v in (c, k, j)), operands[0].element_size(),
                                    ieee=dtype == torch.float32, block_s=shortcut_block(sc and sc[0], dtype))
    assert launched == (["_chain_1x1_kernel"] if fits else ["_conv2d_bias_act_kernel"] * 2)
    assert fits or (dtype == torch.float32 and max(c, j, sc[0] if sc and sc[0] <= 256 else 0) == 256)
    assert y.shape == (n, k, h, w) and z.shape == (n, j, h, w)
    assert y.is_contiguous(memory_format=torch.channels_last) and z.is_contiguous(memory_format=torch.channels_last)
    y_exp, z_exp = chain_expected(*operands, y, **shortcut)
    check_close(y, y_exp, dtype)
    check_close(z, z_exp, dtype)


def test_chain_1x1_without_biases_keeps_nan_and_takes_any_layout():
    (x, weight, _, residual, next_weight, _), _ = chain_operands(2, 32, 48, 16, 3, 4, None, torch.float32)
    x[0, 3, 1, 2] = float("nan")
    for x_in, r_in in ((x, residual), (x.contiguous(), residual.contiguous()), (x, residual.transpose(2, 3).mT)):
        y, z = kernels.chain_1x1(x_in, weight, None, r_in, next_weight)
        y_exp, z_exp = chain_expected(x, weight, None, residual, next_weight, None, y)
        assert bool(y[0, :, 1, 2].isnan().all()) and bool(z[0, :, 1, 2].isnan().all())
        assert_close(y, y_exp, rtol=1e-5, atol=1e-5)
        assert_close(z, z_exp, rtol=1e-5, atol=1e-5)


def test_chain_1x1_too_wide_runs_two_convs(monkeypatch):
    # x of 320 channels is more than one program holds: the two convs run apart, same answer.
    assert not kernels.chain_fits(320, 64) and kernels.chain_fits(256, 256) and not kernels.chain_fits(64, 320)
    assert kernels.chain_fits(64, 64, 512)  # a wide shortcut input is streamed
    launched = launched_kernels(monkeypatch)
    operands, _ = chain_operands(1, 320, 64, 32, 2, 3, None, torch.float32)
    y, z = kernels.chain_1x1(*operands)
    assert launched == ["_conv2d_bias_act_kernel"] * 2
    y_exp, z_exp = chain_expected(*operands, y)
    check_close(y, y_exp, torch.float32)
    check_close(z, z_exp, torch.float32)


def test_chain_1x1_runs_apart_where_its_programs_would_leave_the_gpu_idle():
    # For an H100 (compiled here, nothing run): resnet50 layer3's chain at batch 1 (196 rows, a
    # handful of programs for 132 SMs) runs as the two convs; at batch 64 (12,544 rows) it may run
    # as one kernel, and both are compiled, as its first call times the one against the other.
    from fused_resnet.kernels import precompile

    kernels_of = {}
    for n in (1, 64):
        operands, _ = chain_operands(n, 256, 1024, 256, 14, 14, None, torch.float16)
        with precompile.compile_only("H100") as jobs:
            kernels.plan_chain_1x1(*operands)(operands[0], operands[3])
        kernels_of[n] = sorted({job.kernel[1] for job in jobs})
    assert kernels_of == {1: ["_conv2d_bias_act_kernel"], 64: ["_chain_1x1_kernel", "_conv2d_bias_act_kernel"]}


def test_chain_1x1_reference_float64_and_empty():
    operands, _ = chain_operands(2, 16, 32, 8, 3, 3, None, torch.float64)
    y, z = kernels.chain_1x1(*operands)
    y_exp, z_exp = chain_expected(*operands, y)
    assert_close(y, y_exp, rtol=1e-12, atol=1e-12)
    assert_close(z, z_exp, rtol=1e-12, atol=1e-12)
    with kernels.use_backend("reference"):
        ref = kernels.chain_1x1(*chain_operands(2, 16, 32, 8, 3, 3, None, torch.float32)[0])
    assert ref[0].shape == (2, 32, 3, 3) and ref[1].shape == (2, 8, 3, 3)
    empty = [t[:0] if i in (0, 3) else t
             for i, t in enumerate(chain_operands(2, 16, 32, 8, 3, 3, None, torch.float32)[0])]
    y, z = kernels.chain_1x1(*empty)
    assert y.shape == (0, 32, 3, 3) and z.shape == (0, 8, 3, 3)


def test_chain_1x1_bad_inputs_and_opcheck():
    (x, weight, b, residual, next_weight, next_b), _ = chain_operands(1, 16, 32, 8, 2, 2, None, torch.float32)
    with pytest.raises(ValueError, match=r"next_weight must be a 1x1 conv weight \(out_channels, 32, 1, 1\)"):
        kernels.chain_1x1(x, weight, b, residual, next_weight[:, :16], next_b)
    with pytest.raises(ValueError, match=r"weight must be a 1x1 conv weight"):
        kernels.chain_1x1(x, torch.randn(32, 16, 3, 3, device=DEVICE), b, residual, next_weight, next_b)
    with pytest.raises(ValueError, match=r"chain_1x1: residual must have the output's shape \(1, 32, 2, 2\)"):
        kernels.chain_1x1(x, weight, b, residual[:, :8], next_weight, next_b)
    with pytest.raises(ValueError, match=r"next_bias must have shape \(8,\)"):
        kernels.chain_1x1(x, weight, b, residual, next_weight, b)
    with pytest.raises(TypeError, match="all tensors must share one dtype"):
        kernels.chain_1x1(x, weight, b, residual.half(), next_weight, next_b)
    with pytest.raises(ValueError, match="chain_1x1: the shortcut conv maps the"):
        kernels.chain_1x1(x, weight, b, residual, next_weight, next_b, shortcut_weight=torch.randn(32, 32, 1, 1),
                          shortcut_stride=3)
    torch.library.opcheck(torch.ops.fused_resnet.chain_1x1.default,
                          (x, weight, b, residual, next_weight, next_b, None, [1, 1], "auto"))
    (x, weight, b, residual, next_weight, next_b), shortcut = chain_operands(1, 16, 32, 8, 2, 2, (8, 2), torch.float32)
    torch.library.opcheck(torch.ops.fused_resnet.chain_1x1.default,
                          (x, weight, b, residual, next_weight, next_b, shortcut["shortcut_weight"], [2, 2], "auto"))


@pytest.mark.parametrize("dtype,where", everywhere(DTYPES))
def test_chain_1x1_in_every_candidate(dtype, where):
    # ResNet-50's chained shapes in each first-call candidate (fp32 in IEEE precision here: wide
    # chains have no candidate within its register budget and run apart).
    from fused_resnet.kernels import configs

    # On a GPU 64 images of 14x14: enough rows for the chain's programs to fill an H100's SMs (else
    # it runs apart); on a CPU two of 5x6.
    n, h, w = (64, 14, 14) if where == "gpu" else (2, 5, 6)
    cases = []
    for c, k, j, shortcut in ((64, 256, 64, None), (128, 512, 128, None), (256, 1024, 256, None),
                              (64, 256, 64, (64, 1)), (128, 512, 128, (256, 2)), (256, 1024, 256, (512, 2))):
        operands, keywords = chain_operands(n, c, k, j, h, w, shortcut, dtype)
        for config in configs.chain_candidates(c, k, j, operands[0].element_size(), ieee=dtype == torch.float32,
                                               block_s=shortcut_block(shortcut and shortcut[0], dtype)):
            cases.append((config, operands, keywords))
    run_every_candidate(kernels.chain_1x1, cases, chain_expected, dtype)


@pytest.mark.gpu
def test_a_chains_first_call_times_it_against_the_convs_apart(tmp_path, monkeypatch):
    # With an empty table and cache: the first call on layer1's chain shape times the one kernel
    # against the two convs apart, runs and keeps the faster, and stores which; either way y and z
    # are the convs'.
    from fused_resnet.kernels import backend, configs

    (tmp_path / "table.json").write_text('{"version": 1, "entries": []}')
    monkeypatch.setattr(configs, "TABLE_PATH", tmp_path / "table.json")
    monkeypatch.setenv("FUSED_RESNET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(configs, "_table", None)
    monkeypatch.setattr(configs, "_cache", None)
    operands, _ = chain_operands(64, 64, 256, 64, 28, 28, None, torch.float16)
    plan = kernels.plan_chain_1x1(*operands)
    y, z = plan(operands[0], operands[3])
    assert isinstance(plan, backend.PlanChoice) and plan.chosen is not None
    assert configs.lookup(*plan.table_entry(operands[0]))["plan"] in (0, 1)
    y_exp, z_exp = chain_expected(*operands, y)
    check_close(y, y_exp, torch.float16)
    check_close(z, z_exp, torch.float16)


def run_every_candidate(op, cases, expected, dtype):
    """Compile (on a GPU, in parallel), then run, op(*operands, **keywords) with each (config,
    operands, keywords) of `cases`, and check its y, and its z where it returns one, against
    expected(*operands, y, **keywords)."""
    def run(config, operands, keywords):
        return run_forced(config, lambda: op(*operands, **keywords))

    assert cases
    compile_ahead([functools.partial(run, *case) for case in cases])
    for config, operands, keywords in cases:
        out = run(config, operands, keywords)
        y, z = out if isinstance(out, tuple) else (out, None)
        y_exp, z_exp = expected(*operands, y, **keywords)
        check_close(y, y_exp, dtype)
        if z_exp is not None:
            check_close(z, z_exp, dtype)


# ---- a 3x3 conv leading the chain (conv_chain_1x1) ---------------------------------------------

HEADED = [
    # (n, ch, c, k, j, h, w, stride, dilation, shortcut): the head conv (3x3, padding = dilation) maps
    # ch channels on an h x w map to c; then y of k (with the residual, or a projection shortcut of
    # the head's input, cs channels, at the head's stride) and, where j, z of j
    (2, 64, 64, 256, 64, 4, 5, 1, 1, None),  # resnet50 layer1.1: conv2, conv3 + residual, layer1.2's conv1
    (1, 128, 128, 512, 128, 6, 4, 2, 1, 256),  # layer2.0: conv2 of stride 2, conv3 + the projection shortcut
    (1, 64, 64, 256, 0, 3, 4, 1, 1, None),  # a stage's last block: no next conv
    (3, 20, 24, 40, 20, 5, 3, 1, 2, None),  # odd sizes: channels in part-blocks, dilation 2, rows past a tile
    (2, 24, 16, 40, 0, 5, 5, 2, 1, 10),  # odd shortcut at stride 2, no next conv
    (1, 16, 32, 48, 16, 4, 4, 2, 1, 300),  # a streamed shortcut input (layer3.0's has 512 channels)
]


def headed_operands(n, ch, c, k, j, h, w, stride, dilation, shortcut, dtype, bias=True):
    """(x, head_weight, head_bias, weight, bias, residual, next_weight, next_bias) and the keywords."""
    x, head_weight, head_b = make_case(n, ch, h, w, c, 3, 3, dtype=dtype, bias=bias)
    p, q = (h - 1) // stride + 1, (w - 1) // stride + 1
    _, weight, b = make_case(n, c, p, q, k, 1, 1, dtype=dtype, bias=bias)
    next_weight, next_b = make_case(n, k, p, q, j, 1, 1, dtype=dtype, bias=bias)[1:] if j else (None, None)
    keywords = dict(stride=stride, padding=dilation, dilation=dilation)
    if shortcut is None:
        residual = torch.randn(n, k, p, q, device=DEVICE).to(dtype).contiguous(memory_format=torch.channels_last)
    else:
        residual, shortcut_weight, _ = make_case(n, shortcut, h, w, k, 1, 1, dtype=dtype)
        keywords.update(shortcut_weight=shortcut_weight, shortcut_stride=stride)
    return (x, head_weight, head_b, weight, b, residual, next_weight, next_b), keywords


def headed_expected(x, head_weight, head_b, weight, b, residual, next_weight, next_b, y, stride, padding, dilation,
                    shortcut_weight=None, shortcut_stride=1):
    """float64 answers: the head's output rounded to the dtype, as the kernel rounds it, then y from
    it, and z from the kernel's own y (chain_expected)."""
    h = conv_expected(x, head_weight, head_b, stride, padding, dilation, 1, None, True).to(x.dtype)
    return chain_expected(h, weight, b, residual, next_weight, next_b, y, shortcut_weight, shortcut_stride)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", HEADED, ids=lambda c: "Ch{1}-C{2}-K{3}-J{4}-s{7}-d{8}".format(*c)
                         + (f"-Cs{c[9]}" if c[9] else ""))
def test_conv_chain_1x1(case, dtype, monkeypatch):
    operands, keywords = headed_operands(*case, dtype)
    launched = launched_kernels(monkeypatch)
    out = run_fused("conv_chain_1x1", lambda: kernels.conv_chain_1x1(*operands, **keywords))
    n, ch, c, k, j, h, w, stride, dilation, sc = case
    y, z = out if j else (out, None)
    from fused_resnet.kernels import configs

    # One kernel, but where no config holds it within the register budget (fp32 in IEEE precision,
    # this file's setting, with 256 channels of z or the shortcut's input): the head conv apart,
    # then chain_1x1 (itself apart there).
    fits = configs.chain_candidates(*(triton.next_power_of_2(v) if v else 0 for v in (c, k, j)),
                                    operands[0].element_size(), ieee=dtype == torch.float32,
                                    block_s=shortcut_block(sc, dtype), head_channels=ch)
    assert launched == (["_chain_1x1_kernel"] if fits else ["_conv2d_bias_act_kernel"] * (3 if j else 2))
    assert fits or (dtype == torch.float32 and max(j, sc if sc and sc <= 256 else 0) == 256)
    p, q = (h - 1) // stride + 1, (w - 1) // stride + 1
    assert y.shape == (n, k, p, q) and y.is_contiguous(memory_format=torch.channels_last)
    y_exp, z_exp = headed_expected(*operands, y, **keywords)
    check_close(y, y_exp, dtype)
    if j:
        assert z.shape == (n, j, p, q) and z.is_contiguous(memory_format=torch.channels_last)
        check_close(z, z_exp, dtype)


def test_conv_chain_1x1_keeps_nan_takes_any_layout_and_runs_apart_when_too_wide(monkeypatch):
    (x, head_weight, _, weight, _, residual, next_weight, _), keywords = headed_operands(
        2, 16, 32, 48, 16, 4, 4, 1, 1, None, torch.float32)
    x[0, 3, 1, 2] = float("nan")  # every output pixel whose window holds it
    for x_in, r_in in ((x, residual), (x.contiguous(), residual.contiguous())):
        y, z = kernels.conv_chain_1x1(x_in, head_weight, None, weight, None, r_in, next_weight, **keywords)
        y_exp, z_exp = headed_expected(x, head_weight, None, weight, None, residual, next_weight, None, y, **keywords)
        assert bool(y[0, :, :3, 1:4].isnan().all()) and not bool(y[0, :, 3].isnan().any())
        assert_close(y, y_exp, rtol=1e-5, atol=1e-5)
        assert_close(z, z_exp, rtol=1e-5, atol=1e-5)
    # A head of 320 output channels is more than one program holds: the head conv apart, then the chain.
    launched = launched_kernels(monkeypatch)
    operands, keywords = headed_operands(1, 16, 320, 64, 32, 3, 3, 1, 1, None, torch.float32)
    y, z = kernels.conv_chain_1x1(*operands, **keywords)
    assert launched == ["_conv2d_bias_act_kernel"] * 3
    y_exp, z_exp = headed_expected(*operands, y, **keywords)
    check_close(y, y_exp, torch.float32)
    check_close(z, z_exp, torch.float32)


def test_conv_chain_1x1_on_a_gpu_lists_every_way_it_may_run():
    # For an H100 (compiled here, nothing run): layer2.1's 3x3 with its last conv and the next
    # block's first, 32 images of 28x28. Its first call times one kernel; the 3x3 apart and the rest
    # as chain_1x1 (or its two convs); and the 3x3 with the last conv ending at y (or the two
    # convs), the next conv apart. Every kernel these may launch is listed to compile.
    from fused_resnet.kernels import precompile

    (x, hw, hb, weight, b, residual, next_weight, next_b), keywords = headed_operands(
        32, 128, 128, 512, 128, 28, 28, 1, 1, None, torch.float16)
    with precompile.compile_only("H100") as jobs:
        plan = kernels.plan_conv_chain_1x1(x, hw, hb, weight, b, residual, next_weight, next_b, **keywords)
        y, z = plan(x, residual)
    assert y.shape == residual.shape and z.shape == (32, 128, 28, 28)
    ways = {(job.op, job.kwargs.get("NEXT"), job.kwargs["R"]) for job in jobs}
    assert ways == {("conv_chain_1x1", True, 3), ("conv_chain_1x1", False, 3), ("chain_1x1", True, 1),
                    ("conv2d_bias_act", None, 3), ("conv2d_bias_act", None, 1)}, ways
    assert len(plan.plans) == 3


def test_conv_chain_1x1_reference_float64_bad_inputs_and_opcheck():
    operands, keywords = headed_operands(2, 8, 16, 32, 8, 3, 3, 1, 1, None, torch.float64)
    y, z = kernels.conv_chain_1x1(*operands, **keywords)
    ref_y, ref_z = kernels.conv_chain_1x1_reference(*operands, 1, 1, 1)
    assert_close(y, ref_y, rtol=1e-12, atol=1e-12)
    assert_close(z, ref_z, rtol=1e-12, atol=1e-12)
    (x, hw, hb, weight, b, residual, next_weight, next_b), keywords = headed_operands(
        1, 8, 16, 32, 8, 4, 4, 2, 1, None, torch.float32)
    with pytest.raises(ValueError, match=r"conv_chain_1x1: input has 8 channels, but weight \(16, 4, 3, 3\)"):
        kernels.conv_chain_1x1(x, hw[:, :4], hb, weight, b, residual, next_weight, next_b, **keywords)
    with pytest.raises(ValueError, match=r"residual must have the output's shape \(1, 32, 4, 4\), got \(1, 32, 2"):
        kernels.conv_chain_1x1(x, hw, hb, weight, b, residual, next_weight, next_b, stride=1, padding=1)
    with pytest.raises(ValueError, match="next_bias without next_weight"):
        kernels.conv_chain_1x1(x, hw, hb, weight, b, residual, None, next_b, **keywords)
    with pytest.raises(ValueError, match=r"conv_chain_1x1: input has 16 channels, but weight \(32, 8, 1, 1\)"):
        kernels.conv_chain_1x1(x, hw, hb, weight[:, :8], b, residual, next_weight, next_b, **keywords)
    for nw, nb in ((next_weight, next_b), (None, None)):
        torch.library.opcheck(torch.ops.fused_resnet.conv_chain_1x1.default,
                              (x, hw, hb, [2, 2], [1, 1, 1, 1], [1, 1], weight, b, residual, nw, nb, None, [1, 1],
                               "auto"))


@pytest.mark.parametrize("dtype,where", everywhere(DTYPES))
def test_conv_chain_1x1_in_every_candidate(dtype, where):
    # ResNet-50's blocks with their 3x3 conv inside (with and without the next block's first), in
    # each first-call candidate; on a GPU 32 images: enough rows to fill an H100's SMs (on a CPU, two
    # of 6x6 or 8x8).
    from fused_resnet.kernels import configs

    gpu = where == "gpu"
    cases = []
    for ch, c, k, j, h, stride, shortcut in ((64, 64, 256, 64, 28, 1, None), (64, 64, 256, 0, 28, 1, 64),
                                             (128, 128, 512, 128, 28, 2, 256), (256, 256, 1024, 256, 14, 1, None),
                                             (256, 256, 1024, 256, 28, 2, 512),
                                             (256, 256, 1024, 0, 14, 1, None)):
        n, h = (32, h) if gpu else (2, 6 if h < 28 else 8)
        operands, keywords = headed_operands(n, ch, c, k, j, h, h, stride, 1, shortcut, dtype)
        for config in configs.chain_candidates(c, k, j, operands[0].element_size(), ieee=dtype == torch.float32,
                                               block_s=shortcut_block(shortcut, dtype), head_channels=ch):
            cases.append((config, operands, keywords))
    run_every_candidate(kernels.conv_chain_1x1, cases, headed_expected, dtype)


# ---- the modules against torchvision's stem and head -----------------------------------------

MODULE_DTYPES = [torch.float64, torch.float32, torch.float16]


def stem(c=3, k=64):
    bn = randomize_bn(nn.BatchNorm2d(k))
    return nn.Sequential(nn.Conv2d(c, k, 7, 2, 3, bias=False), bn, nn.ReLU(), nn.MaxPool2d(3, 2, 1)).eval()


@pytest.mark.parametrize("dtype", MODULE_DTYPES, ids=str)
def test_stem_module_matches_torchvision(dtype):
    ref = stem()
    fused = FusedConv2dMaxPool.from_modules(ref[0], ref[1], ref[3], dtype=dtype).to(DEVICE)
    x = torch.randn(2, 3, 15, 17)
    with torch.no_grad():
        exp = ref.double()(x.double())
        xin = x.to(DEVICE, dtype)
        out = fused(xin) if dtype == torch.float64 else run_fused("conv2d_bias_act_maxpool", lambda: fused(xin))
    tol = 1e-10 if dtype == torch.float64 else KERNEL_TOL[dtype] * 2  # folded weights are rounded once more
    assert_close(out, exp, rtol=tol, atol=tol * exp.abs().max().item())
    assert "maxpool(kernel_size=3, stride=2, padding=1)" in repr(fused)


def test_stem_module_refuses_unsupported_pools():
    ref = stem()
    for pool in (nn.MaxPool2d(3, 2, 1, ceil_mode=True), nn.MaxPool2d(3, 2, 1, dilation=2), nn.AvgPool2d(3)):
        with pytest.raises((TypeError, ValueError), match="MaxPool2d|max pooling"):
            FusedConv2dMaxPool.from_modules(ref[0], ref[1], pool)


@pytest.mark.parametrize("dtype", MODULE_DTYPES, ids=str)
def test_head_module_matches_torchvision(dtype):
    fc = nn.Linear(512, 100)
    ref = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), fc).eval()
    fused = FusedAvgPoolLinear.from_linear(fc, dtype=dtype).to(DEVICE)
    x = torch.randn(3, 512, 3, 3)
    with torch.no_grad():
        exp = ref.double()(x.double())
        xin = x.to(DEVICE, dtype)
        out = fused(xin) if dtype == torch.float64 else run_fused("avgpool_linear", lambda: fused(xin))
    tol = 1e-10 if dtype == torch.float64 else KERNEL_TOL[dtype] * 2
    assert_close(out, exp, rtol=tol, atol=tol * exp.abs().max().item())
    with pytest.raises(ValueError, match="FusedAvgPoolLinear: expected a 4-D"):
        fused(xin.flatten(1))
    with pytest.raises(ValueError, match="FusedAvgPoolLinear: expected an input with 512 channels"):
        fused(xin[:, :8])


def test_conv_maxpool_cudnn_backend_falls_back_on_cpu():
    # The "cudnn" backend (cuDNN's conv+bias+ReLU, then the pool) is the reference on a CPU.
    x, weight, bias = make_case(1, 3, 9, 9, 8, 3, 3)
    with kernels.use_backend("cudnn"):
        out = kernels.conv2d_bias_act_maxpool(x, weight, bias, 2, 1, relu=True, pool_size=3, pool_stride=2,
                                              pool_padding=1)
    exp = F.max_pool2d(conv_expected(x, weight, bias, 2, 1, 1, 1, None, True), 3, 2, 1)
    assert_close(out, exp, rtol=1e-5, atol=1e-5)
