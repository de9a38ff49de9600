"""Hardening: the kernel fuzzed against F.conv2d, offsets past 2**31, memory over many calls, threads.

The fuzzing profile is small by default so that CI stays quick; HYPOTHESIS_PROFILE=gpu runs many
more and larger cases (meant for a machine with a GPU, where the kernels run compiled).
"""

import gc
import os
import sys
import threading
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, HAS_CUDA, KERNEL_TOL, assert_close
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fused_resnet import FusedBottleneck, kernels
from fused_resnet.modules import FusedConv2d

settings.register_profile("ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("gpu", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

TOL = KERNEL_TOL
BIG = 2 if os.environ.get("HYPOTHESIS_PROFILE") == "gpu" else 1  # the gpu profile draws larger shapes


@st.composite
def conv_cases(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3, 4]))
    cg = draw(st.integers(1, 12 * BIG))
    kg = draw(st.integers(1, 10 * BIG))
    n = draw(st.integers(0, 3))
    h, w = draw(st.integers(1, 9 * BIG)), draw(st.integers(1, 9 * BIG))
    r, s = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = draw(st.one_of(st.just("same"), st.just("valid"), st.integers(0, 2),
                             st.tuples(st.integers(0, 2), st.integers(0, 2))))
    stride = (1, 1) if padding == "same" else (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    pad = (0, 0) if padding in ("same", "valid") else (padding if isinstance(padding, tuple) else (padding,) * 2)
    if padding != "same":
        assume(h + 2 * pad[0] >= dilation[0] * (r - 1) + 1 and w + 2 * pad[1] >= dilation[1] * (s - 1) + 1)
    return dict(
        n=n, c=cg * groups, k=kg * groups, h=h, w=w, r=r, s=s, groups=groups, stride=stride, padding=padding,
        dilation=dilation, dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])),
        layout=draw(st.sampled_from(["contiguous", "channels_last", "strided_view"])),
        bias=draw(st.booleans()), residual=draw(st.booleans()), relu=draw(st.booleans()),
    )


