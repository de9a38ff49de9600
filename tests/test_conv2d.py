"""kernels.conv2d_bias_act and kernels.add_relu against PyTorch, through the real Triton kernels.

On a machine without CUDA these run interpreted (tests/conftest.py sets TRITON_INTERPRET=1); on a
GPU the same cases run compiled. Inputs are rounded to the dtype under test, and the expected
output is computed from those same values in float64, so the tolerance measures the kernel alone.
"""

import functools

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import (
    COMPILED_VARIANTS,
    DEVICE,
    HAS_CUDA,
    KERNEL_TOL,
    VARIANT_TILES,
    assert_close,
    compile_ahead,
    conv_expected,
    everywhere,
    make_case,
    results_of,
    run_forced,
    variant_case,
    watch_descriptor_allocator,
)
from fused_resnet.kernels.igemm import normalize_padding
from torch.profiler import ProfilerActivity, profile

from fused_resnet import kernels

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

TOL = KERNEL_TOL


@pytest.fixture(autouse=True)
def _ieee_fp32():
    # fp32 convs on CUDA use TF32 when cudnn allows it; these cases check the exact (IEEE) path.
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = prev


def distinct_convs(arch):
    """(C, K, kernel, stride, padding, dilation, groups) of every distinct conv in a torchvision model."""
    model = getattr(torchvision.models, arch)()
    seen = {}
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            key = (m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0],
                   m.dilation[0], m.groups)
            seen[key] = None
    return list(seen)


RESNET_CONVS = sorted(set(distinct_convs("resnet50")) | set(distinct_convs("resnext50_32x4d")))
EPILOGUES = [(False, False), (False, True), (True, False), (True, True)]  # (residual, relu)