def make_input(n, c, h, w, dtype, layout):
    if layout == "strided_view":  # every other pixel of a larger map, H and W strides swapped
        return torch.randn(n, c, 2 * w, 2 * h, device=DEVICE).to(dtype)[:, :, ::2, ::2].transpose(2, 3)
    x = torch.randn(n, c, h, w, device=DEVICE).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _fuzz_operands(case):
    """Input, weight, bias and the float64 conv of them, for a drawn conv case."""
    dtype = case["dtype"]
    x = make_input(case["n"], case["c"], case["h"], case["w"], dtype, case["layout"])
    weight = (torch.randn(case["k"], case["c"] // case["groups"], case["r"], case["s"], device=DEVICE)
              / (case["c"] // case["groups"] * case["r"] * case["s"]) ** 0.5).to(dtype)
    bias = torch.randn(case["k"], device=DEVICE).to(dtype) if case["bias"] else None
    args = (case["stride"], case["padding"], case["dilation"], case["groups"])
    exp = F.conv2d(x.cpu().double(), weight.cpu().double(), None if bias is None else bias.cpu().double(), *args)
    return x, weight, bias, args, exp


@given(conv_cases())
def test_fuzz_against_conv2d_in_float64(case):
    dtype = case["dtype"]
    x, weight, bias, args, exp = _fuzz_operands(case)
    res = torch.randn(exp.shape, device=DEVICE).to(dtype) if case["residual"] else None
    if res is not None:
        exp = exp + res.cpu().double()
    if case["relu"]:
        exp = exp.relu()
    out = kernels.conv2d_bias_act(x, weight, bias, *args, residual=res, relu=case["relu"])
    assert out.dtype == dtype
    scale = max(1.0, exp.abs().max().item()) if exp.numel() else 1.0
    assert_close(out, exp, rtol=TOL[dtype], atol=TOL[dtype] * scale)


@given(conv_cases().filter(lambda c: c["groups"] == 1), st.integers(1, 12), st.integers(1, 3), st.booleans())
def test_fuzz_projection_shortcut_against_conv2d(case, cs, sc_stride, at_edge):
    dtype = case["dtype"]
    x, weight, bias, args, exp = _fuzz_operands(case)
    n, k, p, q = exp.shape
    # The shortcut's map: any size that a 1x1 conv with this stride maps onto the output's.
    hs, ws = ((p - 1) * sc_stride + 1, (q - 1) * sc_stride + 1) if at_edge else (p * sc_stride, q * sc_stride)
    shortcut_in = make_input(n, cs, hs, ws, dtype, case["layout"])
    shortcut_weight = (torch.randn(k, cs, 1, 1, device=DEVICE) / cs**0.5).to(dtype)
    exp = exp + F.conv2d(shortcut_in.cpu().double(), shortcut_weight.cpu().double(), None, sc_stride)
    if case["relu"]:
        exp = exp.relu()
    out = kernels.conv2d_bias_act(x, weight, bias, *args, residual=shortcut_in, relu=case["relu"],
                                  shortcut_weight=shortcut_weight, shortcut_stride=sc_stride)
    scale = max(1.0, exp.abs().max().item()) if exp.numel() else 1.0
    assert_close(out, exp, rtol=TOL[dtype], atol=TOL[dtype] * scale)


@given(conv_cases(), st.integers(1, 3), st.integers(1, 3), st.integers(0, 1))
def test_fuzz_conv_maxpool_against_torch(case, pool, pool_stride, pool_padding):
    assume(2 * pool_padding <= pool)
    dtype = case["dtype"]
    x, weight, bias, args, exp = _fuzz_operands(case)
    assume(exp.shape[2] + 2 * pool_padding >= pool and exp.shape[3] + 2 * pool_padding >= pool)
    if case["relu"]:
        exp = exp.relu()
    exp = F.max_pool2d(exp, pool, pool_stride, pool_padding)
    out = kernels.conv2d_bias_act_maxpool(x, weight, bias, *args, relu=case["relu"], pool_size=pool,
                                          pool_stride=pool_stride, pool_padding=pool_padding)
    scale = max(1.0, exp.abs().max().item()) if exp.numel() else 1.0
    assert_close(out, exp, rtol=TOL[dtype], atol=TOL[dtype] * scale)


def test_offsets_past_2_31_without_allocating_them():
    # Views whose elements lie more than 2**31 elements into their storage: a kernel that computed
    # offsets in 32 bits would wrap around and read or write the wrong place. torch.empty of 4 GB
    # reserves address space only; just the few pages the views touch are ever written.
    far = 2**31 + 4096
    storage = torch.empty(far + 4096, dtype=torch.float16, device=DEVICE)
    c, k = 16, 8
    # batch 2 with a batch stride of `far`: sample 1 sits past 2**31
    x = storage.as_strided((2, c, 3, 3), (far, 1, 3 * c, c))
    x.copy_(torch.randn(2, c, 3, 3))
    res_storage = torch.empty(far + 4096, dtype=torch.float16, device=DEVICE)
    res = res_storage.as_strided((2, k, 3, 3), (far, 1, 3 * k, k))
    res.copy_(torch.randn(2, k, 3, 3))
    weight = (torch.randn(k, c, 3, 3, device=DEVICE) / 12).half()
    out = kernels.conv2d_bias_act(x, weight, None, 1, 1, residual=res, relu=True)
    exp = torch.relu(F.conv2d(x.cpu().double(), weight.cpu().double(), None, 1, 1) + res.cpu().double())
    assert_close(out, exp, rtol=2e-3, atol=2e-3 * exp.abs().max().item())


def test_memory_does_not_grow_over_1000_calls():
    # A leak of even one small object per call (an output kept, a cache entry per call) leaves 1000
    # objects behind: counted as Python objects that the collector tracks, as blocks of Python's
    # allocator (which also sees untracked tuples and dict entries), and on a GPU as CUDA memory.
    # A 1x1 conv: the plan and launch path is every conv's, and interpreted it costs a quarter of a 3x3's.
    conv = torch.nn.Conv2d(16, 16, 1)
    bn = torch.nn.BatchNorm2d(16).eval()
    fused = FusedConv2d.from_conv_bn(conv, bn, relu=True).to(DEVICE)
    x = torch.randn(1, 16, 4, 4, device=DEVICE)
    res = torch.randn(1, 16, 4, 4, device=DEVICE)

    def used():
        gc.collect()
        cuda = torch.cuda.memory_allocated() if HAS_CUDA else 0
        return len(gc.get_objects()), sys.getallocatedblocks(), cuda

    with torch.no_grad():
        for _ in range(50):  # warm-up: caches, compiled kernels, allocator pools
            fused(x, residual=res)
        objects, blocks, cuda = used()
        for _ in range(1000):
            fused(x, residual=res)
        objects_after, blocks_after, cuda_after = used()
    assert objects_after - objects < 100, f"{objects_after - objects} more Python objects after 1000 calls"
    assert blocks_after - blocks < 500, f"{blocks_after - blocks} more allocator blocks after 1000 calls"
    assert cuda_after == cuda, f"CUDA memory grew by {cuda_after - cuda} bytes over 1000 calls"


def test_two_threads_give_the_same_answers_as_one():
    from conftest import randomize_bn
    from torchvision.models.resnet import Bottleneck

    block = FusedBottleneck.from_torchvision(randomize_bn(Bottleneck(32, 8)).eval()).to(DEVICE)
    inputs = [torch.randn(1, 32, 5, 5, device=DEVICE) for _ in range(4)]
    with torch.no_grad():
        single = [block(x) for x in inputs]
    results = {}
    errors = []

    def worker(tid):
        try:
            with torch.no_grad():
                results[tid] = [block(x) for x in inputs for _ in range(2)][::2]
        except Exception as err:  # surfaced by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for tid in range(2):
        for got, want in zip(results[tid], single):
            assert torch.equal(got, want)


def test_an_interpreter_that_cannot_run_the_kernels_says_so(monkeypatch):
    import numpy
    import triton
    from fused_resnet.kernels import backend

    check = backend.check_interpreter.__wrapped__  # uncached
    for triton_version, numpy_version, fails in [("3.6.0", "2.4.6", True), ("3.6.1+git4f2a", "2.5.0rc1", True),
                                                 ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.6", False),
                                                 ("3.10.0", "2.4.0", False), ("2.3.1", "1.26.4", False)]:
        monkeypatch.setattr(triton, "__version__", triton_version)
        monkeypatch.setattr(numpy, "__version__", numpy_version)
        if fails:
            try:
                check()
            except RuntimeError as err:
                assert f"triton {triton_version}" in str(err) and "numpy<2.4" in str(err)
            else:
                raise AssertionError(f"triton {triton_version} with numpy {numpy_version} passed the check")
        else:
            check()


def test_the_interpreters_bounds_check_catches_an_access_past_a_tensor():
    # Every interpreted kernel in these tests runs bounds-checked (conftest): an access outside the
    # tensors a launch was given fails, as an illegal address would on a GPU. A kernel that reads and
    # writes 28 elements past 100-element tensors, unmasked, is caught; masked, it runs.
    if HAS_CUDA:
        pytest.skip("the interpreter's check; a GPU faults instead")
    import triton
    import triton.language as tl
    from fused_resnet.kernels import backend

    @triton.jit
    def copy(x_ptr, y_ptr, n, MASKED: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        if MASKED:
            tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)
        else:
            tl.store(y_ptr + offs, tl.load(x_ptr + offs))

    x, y = torch.randn(100), torch.empty(100)
    assert backend._bounds is None  # (set while a launch runs)
    copy[(4,)](x, y, 100, MASKED=True, BLOCK=32)
    assert torch.equal(x, y)
    with pytest.raises(Exception, match=r"OutOfBounds.*copy: 28 of 32 addresses outside its tensors, the first "
                                        r"\+400 bytes from the start of a tensor's storage of 400 bytes"):
        copy[(4,)](x, y, 100, MASKED=False, BLOCK=32)
    # A view may read the rest of its storage (a packed weight does): that memory is allocated.
    wide = torch.randn(256)
    copy[(4,)](wide[:100], torch.empty(128), 100, MASKED=False, BLOCK=32)


def test_a_bounds_check_inside_another_checks_each_access_once_and_leaves_the_outer_one_on():
    # The sweep's --every-config opens its own check; inside a test's (conftest) it must neither wrap
    # the interpreter twice nor, on leaving, switch the test's check off.
    if HAS_CUDA or os.environ.get("FUSED_RESNET_NO_BOUNDS_CHECK"):
        pytest.skip("the interpreter's check, on in every test here (conftest); a GPU faults instead")
    import triton
    import triton.language as tl
    from fused_resnet.kernels import backend
    from triton.runtime import interpreter

    @triton.jit
    def read_past(x_ptr, y_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs))

    x, calls = torch.randn(8), []
    checked_load = interpreter.InterpreterBuilder.create_masked_load  # as the test's check wraps it
    with mock.patch.object(backend, "_check_bounds", side_effect=lambda *a: calls.append(a)), \
            backend.bounds_checked():
        assert interpreter.InterpreterBuilder.create_masked_load is checked_load
        read_past[(1,)](x, torch.empty(8), BLOCK=8)
    assert len(calls) == 2  # one load and one store, each checked once
    with pytest.raises(Exception, match="OutOfBounds.*read_past"):
        read_past[(1,)](x, torch.empty(16), BLOCK=16)


def test_interpreted_loads_and_stores_get_bool_masks():
    # Triton's interpreter gives a scalar comparison its operands' dtype, so `block_mask & (i < n)`
    # comes out as int32 ones and zeros, which triton 3.9's native loads and stores refuse.
    # backend.bool_masks, in force for every interpreted launch of the kernels, hands them bool.
    if HAS_CUDA:
        pytest.skip("the interpreter's masks; compiled kernels' are bool")
    import numpy
    import triton
    import triton.language as tl
    from fused_resnet.kernels import backend
    from triton.runtime import interpreter

    builder, seen = interpreter.InterpreterBuilder, []
    load, store = builder.create_masked_load, builder.create_masked_store

    def record_load(self, ptrs, mask, *rest, **kwargs):
        seen.append(mask.data.dtype)
        return load(self, ptrs, mask, *rest, **kwargs)

    def record_store(self, ptrs, value, mask, *rest, **kwargs):
        seen.append(mask.data.dtype)
        return store(self, ptrs, value, mask, *rest, **kwargs)

    @triton.jit
    def row_sums(x_ptr, y_ptr, n, rows, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK,), tl.float32)
        for i in range(0, rows + 1):  # one row past the end, masked off by the scalar condition
            acc += tl.load(x_ptr + i * n + offs, mask=(offs < n) & (i < rows), other=0.0)
        tl.store(y_ptr + offs, acc, mask=(offs < n) & (rows > 0))

    x, y = torch.randn(3, 8), torch.empty(8)
    with mock.patch.object(builder, "create_masked_load", record_load), \
            mock.patch.object(builder, "create_masked_store", record_store):
        backend.bool_masks()
        row_sums[(1,)](x, y, 8, 3, BLOCK=8)
    assert len(seen) == 5 and all(dtype == numpy.dtype(bool) for dtype in seen), seen
    torch.testing.assert_close(y, x.sum(0))