def assert_kernel_ran(fn):
    """Run fn and check that it ran the Triton kernel: our op was called, aten's convolution was not."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    names = {e.key for e in prof.key_averages()}
    assert "fused_resnet::conv2d_bias_act" in names, sorted(names)
    assert not any("conv" in n and n.startswith("aten::") for n in names), sorted(names)
    return out


def check(x, weight, bias, stride=1, padding=0, dilation=1, groups=1, residual=None, relu=False):
    out = assert_kernel_ran(lambda: kernels.conv2d_bias_act(
        x, weight, bias, stride, padding, dilation, groups, residual=residual, relu=relu))
    exp = conv_expected(x, weight, bias, stride, padding, dilation, groups, residual, relu)
    tol = TOL[x.dtype] * max(1.0, exp.abs().max().item())
    assert out.dtype == x.dtype
    assert_close(out, exp, rtol=TOL[x.dtype], atol=tol)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("residual,relu", EPILOGUES, ids=["plain", "relu", "add", "add_relu"])
@pytest.mark.parametrize("shape", RESNET_CONVS, ids=lambda s: "C{}-K{}-k{}-s{}-p{}-d{}-g{}".format(*s))
def test_resnet_conv_shapes(shape, residual, relu, dtype):
    c, k, ksize, stride, padding, dilation, groups = shape
    hw = 13 if ksize == 7 else 7  # small maps, real channel counts; odd sizes meet every edge
    x, weight, bias = make_case(2, c, hw, hw, k, ksize, ksize, groups, dtype)
    p = (hw + 2 * padding - dilation * (ksize - 1) - 1) // stride + 1
    res = torch.randn(2, k, p, p, device=DEVICE).to(dtype) if residual else None
    out = check(x, weight, bias, stride, padding, dilation, groups, res, relu)
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter's loop choice; on a GPU each config names its loop")
@pytest.mark.parametrize("shape", [(64, 64, 3, 1, 1, 1, 1), (128, 128, 3, 2, 1, 1, 1), (256, 128, 3, 1, 2, 2, 32),
                                   (64, 256, 1, 1, 0, 1, 1)], ids=lambda s: "C{}-K{}-k{}-s{}-p{}-d{}-g{}".format(*s))
def test_the_per_tap_loop_too(shape, monkeypatch):
    # The default main loop runs over (tap, channel block) pairs; the loop nested per tap stays a
    # config choice (FLAT_LOOP=0) for the sweep to weigh, so it stays correct too.
    from fused_resnet.kernels import igemm

    monkeypatch.setattr(igemm, "INTERPRETER_FLAT_LOOP", 0)
    c, k, ksize, stride, padding, dilation, groups = shape
    x, weight, bias = make_case(2, c, 7, 7, k, ksize, ksize, groups, torch.float16)
    p = (7 + 2 * padding - dilation * (ksize - 1) - 1) // stride + 1
    check(x, weight, bias, stride, padding, dilation, groups, torch.randn(2, k, p, p).half(), True)


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter's descriptor switch; on a GPU each config names it")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [(2, 64, 7, 5, 256, "residual"), (1, 24, 3, 3, 40, "none"),
                                  (3, 256, 5, 5, 64, "shortcut"), (2, 2048, 2, 2, 24, "residual")],
                         ids=lambda c: "N{}-C{}-{}x{}-K{}-{}".format(*c))
def test_dense_1x1_through_tensor_descriptors(case, dtype, monkeypatch):
    # A 1x1 stride-1 conv over dense NHWC rows read as the matrix [M, C] through tensor
    # descriptors (USE_TMA): zeros past every edge, the epilogue as in the gathered path.
    from fused_resnet.kernels import igemm

    n, c, h, w, k, kind = case
    monkeypatch.setattr(igemm, "INTERPRETER_TMA", 1)
    allocators = watch_descriptor_allocator(monkeypatch)
    x, weight, bias = make_case(n, c, h, w, k, 1, 1, 1, dtype)
    if kind == "shortcut":
        shortcut_in = torch.randn(n, 16, 2 * h, 2 * w).to(dtype).contiguous(memory_format=torch.channels_last)
        shortcut_w = (torch.randn(k, 16, 1, 1) / 4).to(dtype)
        out = assert_kernel_ran(lambda: kernels.conv2d_bias_act(x, weight, bias, residual=shortcut_in, relu=True,
                                                                shortcut_weight=shortcut_w, shortcut_stride=2))
        exp = torch.relu(conv_expected(x, weight, bias, 1, 0, 1, 1, None, False)
                         + F.conv2d(shortcut_in.double(), shortcut_w.double(), None, 2))
    else:
        res = torch.randn(n, k, h, w).to(dtype) if kind == "residual" else None
        out = check(x, weight, bias, residual=res, relu=True)
        exp = conv_expected(x, weight, bias, 1, 0, 1, 1, res, True)
    assert_close(out, exp, rtol=TOL[dtype], atol=TOL[dtype] * max(1.0, exp.abs().max().item()))
    assert allocators, "the descriptor path did not run"


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter's split-K switch; on a GPU each config names it")
@pytest.mark.parametrize("ways", [2, 3, 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [(48, 40, 3, 1, 1, 1, "relu"), (160, 24, 1, 1, 0, 1, "residual"),
                                  (64, 32, 3, 2, 1, 2, "none"), (192, 72, 1, 2, 0, 1, "shortcut")],
                         ids=lambda c: "C{}-K{}-k{}-s{}-p{}-g{}-{}".format(*c))
def test_split_k(case, dtype, ways, monkeypatch):
    # SPLIT_K programs share an output tile, each running a stretch of the reduction (the shortcut's
    # channel blocks included); the last to finish sums the partial tiles in order and writes.
    # Under the interpreter the blocks are up to 128 channels: these make 2 to 9 trips, so some
    # splits run one trip, and where the ways pass the trips, none.
    from fused_resnet.kernels import backend, igemm

    c, k, ksize, stride, padding, groups, kind = case
    monkeypatch.setattr(igemm, "INTERPRETER_SPLIT_K", ways)
    counts = results_of(monkeypatch, backend, "zeroed_counts")
    x, weight, bias = make_case(2, c, 7, 7, k, ksize, ksize, groups, dtype)
    p = (7 + 2 * padding - ksize) // stride + 1
    if kind == "shortcut":
        shortcut_in = torch.randn(2, 136, 2 * p, 2 * p).to(dtype).contiguous(memory_format=torch.channels_last)
        shortcut_w = (torch.randn(k, 136, 1, 1) / 12).to(dtype)
        out = assert_kernel_ran(lambda: kernels.conv2d_bias_act(x, weight, bias, stride, padding, relu=True,
                                                                residual=shortcut_in, shortcut_weight=shortcut_w,
                                                                shortcut_stride=2))
        exp = torch.relu(conv_expected(x, weight, bias, stride, padding, 1, 1, None, False)
                         + F.conv2d(shortcut_in.double(), shortcut_w.double(), None, 2))
        assert_close(out, exp, rtol=TOL[dtype], atol=TOL[dtype] * max(1.0, exp.abs().max().item()))
    else:
        res = torch.randn(2, k, p, p).to(dtype) if kind == "residual" else None
        check(x, weight, bias, stride, padding, 1, groups, res, kind != "none")
    # one count an output tile (of each group), and the kernel leaves them zero for the next launch
    assert counts and all(int(t.abs().sum()) == 0 for t in counts)


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter's split-K switch")
def test_split_k_keeps_nan_and_the_order_of_its_sum(monkeypatch):
    # The splits' tiles are summed in split order, whichever program finishes last: two launches
    # give the same bits. A NaN in one split's stretch reaches the output.
    from fused_resnet.kernels import igemm

    monkeypatch.setattr(igemm, "INTERPRETER_SPLIT_K", 4)
    x, weight, bias = make_case(1, 64, 5, 5, 32, 3, 3, 1, torch.float32)
    first = kernels.conv2d_bias_act(x, weight, bias, padding=1)
    assert torch.equal(first, kernels.conv2d_bias_act(x, weight, bias, padding=1))
    x[0, 10, 2, 2] = float("nan")
    out = kernels.conv2d_bias_act(x, weight, bias, padding=1)
    assert out[0, :, 1:4, 1:4].isnan().all() and not out[0, :, 0].isnan().any()


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter's split-K switch")
def test_capture_counts_give_each_launch_its_own_zeroed_slice(monkeypatch):
    # What a CUDA graph module does around capture: the warm-up run measures the counts its
    # launches take; serving then hands each launch a 16-byte-aligned slice of one zeroed buffer,
    # which the kernels leave zero, and once that is spent, new zeros again.
    from fused_resnet.kernels import igemm
    from fused_resnet.kernels.backend import CaptureCounts

    monkeypatch.setattr(igemm, "INTERPRETER_SPLIT_K", 3)
    cases = [make_case(1, 48, 5, 5, 40, 3, 3), make_case(2, 32, 3, 3, 24, 1, 1)]
    expected = [kernels.conv2d_bias_act(x, w, b, padding=w.shape[2] // 2, relu=True) for x, w, b in cases]
    counts = CaptureCounts()

    def run():
        for (x, w, b), exp in zip(cases, expected):
            assert torch.equal(kernels.conv2d_bias_act(x, w, b, padding=w.shape[2] // 2, relu=True), exp)

    with counts.measuring():
        run()
    assert counts.buffer is None
    taken = results_of(monkeypatch, counts, "take")
    with counts.serving(torch.device("cpu")):
        run()
    assert len(taken) == 2 and counts.size == sum(-(-t.numel() // 4) * 4 for t in taken) == counts.taken
    assert all(t.data_ptr() % 16 == 0 for t in taken) and taken[0].data_ptr() != taken[1].data_ptr()
    assert not counts.buffer.any()
    with counts.serving(torch.device("cpu")):
        run()
        run()  # the buffer is spent: the second run's launches get new zeros
    assert [t is None for t in taken[2:]] == [False, False, True, True]


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter's descriptor switch")
def test_a_descriptor_plan_launches_from_another_thread(monkeypatch):
    # Triton keeps its allocator per context, and a new thread starts with none: a plan built in
    # one thread gives Triton the allocator again in the thread that launches it.
    import threading

    from fused_resnet.kernels import igemm

    # (The interpreter runs descriptors without one; a compiled launch asks Triton's allocator,
    # in the launching context, for their scratch: test_a_descriptor_plan_compiled_in_another_thread.)
    from triton.runtime import _allocation

    monkeypatch.setattr(igemm, "INTERPRETER_TMA", 1)
    allocators = watch_descriptor_allocator(monkeypatch)
    x, weight, bias = make_case(2, 32, 4, 4, 16, 1, 1, 1, torch.float16)
    plan = kernels.plan_conv2d_bias_act(x, weight, bias, relu=True)
    expected = plan(x, None)
    outputs, seen = [], []
    thread = threading.Thread(target=lambda: (outputs.append(plan(x, None)), seen.append(_allocation._allocator.get())))
    thread.start()
    thread.join()
    assert len(outputs) == 1 and torch.equal(outputs[0], expected)
    assert len(allocators) == 2 and seen == allocators[1:]  # the thread's Triton sees the allocator


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter's descriptor switch")
def test_dense_1x1_takes_misaligned_and_strided_inputs(monkeypatch):
    from fused_resnet.kernels import igemm

    monkeypatch.setattr(igemm, "INTERPRETER_TMA", 1)
    x, weight, bias = make_case(2, 32, 4, 4, 16, 1, 1, 1, torch.float16)
    storage = torch.empty(x.numel() + 1, dtype=torch.float16)
    shifted = storage[1:].view(2, 4, 4, 32).permute(0, 3, 1, 2)  # dense NHWC strides, pointer 2 bytes off
    shifted.copy_(x)
    assert shifted.data_ptr() % 16 and shifted.stride() == x.stride()
    check(shifted, weight, bias, relu=True)
    check(x[:, :, ::2, ::2], weight, bias)  # strided: not a dense matrix, so the gathered path


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter's descriptor switches")
@pytest.mark.parametrize("switch,ksize", [("INTERPRETER_TMA", 1), ("INTERPRETER_BOX_W", 3)], ids=["dense", "box"])
def test_descriptor_epilogues_take_a_misaligned_residual(switch, ksize, monkeypatch):
    # Where y is written through a tensor descriptor, the residual is read through one: a dense
    # NHWC residual whose pointer is not 16-byte aligned is copied first, as x is.
    from fused_resnet.kernels import igemm

    monkeypatch.setattr(igemm, switch, 4)
    allocators = watch_descriptor_allocator(monkeypatch)
    x, weight, bias = make_case(2, 32, 5, 4, 16, ksize, ksize, 1, torch.float16)
    storage = torch.empty(2 * 16 * 5 * 4 + 1, dtype=torch.float16)
    res = storage[1:].view(2, 5, 4, 16).permute(0, 3, 1, 2)  # dense NHWC strides, pointer 2 bytes off
    res.copy_(torch.randn(2, 16, 5, 4))
    assert res.data_ptr() % 16 and res.is_contiguous(memory_format=torch.channels_last)
    check(x, weight, bias, 1, ksize // 2, 1, 1, res, True)
    assert allocators, "the descriptor path did not run"


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter's box switch; on a GPU each config names it")
@pytest.mark.parametrize("box_w", [1, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [(2, 64, 7, 5, 64, 3, 1, 1, 1, "residual"), (1, 32, 9, 9, 48, 3, 2, 2, 1, "none"),
                                  (2, 16, 6, 6, 32, 3, 0, 1, 1, "none"), (1, 40, 3, 2, 16, 3, 1, 1, 1, "residual"),
                                  (1, 24, 4, 6, 24, 5, 2, 1, 1, "none"), (2, 128, 8, 6, 64, 3, 1, 1, 2, "residual"),
                                  (1, 256, 6, 10, 32, 3, 2, 2, 2, "none"), (1, 128, 4, 4, 16, 4, 0, 1, 2, "none")],
                         ids=lambda c: "N{}-C{}-{}x{}-K{}-k{}-p{}-d{}-s{}-{}".format(*c))
def test_box_tiles_through_tensor_descriptors(case, dtype, box_w, monkeypatch):
    # A conv whose output tile is a box of pixels: each tap's input box is read through a
    # descriptor (4-D; for stride 2, 5-D with rows and columns split by parity), zero-filled past
    # every edge (the padding, channels past a block), the output box stored through one, clipped
    # to the map. Boxes overhang maps of every size here.
    from fused_resnet.kernels import igemm

    n, c, h, w, k, ksize, padding, dilation, stride, kind = case
    monkeypatch.setattr(igemm, "INTERPRETER_BOX_W", box_w)
    allocators = watch_descriptor_allocator(monkeypatch)
    x, weight, bias = make_case(n, c, h, w, k, ksize, ksize, 1, dtype)
    assert igemm.box_schedule(x, weight, (stride, stride), 1)
    p = (h + 2 * padding - dilation * (ksize - 1) - 1) // stride + 1
    q = (w + 2 * padding - dilation * (ksize - 1) - 1) // stride + 1
    res = torch.randn(n, k, p, q).to(dtype) if kind == "residual" else None
    check(x, weight, bias, stride, padding, dilation, 1, res, True)
    assert allocators, "the descriptor path did not run"


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter's box switch; on a GPU each config names it")
@pytest.mark.parametrize("c", [24, 32], ids=["partial-channel-blocks", "whole-channel-blocks"])
def test_box_tiles_with_one_column_filters(c, monkeypatch):
    # A 3x1 filter: its tap axis S is 1, whose weight stride the launch passes as 0. The weight
    # read as [K, R*S, C] (channel blocks not whole) must still step Cg from tap to tap.
    from fused_resnet.kernels import igemm

    monkeypatch.setattr(igemm, "INTERPRETER_BOX_W", 4)
    x, weight, bias = make_case(1, c, 6, 5, 16, 3, 1, 1, torch.float32)
    assert igemm.box_schedule(x, weight, (1, 1), 1)
    check(x, weight, bias, 1, (1, 0), 1, 1, None, True)


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter's box switch; on a GPU each config names it")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_few_channel_conv_takes_the_row_schedule_not_box_tiles(dtype, monkeypatch):
    # 8 channels make 16-byte rows, enough for box tiles; but the row schedule packs the weight by
    # filter rows, which box tiles would read as (K, R, S, C). The row schedule wins.
    from fused_resnet.kernels import igemm

    monkeypatch.setattr(igemm, "INTERPRETER_BOX_W", 4)
    allocators = watch_descriptor_allocator(monkeypatch)
    x, weight, bias = make_case(2, 8, 8, 8, 16, 3, 3, 1, dtype)
    assert igemm.box_schedule(x, weight, (1, 1), 1) and igemm.row_schedule(x, weight, (1, 1), 1)
    check(x, weight, bias, 1, 1, 1, 1, None, True)
    assert not allocators, "box tiles ran over a row-packed weight"


def test_box_schedule_only_for_dense_stride_1_convs():
    from fused_resnet.kernels.igemm import box_schedule, box_width

    x, weight, _ = make_case(1, 64, 8, 8, 32, 3, 3, 1, torch.float16)
    assert box_schedule(x, weight, (1, 1), 1)
    # Stride 2: only with a multiple of 128 channels (every channel block whole) and an even map.
    assert not box_schedule(x, weight, (2, 2), 1)
    wide = make_case(1, 128, 8, 6, 32, 3, 3, 1, torch.float16)
    assert box_schedule(wide[0], wide[1], (2, 2), 1)
    odd = make_case(1, 128, 7, 6, 32, 3, 3, 1, torch.float16)
    assert not box_schedule(odd[0], odd[1], (2, 2), 1)
    assert not box_schedule(wide[0], wide[1], (3, 3), 1) and not box_schedule(wide[0], wide[1], (1, 2), 1)
    assert not box_schedule(x.contiguous(), weight, (1, 1), 1)  # NCHW
    assert not box_schedule(x, weight.contiguous(), (1, 1), 1)  # weight not (K, R, S, C) in memory
    grouped = make_case(1, 64, 8, 8, 32, 3, 3, 2, torch.float16)
    assert not box_schedule(grouped[0], grouped[1], (1, 1), 2)
    one = make_case(1, 64, 8, 8, 32, 1, 1, 1, torch.float16)
    assert not box_schedule(one[0], one[1], (1, 1), 1)  # 1x1: the dense GEMM's business
    narrow = make_case(1, 4, 8, 8, 32, 3, 3, 1, torch.float16)
    assert not box_schedule(narrow[0], narrow[1], (1, 1), 1)  # 8-byte channel rows: below the copy unit
    # Widths: a 56x56 map in exact 8x8 boxes; 28x28 in 16x4 (32x28 computed, not 32x32);
    # a 1x1 map in the squarest box, since any box wastes the same.
    assert box_width(56, 56, 64) == 8
    assert box_width(28, 28, 64) == 4
    assert box_width(1, 1, 64) == 8
    assert box_width(3, 200, 16) == 16


def test_first_call_candidates_take_box_tiles_where_boxes_fit_the_map():
    from fused_resnet.kernels import configs
    from fused_resnet.kernels.configs import with_variants
    from fused_resnet.kernels.igemm import box_variant, box_width, dense_variant

    switches = {"FLAT_LOOP": 1, "USE_TMA": 0, "BOX_W": 0}
    for p, expect_boxed in ((56, 2), (28, 2), (14, 2), (7, 1)):
        gathered = configs.candidates(256 * p * p, 256, 256, 2, switches=switches)
        found = with_variants(gathered, box_variant(p, p))
        boxed = [c for c in found if c["BOX_W"]]
        assert len(found) <= 4 and len(boxed) == expect_boxed, (p, found)
        assert found[: len(boxed)] == boxed  # timed first
        for c in boxed:
            assert c["BOX_W"] == box_width(p, p, c["BLOCK_M"])
            assert {**c, "BOX_W": 0} in gathered[:2]
        # 128-pixel boxes over a 7x7 map would compute 16x8 pixels for 49: left gathered.
        assert all(c["BLOCK_M"] < 128 for c in boxed) or p > 7
    gathered = configs.candidates(256 * 56 * 56, 64, 256, 2, switches=switches)
    dense = with_variants(gathered, dense_variant)
    assert [c["USE_TMA"] for c in dense] == [1, 1, 0, 0] and dense[2:] == gathered[:2]
    assert dense[:2] == [{**c, "USE_TMA": 1} for c in gathered[:2]]


ODD_SHAPES = [
    # n, c, h, w, k, r, s, stride, padding, dilation, groups
    (1, 3, 5, 7, 8, 3, 3, 1, 1, 1, 1),  # C=3, 5x7 map
    (2, 3, 9, 11, 64, 7, 7, 2, 3, 1, 1),  # the stem on an odd map
    (1, 16, 1, 1, 24, 1, 1, 1, 0, 1, 1),  # one-pixel map
    (1, 16, 1, 1, 24, 3, 3, 1, 1, 1, 1),  # one pixel, 3x3 with padding: only the centre tap hits
    (3, 37, 6, 5, 53, 3, 3, 1, 1, 1, 1),  # C and K multiples of no block size
    (2, 65, 5, 5, 129, 1, 1, 2, 0, 1, 1),  # one past a block size
    (1, 8, 9, 9, 8, 3, 3, 1, 2, 2, 1),  # dilation 2
    (1, 12, 7, 9, 12, 3, 3, 1, 1, 1, 12),  # depthwise
    (1, 24, 6, 6, 36, 3, 3, 2, 1, 1, 3),  # groups with Cg=8 < 16: flat reduction
    (2, 20, 8, 6, 10, 2, 4, (2, 1), (1, 2), (1, 2), 2),  # everything anisotropic
    (1, 4, 3, 3, 5, 3, 3, 1, 0, 1, 1),  # kernel as large as the map
    (1, 16, 6, 9, 8, 4, 8, 1, (1, 3), 1, 1),  # 32 taps: the last one in the sign bit of the tap mask
    (1, 16, 9, 8, 8, 7, 7, 1, 3, 1, 1),  # 49 taps, more than the tap mask holds: compared per tap
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ODD_SHAPES, ids=lambda c: "x".join(map(str, c[:7])))
def test_odd_shapes(case, dtype):
    n, c, h, w, k, r, s, stride, padding, dilation, groups = case
    x, weight, bias = make_case(n, c, h, w, k, r, s, groups, dtype)
    exp = conv_expected(x, weight, bias, stride, padding, dilation, groups, None, False)
    res = torch.randn(exp.shape, device=DEVICE).to(dtype)
    check(x, weight, bias, stride, padding, dilation, groups, res, True)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(stride=2, padding=1),
        dict(stride=(2, 1), padding=(0, 1)),
        dict(stride=[1, 2], padding=[1, 0], dilation=[2, 1]),
        dict(padding="same"),
        dict(padding="same", dilation=2),
        dict(padding="valid", stride=2),
        dict(padding=(2, 0)),
        dict(dilation=(1, 3), padding=3),
    ],
    ids=str,
)
@pytest.mark.parametrize("ksize", [(3, 3), (2, 4), (1, 1)], ids=str)
def test_argument_forms(kwargs, ksize):
    x, weight, bias = make_case(2, 8, 9, 8, 16, *ksize)
    check(x, weight, bias, **kwargs, relu=True)


def test_padding_same_even_kernel_is_asymmetric():
    # An even kernel under 'same' pads one more pixel at the bottom/right, as F.conv2d does.
    assert normalize_padding("same", (1, 1, 4, 2), (1, 1), (1, 1)) == [1, 2, 0, 1]
    x, weight, bias = make_case(1, 4, 6, 7, 4, 4, 2)
    out = check(x, weight, bias, padding="same")
    assert out.shape == F.conv2d(x.cpu(), weight.cpu(), padding="same").shape


def test_no_bias_and_unbatched_input():
    x, weight, _ = make_case(1, 6, 5, 5, 10, 3, 3)
    res = torch.randn(10, 5, 5, device=DEVICE)
    out = kernels.conv2d_bias_act(x[0], weight, None, 1, 1, residual=res, relu=True)
    assert out.shape == (10, 5, 5)
    assert_close(out, conv_expected(x, weight, None, 1, 1, 1, 1, res[None], True)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced", "transposed_hw"])
def test_memory_formats_and_views(layout):
    base = torch.randn(2, 10, 9, 12, device=DEVICE)
    x = {
        "contiguous": base.contiguous(),
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "sliced": base[:, 1:9, ::2, 1::2],
        "transposed_hw": base.transpose(2, 3),
    }[layout]
    weight = torch.randn(7, x.shape[1], 3, 3, device=DEVICE)  # contiguous (OIHW) weight works too
    # The residual may be any strided view as well: here one whose H and W strides are swapped.
    res = torch.randn(2, 7, x.shape[3], x.shape[2], device=DEVICE).transpose(2, 3)
    check(x, weight, torch.randn(7, device=DEVICE), 1, 1, residual=res, relu=True)


def test_window_span_counts_every_tap_and_channel_block():
    from fused_resnet.kernels.igemm import window_span

    # Dense channels_last (N, 64, 14, 14): strides (c, h, w) = (1, 14 * 64, 64).
    assert window_span((1, 896, 64), 64, (3, 3)) == 2 * 896 + 2 * 64 + 64 + 256
    assert window_span((1, 896, 64), 64, (3, 3), (2, 2)) == 4 * 896 + 4 * 64 + 64 + 256
    assert window_span((196, 14, 1), 64, (1, 1)) == (64 + 256) * 196  # NCHW: channels 196 apart


@pytest.mark.parametrize("layout", ["contiguous", "transposed_hw"])
def test_an_input_whose_windows_pass_32_bit_offsets_is_copied(layout, monkeypatch):
    # The gathered loop adds 32-bit offsets within a window: an input whose windows span more is
    # read as a dense channels_last copy. (The limit is lowered so that a small input passes it:
    # an NCHW input's channels lie H*W apart, (10 + 256) * 63 = 16758 here; channels_last, 1.)
    from fused_resnet.kernels import igemm

    monkeypatch.setattr(igemm, "MAX_WINDOW_SPAN", 8000)
    copied = []
    real = igemm.gather_layout

    def watch(x, too_wide=None):
        to_layout, seen = real(x, too_wide)
        copied.append(seen.is_contiguous(memory_format=torch.channels_last) and seen.data_ptr() != x.data_ptr())
        return to_layout, seen

    monkeypatch.setattr(igemm, "gather_layout", watch)
    base = torch.randn(2, 10, 7, 9, device=DEVICE)
    x = base if layout == "contiguous" else base.transpose(2, 3)
    check(x, torch.randn(6, 10, 3, 3, device=DEVICE), torch.randn(6, device=DEVICE), 1, 1, relu=True)
    assert copied == [True]
    # And a window that spans too much even channels_last is refused, not read with wrapped offsets.
    monkeypatch.setattr(igemm, "MAX_WINDOW_SPAN", 300)
    with pytest.raises(ValueError, match="conv window spans"):
        kernels.conv2d_bias_act(x, torch.randn(6, 10, 3, 3, device=DEVICE), padding=1)


def test_a_shortcut_input_whose_windows_pass_32_bit_offsets_is_copied(monkeypatch):
    # The shortcut's input in NCHW: its channels lie 14 * 14 apart, (12 + 256) * 196 elements a
    # window. Read as it is, the launch refuses it (check_window); copied to channels_last, 268.
    from fused_resnet.kernels import igemm

    monkeypatch.setattr(igemm, "MAX_WINDOW_SPAN", 50000)
    x, weight, bias = make_case(2, 8, 7, 7, 16, 1, 1, 1, torch.float32)
    shortcut_in = torch.randn(2, 12, 14, 14, device=DEVICE)
    shortcut_w = torch.randn(16, 12, 1, 1, device=DEVICE)
    out = kernels.conv2d_bias_act(x, weight, bias, residual=shortcut_in, relu=True, shortcut_weight=shortcut_w,
                                  shortcut_stride=2)
    exp = torch.relu(conv_expected(x, weight, bias, 1, 0, 1, 1, None, False)
                     + F.conv2d(shortcut_in.cpu().double(), shortcut_w.cpu().double(), None, 2))
    assert_close(out, exp, rtol=TOL[torch.float32], atol=TOL[torch.float32] * exp.abs().max().item())


def test_empty_batch_gives_empty_output():
    x, weight, bias = make_case(0, 8, 6, 6, 4, 3, 3)
    out = kernels.conv2d_bias_act(x, weight, bias, 1, 1, relu=True)
    assert out.shape == (0, 4, 6, 6)


def test_nan_and_inf_propagate_like_pytorch():
    x, weight, bias = make_case(1, 4, 5, 5, 3, 3, 3)
    x[0, 1, 2, 2] = float("nan")
    x[0, 2, 0, 4] = float("inf")
    out = kernels.conv2d_bias_act(x, weight, bias, 1, 1, relu=True)
    exp = conv_expected(x, weight, bias, 1, 1, 1, 1, None, True)
    assert torch.equal(torch.isnan(out.cpu()), torch.isnan(exp)), "NaN positions differ"
    assert torch.equal(torch.isinf(out.cpu()), torch.isinf(exp)), "Inf positions differ"
    assert torch.isnan(exp).any()
    finite = torch.isfinite(exp)
    assert_close(out.cpu()[finite], exp[finite], rtol=1e-5, atol=1e-5)


def test_small_groups_run_bundled_as_denser_groups():
    # ResNeXt's groups of 4-32 channels run 16 to 2 at a time as one group of 64 channels, the
    # weight block-diagonal: the same conv, exactly, in float64.
    from fused_resnet.kernels.igemm import BUNDLE_CHANNELS, bundle_groups

    for c, k, groups, bundled_groups in [(128, 128, 32, 2), (256, 512, 32, 4), (64, 64, 2, 1), (24, 36, 3, 1),
                                         (256, 256, 2, 2), (30, 30, 5, 1)]:
        weight = torch.randn(k, c // groups, 3, 3, dtype=torch.float64)
        bundled, g = bundle_groups(weight, groups)
        assert g == bundled_groups and bundled.shape == (k, c // g, 3, 3)
        assert c // g <= max(BUNDLE_CHANNELS, c // groups)
        x = torch.randn(2, c, 6, 6, dtype=torch.float64)
        torch.testing.assert_close(F.conv2d(x, bundled, padding=1, groups=g), F.conv2d(x, weight, padding=1,
                                                                                       groups=groups),
                                   rtol=0, atol=1e-12)


def test_a_nan_reaches_its_bundle_of_groups():
    # What bundling changes: a NaN input reaches every output channel of its bundle (the zeros
    # between the groups times NaN), not only its own group's; the other bundles keep their values.
    x, weight, bias = make_case(1, 256, 4, 4, 256, 3, 3, 32)  # groups of 8: bundles of 8 groups, 64 channels
    x[0, 3, 1, 1] = float("nan")  # group 0, bundle 0
    out = kernels.conv2d_bias_act(x, weight, bias, 1, 1, groups=32).cpu()
    exp = conv_expected(x, weight, bias, 1, 1, 1, 32, None, False)
    assert torch.isnan(exp[0, :8]).any() and not torch.isnan(exp[0, 8:]).any()
    assert torch.isnan(out[0, :64]).any() and not torch.isnan(out[0, 64:]).any()
    assert_close(out[0, 64:], exp[0, 64:], rtol=1e-5, atol=1e-5)


def test_relu_keeps_nan_from_the_residual():
    x, weight, bias = make_case(1, 4, 3, 3, 2, 1, 1)
    res = torch.zeros(1, 2, 3, 3, device=DEVICE)
    res[0, 0, 1, 1] = float("nan")
    out = kernels.conv2d_bias_act(x, weight, bias, residual=res, relu=True)
    assert torch.isnan(out[0, 0, 1, 1]) and torch.isnan(out).sum() == 1


def test_float64_runs_the_reference_exactly():
    x, weight, bias = make_case(1, 5, 6, 6, 3, 3, 3, dtype=torch.float64)
    out = kernels.conv2d_bias_act(x, weight, bias, 1, 1, relu=True)
    assert out.dtype == torch.float64
    assert_close(out, conv_expected(x, weight, bias, 1, 1, 1, 1, None, True), rtol=1e-12, atol=1e-12)


# ---- bad input ------------------------------------------------------------------------------


def _bad(match, *args, exc=(ValueError, TypeError), **kwargs):
    with pytest.raises(exc, match=match):
        kernels.conv2d_bias_act(*args, **kwargs)


def test_bad_inputs_raise_clear_errors():
    x, weight, bias = make_case(2, 8, 6, 6, 4, 3, 3)
    _bad("input has 8 channels", x, weight[:, :4].contiguous())
    _bad("input must be 3-D .* or 4-D", x[0, 0], weight)
    _bad("weight must be 4-D", x, weight[0])
    _bad("bias must have shape", x, weight, bias[:3])
    _bad("residual must have the output's shape", x, weight, bias, padding=1, residual=torch.zeros(2, 4, 5, 5))
    _bad("residual for unbatched input must be 3-D", x[0], weight, bias, residual=torch.zeros(2, 4, 4, 4))
    _bad("dtype torch.int64", x.long(), weight.long())
    _bad("share one dtype", x, weight.half())
    _bad("share one dtype", x, weight, bias, residual=torch.zeros(2, 4, 4, 4, dtype=torch.float16))
    _bad("out_channels 4 must be divisible by groups=8", x, weight[:, :1].contiguous(), groups=8)
    _bad("does not fit", x[:, :, :2, :2], weight)
    _bad("stride .* must be >= 1", x, weight, stride=0)
    _bad("padding .* must be >= 0", x, weight, padding=-1)
    _bad("padding must be an int, a pair, 'same' or 'valid'", x, weight, padding="full")
    _bad("not supported for strided", x, weight, stride=2, padding="same")
    _bad("stride must be an int or a pair", x, weight, stride=(1, 2, 3))
    _bad("groups must be an int", x, weight, groups=1.0)


def test_device_mix_is_an_error():
    x, weight, bias = make_case(1, 4, 5, 5, 3, 3, 3, device="cpu")
    meta_weight = torch.empty(3, 4, 3, 3, device="meta")
    with pytest.raises(ValueError, match="one device"):
        kernels.conv2d_bias_act(x, meta_weight, None)


# ---- registration ---------------------------------------------------------------------------


def test_opcheck():
    x, weight, bias = make_case(2, 16, 5, 5, 8, 3, 3)
    res = torch.randn(2, 8, 5, 5, device=DEVICE)
    op = torch.ops.fused_resnet.conv2d_bias_act.default
    torch.library.opcheck(op, (x, weight, bias, [1, 1], [1, 1, 1, 1], [1, 1], 1, res, True, None, [1, 1], "auto"))
    torch.library.opcheck(op, (x, weight, None, [2, 1], [0, 1, 2, 0], [1, 1], 1, None, False, None, [1, 1],
                               "reference"))
    shortcut_in = torch.randn(2, 4, 10, 9, device=DEVICE)
    shortcut_weight = torch.randn(8, 4, 1, 1, device=DEVICE)
    torch.library.opcheck(op, (x, weight, bias, [1, 1], [1, 1, 1, 1], [1, 1], 1, shortcut_in, True,
                               shortcut_weight, [2, 2], "triton"))
    torch.library.opcheck(torch.ops.fused_resnet.add_relu.default, (res, res.flip(0), "auto"))


def test_use_backend_holds_in_its_own_thread_only():
    import threading

    seen = []
    with kernels.use_backend("reference"):
        thread = threading.Thread(target=lambda: seen.append(kernels.current_backend()))
        thread.start()
        thread.join()
        with kernels.use_backend("cudnn"):
            assert kernels.current_backend() == "cudnn"
        assert kernels.current_backend() == "reference"
    assert seen == ["auto"] and kernels.current_backend() == "auto"


def test_use_backend_switch():
    x, weight, bias = make_case(1, 8, 5, 5, 8, 3, 3)
    with kernels.use_backend("reference"):
        assert kernels.current_backend() == "reference"
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            ref = kernels.conv2d_bias_act(x, weight, bias, 1, 1, relu=True)
        assert any(e.key == "aten::convolution" for e in prof.key_averages())
    assert kernels.current_backend() == "auto"
    with kernels.use_backend("triton"):
        tri = assert_kernel_ran(lambda: kernels.conv2d_bias_act(x, weight, bias, 1, 1, relu=True))
    assert_close(tri, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown backend"), kernels.use_backend("tensorrt"):
        pass


# ---- add_relu -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "mixed", "odd_view"])
def test_add_relu(dtype, layout):
    a = torch.randn(2, 6, 5, 7, device=DEVICE).to(dtype)
    b = torch.randn(2, 6, 5, 7, device=DEVICE).to(dtype)
    if layout in ("channels_last", "mixed"):
        a = a.contiguous(memory_format=torch.channels_last)
    if layout == "channels_last":
        b = b.contiguous(memory_format=torch.channels_last)
    if layout == "odd_view":
        a = a.transpose(1, 3)
        b = b.transpose(1, 3)
    a[0, 0, 0, 0] = float("nan")
    out = kernels.add_relu(a, b)
    exp = torch.relu(a.double() + b.double())
    assert out.dtype == dtype and out.shape == a.shape
    assert_close(out, exp, rtol=TOL[dtype], atol=TOL[dtype])
    assert torch.isnan(out[0, 0, 0, 0])


def test_add_relu_bad_inputs():
    a = torch.randn(2, 3)
    with pytest.raises(ValueError, match="one shape"):
        kernels.add_relu(a, a.t())
    with pytest.raises(TypeError, match="share one dtype"):
        kernels.add_relu(a, a.half())
    assert kernels.add_relu(torch.empty(0, 3), torch.empty(0, 3)).shape == (0, 3)


# ---- GPU-only facts -------------------------------------------------------------------------


@pytest.mark.gpu
def test_torch_compile_fullgraph_over_a_fused_block():
    from conftest import randomize_bn

    import fused_resnet

    block = randomize_bn(torchvision.models.resnet.Bottleneck(256, 64)).eval()
    fused = fused_resnet.FusedBottleneck.from_torchvision(block, dtype=torch.float16).cuda()
    x = torch.randn(4, 256, 14, 14, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        eager = fused(x)
        compiled = torch.compile(fused, fullgraph=True)(x)
    assert_close(compiled, eager, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_cuda_graph_capture():
    x, weight, bias = make_case(8, 64, 14, 14, 64, 3, 3, dtype=torch.float16)
    static_out = kernels.conv2d_bias_act(x, weight, bias, 1, 1, relu=True)  # tunes outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = kernels.conv2d_bias_act(x, weight, bias, 1, 1, relu=True)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    exp = conv_expected(x, weight, bias, 1, 1, 1, 1, None, True)
    assert_close(static_out, exp, rtol=TOL[torch.float16], atol=TOL[torch.float16] * exp.abs().max().item())


@pytest.mark.gpu
def test_tensor_over_2_31_elements():
    # 1 x 64 x 6000 x 6000 = 2.3e9 elements each for input, residual and output (fp16: ~14 GB).
    n, c, h, w = 1, 64, 6000, 6000
    x = torch.randn(n, c, h, w, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    assert x.numel() > 2**31
    weight = (torch.randn(64, 64, 1, 1, device="cuda") / 8).half()
    res = torch.randn_like(x)
    out = kernels.conv2d_bias_act(x, weight, None, residual=res, relu=True)
    # Check rows at the start and past the 2**31 boundary against F.conv2d on slices.
    for rows in (slice(0, 8), slice(h - 8, h)):
        exp = torch.relu(F.conv2d(x[:, :, rows].float(), weight.float()) + res[:, :, rows].float())
        assert_close(out[:, :, rows], exp, rtol=2e-3, atol=2e-2)


def pooled_stem_config(rows, dtype):
    return {**VARIANT_TILES, "BLOCK_K": 16 if dtype == torch.float32 else 32, "num_stages": 2, "FLAT_LOOP": 1,
            "ROWS": rows}


def pooled_stem(x, weight, bias):
    """A ResNet stem: 7x7/2 conv (padding 3), ReLU, 3x3/2 max pooling (padding 1), in one kernel."""
    return kernels.conv2d_bias_act_maxpool(x, weight, bias, 2, 3, relu=True, pool_size=3, pool_stride=2,
                                           pool_padding=1)


@pytest.fixture(scope="module")
def compiled_ahead():
    """On a GPU, the kernels of every compiled variant and pooled stem below, compiled at once in
    parallel before their tests launch them one at a time."""
    from unittest import mock

    from fused_resnet.kernels import configs, igemm

    def variant(case, dtype):
        blocks, config, (x, weight, bias, stride, padding, res) = variant_case(case, dtype)
        with mock.patch.object(igemm, "SPACE_TO_DEPTH", blocks), configs.override(config):
            kernels.conv2d_bias_act(x, weight, bias, stride, padding, residual=res, relu=True)

    def stem(rows, blocks, dtype):
        x, weight, bias = make_case(2, 3, 38, 38, 64, 7, 7, 1, dtype)
        with mock.patch.object(igemm, "SPACE_TO_DEPTH", blocks), configs.override(pooled_stem_config(rows, dtype)):
            pooled_stem(x, weight, bias)

    compile_ahead([functools.partial(variant, case, dtype) for case in COMPILED_VARIANTS for dtype in DTYPES]
                  + [functools.partial(stem, rows, blocks, dtype)
                     for rows in (0, 1) for blocks in (False, True) for dtype in DTYPES])


@pytest.mark.parametrize("dtype,where", everywhere(DTYPES))
@pytest.mark.parametrize("case", COMPILED_VARIANTS, ids=lambda c: "C{}-K{}-k{}-s{}-p{}-hw{}-{}".format(
    *c[:6], "-".join(f"{k}{v}" for k, v in c[6].items())))
def test_every_kernel_variant(case, dtype, where, monkeypatch, compiled_ahead):
    # Each variant in a GPU's tiles: compiled on a GPU, interpreted on a CPU.
    from fused_resnet.kernels import igemm

    blocks, config, (x, weight, bias, stride, padding, res) = variant_case(case, dtype)
    monkeypatch.setattr(igemm, "SPACE_TO_DEPTH", blocks)
    run_forced(config, lambda: check(x, weight, bias, stride, padding, 1, 1, res, True))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_resnexts_bundled_groups_compiled(dtype):
    # ResNeXt-50's grouped 3x3s (32 groups of 4, 8 and 16 channels, the second of stride 2), run
    # as bundles of 64 channels, compiled, with a residual in the epilogue.
    from fused_resnet.kernels import configs

    for c, stride, hw in [(128, 1, 14), (256, 2, 14), (512, 1, 7)]:
        x, weight, bias = make_case(2, c, hw, hw, c, 3, 3, 32, dtype)
        p = (hw + 2 - 3) // stride + 1
        res = torch.randn(2, c, p, p, device=DEVICE).to(dtype)
        with configs.override({**VARIANT_TILES, "FLAT_LOOP": 1, "USE_TMA": 0, "BOX_W": 0}) as asked:
            check(x, weight, bias, stride, 1, 1, 32, res, True)
        assert asked, "the forced config was not looked up"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_k_compiled(dtype):
    # Split-K compiled: resnet50's last 3x3 and its projection-shortcut 1x1 at batch 1, split 17
    # and 5 ways (as their first-call candidates are), 20 times in a row (the counts were left zero,
    # and the sum, in split order, is the same bits however the programs raced) and replayed from a
    # CUDA graph (counts of its own, zeroed in the graph).
    from fused_resnet.kernels import configs

    split = {**VARIANT_TILES, "BLOCK_K": 32 if dtype == torch.float32 else 64, "FLAT_LOOP": 1, "USE_TMA": 0,
             "BOX_W": 0}
    x, weight, bias = make_case(1, 512, 7, 7, 512, 3, 3, 1, dtype)
    res = torch.randn(1, 512, 7, 7, device=DEVICE).to(dtype)
    with configs.override({**split, "SPLIT_K": 17}) as asked:
        first = check(x, weight, bias, 1, 1, 1, 1, res, True)
        for _ in range(20):
            assert torch.equal(first, kernels.conv2d_bias_act(x, weight, bias, 1, 1, residual=res, relu=True))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = kernels.conv2d_bias_act(x, weight, bias, 1, 1, residual=res, relu=True)
        for _ in range(2):
            graph.replay()
            assert torch.equal(captured, first)
    assert asked
    x, weight, bias = make_case(1, 512, 7, 7, 2048, 1, 1, 1, dtype)
    shortcut_in = torch.randn(1, 1024, 14, 14, device=DEVICE).to(dtype).contiguous(memory_format=torch.channels_last)
    shortcut_w = (torch.randn(2048, 1024, 1, 1, device=DEVICE) / 32).to(dtype)
    with configs.override({**split, "SPLIT_K": 5}):
        out = kernels.conv2d_bias_act(x, weight, bias, residual=shortcut_in, relu=True, shortcut_weight=shortcut_w,
                                      shortcut_stride=2)
    exp = torch.relu(conv_expected(x, weight, bias, 1, 0, 1, 1, None, False)
                     + F.conv2d(shortcut_in.cpu().double(), shortcut_w.cpu().double(), None, 2))
    assert_close(out, exp, rtol=TOL[dtype], atol=TOL[dtype] * exp.abs().max().item())


@pytest.mark.gpu
def test_a_descriptor_plan_compiled_in_another_thread():
    # A dense 1x1 read through tensor descriptors, planned here and launched from a new thread,
    # whose context has no Triton allocator until the launch gives it one.
    import threading

    from fused_resnet.kernels import configs

    x, weight, bias = make_case(2, 64, 8, 8, 64, 1, 1, 1, torch.float16)
    with configs.override({**VARIANT_TILES, "FLAT_LOOP": 1, "USE_TMA": 1, "BOX_W": 0}) as asked:
        plan = kernels.plan_conv2d_bias_act(x, weight, bias, relu=True)
        expected = plan(x, None)
    assert asked
    outputs, errors = [], []

    def launch():
        try:
            outputs.append(plan(x, None))
            torch.cuda.synchronize()
        except Exception as err:
            errors.append(err)

    thread = threading.Thread(target=launch)
    thread.start()
    thread.join()
    assert not errors and torch.equal(outputs[0], expected)


@pytest.mark.gpu
def test_split_k_in_a_cuda_graph_module():
    # A CUDAGraphModule's split-K launches count in slices of one buffer zeroed before capture
    # (CaptureCounts): every replay leaves them zero and gives the eager launches' bits.
    from fused_resnet.kernels import configs
    from torch import nn

    from fused_resnet import CUDAGraphModule

    x, weight, bias = make_case(1, 512, 7, 7, 512, 3, 3, 1, torch.float16)

    class TwoConvs(nn.Module):
        def forward(self, t):
            y = kernels.conv2d_bias_act(t, weight, bias, 1, 1, relu=True)
            return kernels.conv2d_bias_act(y, weight, bias, 1, 1, residual=t, relu=True)

    split = {**VARIANT_TILES, "BLOCK_K": 64, "FLAT_LOOP": 1, "USE_TMA": 0, "BOX_W": 0, "SPLIT_K": 17}
    with configs.override(split) as asked:
        expected = TwoConvs()(x)
        graphed = CUDAGraphModule(TwoConvs())
        for _ in range(3):
            assert torch.equal(graphed(x), expected)
    assert asked
    (entry,) = graphed._graphs.values()
    counts = entry.counts
    assert counts.taken == counts.size > 0 and not counts.buffer.any()


@pytest.mark.parametrize("dtype,where", everywhere(DTYPES))
@pytest.mark.parametrize("blocks", [True, False], ids=["space_to_depth", "direct"])
@pytest.mark.parametrize("rows", [1, 0], ids=["rows", "gathered"])
def test_the_pooled_stem(rows, blocks, dtype, where, monkeypatch, compiled_ahead):
    # The stem's conv + ReLU + max pooling in one kernel, each schedule in a GPU's tiles (compiled
    # on a GPU, interpreted on a CPU): the row schedule reads the pool's padded taps unmasked, from
    # the margin kept around the space-to-depth copy.
    from fused_resnet.kernels import igemm

    monkeypatch.setattr(igemm, "SPACE_TO_DEPTH", blocks)
    x, weight, bias = make_case(2, 3, 38, 38, 64, 7, 7, 1, dtype)
    out = run_forced(pooled_stem_config(rows, dtype), lambda: pooled_stem(x, weight, bias))
    exp = F.max_pool2d(conv_expected(x, weight, bias, 2, 3, 1, 1, None, True), 3, 2, 1)
    assert out.shape == exp.shape
    assert_close(out, exp, rtol=TOL[dtype], atol=TOL[dtype] * exp.abs().max().item())


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_tf32_follows_cudnn_flag():
    x, weight, bias = make_case(4, 256, 14, 14, 256, 3, 3)
    exact = conv_expected(x, weight, bias, 1, 1, 1, 1, None, False)
    torch.backends.cudnn.allow_tf32 = False
    ieee = kernels.conv2d_bias_act(x, weight, bias, 1, 1)
    torch.backends.cudnn.allow_tf32 = True
    tf32 = kernels.conv2d_bias_act(x, weight, bias, 1, 1)
    err_ieee = (ieee.cpu().double() - exact).abs().max().item()
    err_tf32 = (tf32.cpu().double() - exact).abs().max().item()
    assert err_ieee < err_tf32, (err_ieee, err_tf32)


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter's schedule switch; on a GPU each config names it")
@pytest.mark.parametrize("rows", [1, 0], ids=["rows", "gathered"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [(3, 64, 7, 2, 3, 13), (3, 16, 3, 1, 1, 6), (4, 8, 5, 2, 0, 11), (8, 24, 3, 1, 2, 5)],
                         ids=lambda c: "C{}-K{}-k{}-s{}-p{}-hw{}".format(*c))
def test_few_channel_convs_in_both_schedules(case, dtype, rows, monkeypatch):
    # The stem's reduction over (r, s, c) in the direct plan (not space-to-depth): per filter row
    # over contiguous NHWC runs (ROWS, the weight packed by row_weight), or gathered element by
    # element; padding on every edge.
    from fused_resnet.kernels import igemm

    monkeypatch.setattr(igemm, "SPACE_TO_DEPTH", False)
    monkeypatch.setattr(igemm, "INTERPRETER_ROWS", rows)
    packed = results_of(monkeypatch, igemm, "row_weight")
    c, k, ksize, stride, padding, hw = case
    x, weight, bias = make_case(2, c, hw, hw, k, ksize, ksize, 1, dtype)
    p = (hw + 2 * padding - ksize) // stride + 1
    check(x, weight, bias, stride, padding, 1, 1, torch.randn(2, k, p, p).to(dtype), True)
    assert packed and packed[0].shape == weight.shape  # the row schedule applied and packed the weight
    torch.testing.assert_close(packed[0], weight, rtol=0, atol=0)  # the same values, laid out by rows


# Stride-2 few-channel convs (the stem's shape class), as (C, K, kernel, padding, hw): odd maps,
# even and odd filters, no padding.
SPACE_TO_DEPTH_CASES = [(3, 64, 7, 3, 13), (3, 16, 7, 3, 16), (3, 8, 3, 1, 9), (2, 8, 4, 1, 10), (3, 8, 5, 0, 11)]


@pytest.mark.parametrize("rows", [1, 0], ids=["rows", "gathered"])  # the interpreter's schedule (configs' on a GPU)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SPACE_TO_DEPTH_CASES, ids=lambda c: "C{}-K{}-k{}-p{}-hw{}".format(*c))
def test_space_to_depth_convs(case, dtype, rows, monkeypatch):
    # The stride-2 conv run as a stride-1 conv over 2x2 pixel blocks, with a residual in the epilogue.
    from fused_resnet.kernels import igemm

    monkeypatch.setattr(igemm, "SPACE_TO_DEPTH", True)
    monkeypatch.setattr(igemm, "INTERPRETER_ROWS", rows)
    blocked = results_of(monkeypatch, igemm, "space_to_depth")
    c, k, ksize, padding, hw = case
    x, weight, bias = make_case(2, c, hw, hw, k, ksize, ksize, 1, dtype)
    p = (hw + 2 * padding - ksize) // 2 + 1
    check(x, weight, bias, 2, padding, 1, 1, torch.randn(2, k, p, p, device=DEVICE).to(dtype), True)
    half = (ksize + 1) // 2
    assert blocked and blocked[0][2].shape == (k, 16, half, half)  # it ran as space-to-depth


def test_space_to_depth_is_the_same_conv_in_float64():
    # The rewrite itself, exactly: blocks of the padded input against the blocked filter, stride 1.
    from fused_resnet.kernels.igemm import space_to_depth

    for h, w, r, s, pads in [(32, 32, 7, 7, (3, 3, 3, 3)), (15, 17, 7, 7, (3, 3, 3, 3)), (10, 11, 4, 4, (1, 1, 1, 1)),
                             (12, 13, 5, 3, (0, 0, 2, 2)), (11, 10, 3, 5, (2, 1, 0, 2)), (7, 9, 2, 2, (0, 0, 0, 0))]:
        image = torch.randn(2, 3, h, w, dtype=torch.float64)
        # Any layout of the input: channels_last, NCHW, a view with a channel dropped.
        for x in (image.contiguous(memory_format=torch.channels_last), image,
                  torch.randn(2, 4, h, w, dtype=torch.float64)[:, 1:]):
            weight = torch.randn(5, 3, r, s, dtype=torch.float64)
            exp = F.conv2d(F.pad(x, (pads[2], pads[3], pads[0], pads[1])), weight, stride=2)
            to_blocks, like, blocked, padding = space_to_depth(x, weight, list(pads), exp.shape[2:])
            blocks = to_blocks(x)
            assert blocks.shape == like.shape and blocks.stride() == like.stride() and padding == [0, 0, 0, 0]
            assert blocks.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(F.conv2d(blocks, blocked), exp, rtol=0, atol=1e-12)


def test_space_to_depth_keeps_a_margin_of_zeros_around_its_blocks():
    # The pooled stem's taps in the pool's padding read windows up to `margin` blocks outside the
    # ones the outputs read, unmasked: they lie in the same copy, and read zeros.
    from fused_resnet.kernels.igemm import kernel_operands, space_to_depth

    x = torch.randn(2, 3, 30, 34, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(5, 3, 7, 7, dtype=torch.float64)
    exp = F.conv2d(F.pad(x, (3, 3, 3, 3)), weight, stride=2)
    plain = space_to_depth(x, weight, [3, 3, 3, 3], exp.shape[2:])[0](x)
    for margin in (1, 2):
        to_blocks, like, blocked, _ = space_to_depth(x, weight, [3, 3, 3, 3], exp.shape[2:], margin)
        blocks = to_blocks(x)
        assert blocks.shape == like.shape == plain.shape and blocks.stride() == like.stride()
        torch.testing.assert_close(F.conv2d(blocks, blocked), exp, rtol=0, atol=1e-12)
        # The copy around the view: the blocks, and `margin` rows and columns of zeros on each side.
        sn, _, sh, sw = blocks.stride()
        n, c, hb, wb = blocks.shape
        whole = blocks.as_strided((n, c, hb + 2 * margin, wb + 2 * margin), blocks.stride(),
                                  blocks.storage_offset() - margin * (sh + sw))
        assert torch.equal(whole, F.pad(plain, (margin,) * 4))
        assert blocks.untyped_storage().nbytes() == n * sn * blocks.element_size()
    # A conv without padding that is not a space-to-depth copy has no margin to read: the row
    # schedule, which reads unmasked where the conv is not padded, is then left out.
    small = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    w3 = torch.randn(8, 3, 3, 3)
    assert kernel_operands(small, w3, (1, 1), [0] * 4, (1, 1), 1, (14, 14))[-1]
    assert not kernel_operands(small, w3, (1, 1), [0] * 4, (1, 1), 1, (14, 14), margin=1)[-1]
    assert kernel_operands(small, w3, (1, 1), [1] * 4, (1, 1), 1, (16, 16), margin=1)[-1]


def test_space_to_depth_only_when_asked_and_for_strided_few_channel_convs(monkeypatch):
    from fused_resnet.kernels import igemm

    stem = torch.empty(64, 3, 7, 7)
    monkeypatch.setattr(igemm, "SPACE_TO_DEPTH", False)
    assert not igemm.space_to_depth_schedule(stem, (2, 2), (1, 1), 1)  # off unless SPACE_TO_DEPTH
    monkeypatch.setattr(igemm, "SPACE_TO_DEPTH", True)
    assert igemm.space_to_depth_schedule(stem, (2, 2), (1, 1), 1)
    assert not igemm.space_to_depth_schedule(stem, (1, 1), (1, 1), 1)  # stride 1: nothing to fold
    assert not igemm.space_to_depth_schedule(stem, (2, 1), (1, 1), 1)
    assert not igemm.space_to_depth_schedule(stem, (2, 2), (2, 2), 1)  # dilated
    assert not igemm.space_to_depth_schedule(torch.empty(64, 1, 7, 7), (2, 2), (1, 1), 3)  # grouped
    assert igemm.space_to_depth_schedule(torch.empty(64, 4, 7, 7), (2, 2), (1, 1), 1)
    assert not igemm.space_to_depth_schedule(torch.empty(64, 5, 7, 7), (2, 2), (1, 1), 1)  # 20 channels
    assert not igemm.space_to_depth_schedule(torch.empty(64, 3, 1, 1), (2, 2), (1, 1), 1)  # one tap


def test_row_schedule_only_for_dense_rows():
    from fused_resnet.kernels.igemm import row_schedule

    x, weight, _ = make_case(1, 3, 8, 8, 16, 7, 7, 1, torch.float32)
    assert row_schedule(x, weight, (1, 1), 1)
    assert not row_schedule(x.contiguous(), weight, (1, 1), 1)  # NCHW: channels strided
    assert not row_schedule(x, weight, (1, 2), 1)  # dilated along the row
    wide = make_case(1, 32, 8, 8, 16, 3, 3, 1, torch.float32)
    assert not row_schedule(wide[0], wide[1], (1, 1), 1)  # enough channels for the per-tap loop
    one = make_case(1, 3, 8, 8, 16, 1, 1, 1, torch.float32)
    assert not row_schedule(one[0], one[1], (1, 1), 1)  # a 1-wide filter row gains nothing
