"""Launch plans: the fused layers' eager fast path against the registered ops, and what must
invalidate a plan (a new shape, dtype, layout or backend; a layer moved, cast or given new weights).

The Triton cases run interpreted without a GPU, so their maps stay small.
"""

import copy
import io
import json
import pickle
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, H100_LAUNCHES, randomize_bn, run_compiling, traced
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torchvision.models.resnet import Bottleneck

from fused_resnet import (
    FusedAvgPoolLinear,
    FusedBottleneck,
    FusedChain1x1,
    FusedConv2d,
    FusedConv2dMaxPool,
    FusedConvChain1x1,
    kernels,
)


def conv_layer(relu=True, shortcut=False):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, padding=1)
    bn = randomize_bn(nn.Sequential(nn.BatchNorm2d(8)))[0].eval()
    layer = FusedConv2d.from_conv_bn(conv, bn, relu=relu)
    if shortcut:
        return FusedConv2d(layer.weight, layer.bias, 1, 1, relu=True, shortcut_weight=torch.randn(8, 4, 1, 1) / 2,
                           shortcut_stride=2)
    return layer


def op_of(layer, x, residual=None):
    """What the registered op computes for the layer: the path taken under tracing."""
    if isinstance(layer, FusedConv2dMaxPool):
        return kernels.conv2d_bias_act_maxpool(x, **layer._op_args())
    if isinstance(layer, FusedAvgPoolLinear):
        return kernels.avgpool_linear(x, layer.weight, layer.bias)
    if isinstance(layer, FusedConvChain1x1):
        return kernels.conv_chain_1x1(x, layer.head_weight, layer.head_bias, layer.weight, layer.bias, residual,
                                      layer.next_weight, layer.next_bias, stride=layer.stride, padding=layer.padding,
                                      shortcut_weight=layer.shortcut_weight, shortcut_stride=layer.shortcut_stride)
    if isinstance(layer, FusedChain1x1):
        return kernels.chain_1x1(x, layer.weight, layer.bias, residual, layer.next_weight, layer.next_bias,
                                 shortcut_weight=layer.shortcut_weight, shortcut_stride=layer.shortcut_stride)
    return kernels.conv2d_bias_act(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation,
                                   layer.groups, residual=residual, relu=layer.relu,
                                   shortcut_weight=layer.shortcut_weight, shortcut_stride=layer.shortcut_stride)


def layers():
    stem_conv, stem_bn = nn.Conv2d(3, 16, 7, 2, 3), randomize_bn(nn.Sequential(nn.BatchNorm2d(16)))[0].eval()
    return {
        "conv": (conv_layer(), lambda: (torch.randn(2, 16, 5, 6), None)),
        "conv_residual": (conv_layer(), lambda: (torch.randn(2, 16, 5, 6), torch.randn(2, 8, 5, 6))),
        "conv_shortcut": (conv_layer(shortcut=True), lambda: (torch.randn(2, 16, 5, 6), torch.randn(2, 4, 10, 12))),
        "stem": (FusedConv2dMaxPool.from_modules(stem_conv, stem_bn, nn.MaxPool2d(3, 2, 1)),
                 lambda: (torch.randn(2, 3, 17, 15), None)),
        "head": (FusedAvgPoolLinear.from_linear(nn.Linear(16, 10)), lambda: (torch.randn(3, 16, 3, 2), None)),
        # 16 -> 8 (+ residual) -> 12, 1x1 convs; the same led by a 3x3 conv of stride 2 (+ a projection shortcut)
        "chain": (FusedChain1x1(torch.randn(8, 16, 1, 1) / 4, torch.randn(8), torch.randn(12, 8, 1, 1) / 3,
                                torch.randn(12)), lambda: (torch.randn(2, 16, 5, 6), torch.randn(2, 8, 5, 6))),
        "chain3x3": (FusedConvChain1x1(torch.randn(16, 4, 3, 3) / 6, torch.randn(16), torch.randn(8, 16, 1, 1) / 4,
                                       torch.randn(8), torch.randn(12, 8, 1, 1) / 3, None, torch.randn(8, 4, 1, 1) / 2,
                                       2, stride=2, padding=1),
                     lambda: (torch.randn(2, 4, 9, 10), torch.randn(2, 4, 9, 10))),
    }


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("name", ["conv", "conv_residual", "conv_shortcut", "stem", "head", "chain", "chain3x3"])
def test_plan_and_op_compute_the_same(name, backend):
    layer, make = layers()[name]
    layer = layer.to(DEVICE)
    with kernels.use_backend(backend), torch.no_grad():
        for _ in range(2):  # the second call runs the plan the first one built
            x, residual = make()
            x = x.to(DEVICE).contiguous(memory_format=torch.channels_last)
            residual = None if residual is None else residual.to(DEVICE)
            args = (x,) if residual is None else (x, residual)
            fast, op = layer(*args), op_of(layer, x, residual)
            assert len(layer._plans) == 1
            for got, expected in zip(*((out,) if isinstance(out, torch.Tensor) else out for out in (fast, op))):
                assert torch.equal(got, expected), name


def test_a_new_signature_builds_a_new_plan():
    layer = conv_layer()
    with kernels.use_backend("reference"), torch.no_grad():
        x = torch.randn(2, 16, 5, 6)
        layer(x)
        layer(x.clone())
        assert len(layer._plans) == 1
        layer(torch.randn(3, 16, 5, 6))  # shape
        layer(x.contiguous(memory_format=torch.channels_last))  # strides
        layer(x, torch.randn(2, 8, 5, 6))  # a residual
        assert len(layer._plans) == 4
        x_odd = torch.randn(2, 16, 7, 3)
        torch.testing.assert_close(layer(x_odd), op_of(layer, x_odd), rtol=0, atol=0)


def test_switching_backends_takes_effect():
    layer = conv_layer()
    x = torch.randn(1, 16, 4, 4)

    def ops(backend):
        with kernels.use_backend(backend), torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            out = layer(x)
        return out, {e.key for e in prof.key_averages()}

    ref, ref_ops = ops("reference")
    tri, tri_ops = ops("triton")
    again, again_ops = ops("reference")
    assert "aten::conv2d" in ref_ops and "aten::conv2d" in again_ops
    assert "aten::conv2d" not in tri_ops and "fused_resnet::conv2d_bias_act" in tri_ops
    torch.testing.assert_close(tri, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(again, ref) and len(layer._plans) == 2


def test_a_cast_or_moved_layer_never_runs_a_stale_plan():
    layer = conv_layer()
    x = torch.randn(2, 16, 5, 6)
    with kernels.use_backend("reference"), torch.no_grad():
        first = layer(x)
        layer.double()  # new buffers: the old plan held the float32 weights
        assert layer._plans == {}
        with pytest.raises(TypeError, match="input is torch.float32 but the module's weights are torch.float64"):
            layer(x)
        layer.float()
        torch.testing.assert_close(layer(x), first, rtol=1e-6, atol=1e-6)
        layer.weight = layer.weight * 2  # a new weight tensor: the plan must not keep the old one
        assert torch.allclose(layer(x), op_of(layer, x))
        assert not torch.allclose(layer(x), first)


def test_a_chain_given_a_new_head_or_moved_never_runs_a_stale_plan():
    layer, make = layers()["chain3x3"]
    x, residual = make()
    with kernels.use_backend("reference"), torch.no_grad():
        y, z = layer(x, residual)
        layer.head_weight = layer.head_weight * 2  # the 3x3's weight, held by the plan
        y2, z2 = layer(x, residual)
        assert not torch.allclose(y2, y)
        for got, expected in zip((y2, z2), op_of(layer, x, residual)):
            assert torch.equal(got, expected)
        layer.double()
        assert layer._plans == {}
        assert layer(x.double(), residual.double())[0].dtype == torch.float64


def test_copies_and_pickles_start_without_plans():
    layer = conv_layer()
    x = torch.randn(2, 16, 5, 6)
    with kernels.use_backend("reference"), torch.no_grad():
        layer(x)
        twin = copy.deepcopy(layer)
        assert twin._plans == {}
        twin.weight.mul_(-1)  # in place, on the copy's own tensor
        assert not torch.allclose(twin(x), layer(x))
        buffer = io.BytesIO()
        torch.save(layer, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert torch.equal(loaded(x), layer(x))
        assert pickle.loads(pickle.dumps(layer))._plans == {}


def grouped_layer():
    return FusedConv2d.from_conv_bn(nn.Conv2d(16, 16, 3, padding=1, groups=4), None, relu=True)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("name", ["conv", "stem", "grouped", "head", "chain3x3"])
def test_load_state_dict_reaches_the_plans(name, backend):
    # Some plans hold copies of the weights laid out for the kernel (the stem's filter rows or
    # 2x2 blocks, a grouped conv's groups bundled into one): new weights loaded in place must
    # reach those too.
    if name == "grouped":
        torch.manual_seed(0)
        layer, other, make = grouped_layer(), grouped_layer(), lambda: (torch.randn(2, 16, 5, 6), None)
    else:
        (layer, make), (other, _) = layers()[name], layers()[name]
    with torch.no_grad():
        for t in other.buffers():
            t.normal_()
    layer, other = layer.to(DEVICE), other.to(DEVICE)
    x, residual = make()
    x = x.to(DEVICE).contiguous(memory_format=torch.channels_last)
    args = (x,) if residual is None else (x, residual.to(DEVICE))
    with kernels.use_backend(backend), torch.no_grad():
        before = layer(*args)
        layer.load_state_dict(other.state_dict())  # copied in place into the tensors the plan holds
        for got, expected, old in zip(*((out,) if isinstance(out, torch.Tensor) else out
                                        for out in (layer(*args), other(*args), before))):
            assert torch.equal(got, expected), name
            assert not torch.allclose(got, old), name


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("name", ["conv_shortcut", "stem", "head", "chain3x3"])
def test_a_functionalized_layer_runs_the_registered_op(name, backend):
    # torch.func.functionalize hands the layer tensors of the plain Tensor type that wrap its
    # inputs, without an address a kernel could read: the layer calls the op, as under tracing.
    layer, make = layers()[name]
    layer = layer.to(DEVICE)
    x, residual = make()
    x = x.to(DEVICE).contiguous(memory_format=torch.channels_last)
    args = (x,) if residual is None else (x, residual.to(DEVICE))
    with kernels.use_backend(backend), torch.no_grad():
        eager = layer(*args)
        functionalized = torch.func.functionalize(layer)(*args)
    for got, expected in zip(*((out,) if isinstance(out, torch.Tensor) else out for out in (functionalized, eager))):
        assert torch.equal(got, expected), name


def test_what_drops_a_plan_is_counted_for_cuda_graphs():
    # CUDAGraphModule captures again when the count moves: its graphs replay the dropped plans' launches.
    from fused_resnet.modules import PlannedLayer

    layer, other = conv_layer(), conv_layer()
    x = torch.randn(2, 16, 5, 6)
    with kernels.use_backend("reference"), torch.no_grad():
        counts = [PlannedLayer.plans_dropped]
        layer(x)
        layer(torch.randn(3, 16, 5, 6))  # a new signature: a plan more, none dropped
        counts.append(PlannedLayer.plans_dropped)
        layer.load_state_dict(other.state_dict())
        counts.append(PlannedLayer.plans_dropped)
        layer.weight = layer.weight * 2
        counts.append(PlannedLayer.plans_dropped)
        layer.double()
        counts.append(PlannedLayer.plans_dropped)
    assert counts[1] == counts[0] and counts[0] < counts[2] < counts[3] < counts[4]


def test_the_fast_path_keeps_every_check():
    layer = conv_layer()
    x = torch.randn(2, 16, 5, 6)
    with kernels.use_backend("reference"):
        with torch.no_grad():
            layer(x)
        with pytest.raises(RuntimeError, match="does not compute gradients"):
            layer(x.clone().requires_grad_())
        with pytest.raises(ValueError, match="expected an input with 16 channels"):
            layer(torch.randn(2, 15, 5, 6))
        with pytest.raises(TypeError, match="input is torch.float16"):
            layer(x.half())
        with pytest.raises(ValueError, match="residual must have the output's shape"):
            layer(x, torch.randn(2, 8, 4, 6))


# ---- torch.autocast ---------------------------------------------------------------------------


def autocast():
    """Autocast to bfloat16 on the tests' device (its dtype is a kernel dtype there and here)."""
    return torch.autocast(DEVICE.type, dtype=torch.bfloat16)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("name", ["conv", "conv_shortcut", "stem", "head", "chain", "chain3x3"])
def test_under_autocast_a_layer_computes_as_its_bfloat16_copy(name, backend):
    # As torchvision's convs under autocast: the same layer cast to bfloat16, on operands in it,
    # whichever path runs (the plan, or the registered op under tracing).
    layer, make = layers()[name]
    layer = layer.to(DEVICE)
    cast = copy.deepcopy(layer).to(torch.bfloat16)
    with kernels.use_backend(backend), torch.no_grad():
        for _ in range(2):  # the second call runs the plan the first one built
            x, residual = make()
            x = x.to(DEVICE).contiguous(memory_format=torch.channels_last)
            args = (x,) if residual is None else (x, residual.to(DEVICE))
            with autocast():
                outs = layer(*args), op_of(layer, *args)
            expected = cast(*(a.to(torch.bfloat16) for a in args))
            for fast, op, want in zip(*((out,) if isinstance(out, torch.Tensor) else out
                                        for out in (*outs, expected))):
                assert fast.dtype == torch.bfloat16 and op.dtype == torch.bfloat16, name
                assert torch.equal(fast, want) and torch.equal(op, want), name
        assert len(layer._plans) == 1


def test_autocast_on_and_off_never_share_a_plan_or_a_stale_cast():
    layer, other = conv_layer(), conv_layer()
    with torch.no_grad():
        other.weight.normal_()
    x = torch.randn(2, 16, 5, 6)
    with kernels.use_backend("reference"), torch.no_grad():
        plain = layer(x)
        with autocast():
            low = layer(x)
        assert plain.dtype == torch.float32 and low.dtype == torch.bfloat16
        assert torch.equal(layer(x), plain) and len(layer._plans) == 2
        layer.load_state_dict(other.state_dict())  # the bfloat16 copy of the old weights must go too
        with autocast():
            assert torch.equal(layer(x), other.to(torch.bfloat16)(x.to(torch.bfloat16)))


def test_autocast_leaves_float64_as_it_is():
    layer = conv_layer().double()
    x = torch.randn(2, 16, 5, 6, dtype=torch.float64)
    with kernels.use_backend("reference"), torch.no_grad():
        plain = layer(x)
        with autocast():
            assert torch.equal(layer(x), plain)
            assert torch.equal(op_of(layer, x), plain)


# ---- TF32 settings ----------------------------------------------------------------------------

NEW_TF32_API = hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends, "fp32_precision")


@pytest.fixture
def tf32_settings():
    """PyTorch's TF32 settings, put back as they were after the test (the generic one first: setting
    a parent may pass its value to children that have none)."""
    if not NEW_TF32_API:
        saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        yield
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
        return
    places = [torch.backends, torch.backends.cudnn, torch.backends.cudnn.conv, torch.backends.cudnn.rnn,
              torch.backends.cuda.matmul]
    saved = [place.fp32_precision for place in places]
    yield
    for place, value in zip(places, saved):
        place.fp32_precision = value


def test_tf32_follows_pytorchs_settings(tf32_settings):
    from fused_resnet.kernels.backend import tf32_allowed

    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = False, True
    assert (tf32_allowed("conv"), tf32_allowed("matmul")) == (False, True)
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False
    assert (tf32_allowed("conv"), tf32_allowed("matmul")) == (True, False)
    if not NEW_TF32_API:
        return
    # The newer API: convs set apart from RNNs, where torch's legacy getter refuses to answer (2.14
    # raises that the flags were set through both APIs).
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    assert not tf32_allowed("conv")
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    assert tf32_allowed("conv")
    torch.backends.cudnn.conv.fp32_precision = "none"  # no setting of its own: its backend's, else the generic one
    torch.backends.cudnn.fp32_precision = "none"
    torch.backends.fp32_precision = "tf32"
    assert tf32_allowed("conv")
    torch.backends.fp32_precision = "ieee"
    assert not tf32_allowed("conv")


def test_a_plan_follows_the_tf32_settings(tf32_settings):
    # A plan binds its dots' precision: turning TF32 off after a first call must reach the next.
    # (Planned for an H100 here; the interpreter computes in IEEE whatever the settings.)
    from fused_resnet.kernels import precompile

    conv = conv_layer()
    head = FusedAvgPoolLinear.from_linear(nn.Linear(16, 10))
    x = torch.randn(2, 16, 5, 6).contiguous(memory_format=torch.channels_last)
    precisions = []
    for conv_tf32, matmul_tf32 in ((True, True), (False, True), (True, False)):
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv_tf32, matmul_tf32
        with precompile.compile_only("H100") as jobs:
            conv(x)
            head(x)
        precisions.append({job.op: job.kwargs["INPUT_PRECISION"] for job in jobs})
    assert precisions == [{"conv2d_bias_act": "tf32", "avgpool_linear": "tf32"},
                          {"conv2d_bias_act": "ieee", "avgpool_linear": "tf32"},
                          {"conv2d_bias_act": "tf32", "avgpool_linear": "ieee"}]
    with precompile.compile_only("H100"):
        conv(x.clone())  # the same settings again: no new plan
        head(x.clone())
    assert len(conv._plans) == 2 and len(head._plans) == 2  # each follows its own setting alone


def test_plans_are_bounded():
    from fused_resnet.modules import MAX_PLANS

    layer = conv_layer()
    with kernels.use_backend("reference"), torch.no_grad():
        for h in range(3, 3 + MAX_PLANS + 5):
            layer(torch.randn(1, 16, h, 4))
    assert len(layer._plans) == MAX_PLANS


def test_a_block_traced_by_torch_compile_calls_the_registered_ops():
    block = FusedBottleneck.from_torchvision(randomize_bn(Bottleneck(32, 8)).eval())
    x = torch.randn(2, 32, 6, 6)
    with torch.no_grad():
        eager = block(x)
        out, nodes = traced(block, x)
    targets = [str(n.target) for n in nodes]
    assert targets.count("fused_resnet.conv2d_bias_act") == 3, targets
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


def test_torch_export_keeps_one_registered_op_per_fused_layer():
    block = FusedBottleneck.from_torchvision(randomize_bn(Bottleneck(32, 8)).eval())
    x = torch.randn(2, 32, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        exported = torch.export.export(block, (x,))
        targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
        assert targets == ["fused_resnet.conv2d_bias_act.default"] * 3, targets
        torch.testing.assert_close(exported.module()(x), block(x), rtol=1e-5, atol=1e-5)


def test_switching_backends_under_torch_compile_takes_effect():
    # The backend reaches the op as an argument read by the traced wrapper: a switch recompiles.
    layer = conv_layer()
    x = torch.randn(1, 16, 4, 4)
    graphs, calls = [], []

    def record(gm, example_inputs):
        graphs.append(gm)
        backend = next(n for n in gm.graph.nodes if "conv2d_bias_act" in str(n.target)).args[-1]

        def run(*args):
            calls.append(backend)
            return gm.forward(*args)

        return run

    compiled = torch.compile(layer, backend=record, fullgraph=True)
    with torch.no_grad():
        for name in ("reference", "cudnn", "reference"):
            with kernels.use_backend(name):
                compiled(x)
    assert calls == ["reference", "cudnn", "reference"] and len(graphs) == 2


def test_cudnn_backend_on_cpu_runs_the_reference():
    layer = conv_layer()
    x = torch.randn(2, 16, 5, 6)
    with torch.no_grad():
        with kernels.use_backend("cudnn"):
            got = layer(x)
        expected = F.relu(F.conv2d(x, layer.weight, layer.bias, 1, 1))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ---- CUDA graphs ------------------------------------------------------------------------------


def test_cuda_graph_module_runs_the_module_on_a_cpu():
    from conftest import HAS_CUDA

    from fused_resnet import CUDAGraphModule, fuse
    from fused_resnet.validate import synthetic_batchnorm

    if HAS_CUDA:
        pytest.skip("the CPU fallback: CUDA tensors are captured (test_cuda_graph_replays_the_fused_model)")
    import torchvision

    model = synthetic_batchnorm(torchvision.models.resnet18(num_classes=10), size=32)
    graphed = fuse(model, cuda_graph=True)
    assert isinstance(graphed, CUDAGraphModule) and graphed.copy_output
    x = torch.randn(2, 3, 32, 32)
    with kernels.use_backend("reference"):
        out = graphed(x)
        assert torch.equal(out, fuse(model)(x))
    assert graphed._graphs == {}  # nothing captured on a CPU
    with pytest.raises(ValueError, match="warmup and max_graphs must be at least 1"):
        CUDAGraphModule(model, warmup=0)


@pytest.mark.gpu
def test_cuda_graph_replays_the_fused_model(monkeypatch):
    import torchvision
    from conftest import results_of

    from fused_resnet import CUDAGraphModule, fuse, modules
    from fused_resnet.validate import synthetic_batchnorm

    warmed = results_of(monkeypatch, modules, "warmup")
    model = synthetic_batchnorm(torchvision.models.resnet18(num_classes=10), size=32)
    fused = fuse(model, dtype=torch.float16).cuda()
    graphed = CUDAGraphModule(fused)
    shared = CUDAGraphModule(fused, copy_output=False)
    x1, x2 = (torch.randn(4, 3, 64, 64, device="cuda", dtype=torch.float16) for _ in range(2))
    with torch.no_grad():
        out1 = graphed(x1)  # compiled in parallel (fused_resnet.warmup), then captured
        out2 = graphed(x2)
        assert len(graphed._graphs) == 1 and len(warmed) == 1  # one signature, one warm-up, one graph
        expected1, expected2 = fused(x1), fused(x2)
        torch.testing.assert_close(out1, expected1, rtol=0, atol=0)  # the copy survived the second call
        torch.testing.assert_close(out2, expected2, rtol=0, atol=0)
        first = shared(x1)
        shared(x2)
        torch.testing.assert_close(first, expected2, rtol=0, atol=0)  # the static buffer was overwritten
        graphed(torch.randn(2, 3, 64, 64, device="cuda", dtype=torch.float16))
        assert len(graphed._graphs) == 2 and len(graphed._streams) == 1  # one warm-up stream for both
        # New weights, loaded in place: the stem's plan held its filter laid out for the kernel.
        other = fuse(synthetic_batchnorm(torchvision.models.resnet18(num_classes=10), size=32),
                     dtype=torch.float16).cuda()
        fused.load_state_dict(other.state_dict())
        torch.testing.assert_close(graphed(x1), other(x1), rtol=0, atol=0)
        assert len(graphed._graphs) == 1  # captured again
        twin = pickle.loads(pickle.dumps(graphed))  # graphs, pool and streams stay with the original
        assert twin._graphs == {} and twin._streams == {} and twin._pool is None


@pytest.mark.gpu
def test_autocast_and_tf32_settings_reach_the_compiled_kernels(tf32_settings):
    from fused_resnet import CUDAGraphModule

    layer = conv_layer().cuda()  # 16 -> 8 channels, 3x3
    x = torch.randn(4, 16, 20, 20, device="cuda").contiguous(memory_format=torch.channels_last)
    exact = F.conv2d(x.double(), layer.weight.double(), layer.bias.double(), padding=1).relu()

    def error(y):
        return ((y.double() - exact).abs().max() / exact.abs().max()).item()

    graphed = CUDAGraphModule(layer)
    with torch.no_grad():
        torch.backends.cudnn.allow_tf32 = True
        tf32, tf32_graphed = layer(x), graphed(x)
        torch.backends.cudnn.allow_tf32 = False
        ieee, ieee_graphed = layer(x), graphed(x)
        with autocast():
            low, low_graphed = layer(x), graphed(x)
        cast = copy.deepcopy(layer).to(torch.bfloat16)(x.to(torch.bfloat16))
    assert error(ieee) < 1e-5 < error(tf32), (error(ieee), error(tf32))  # TF32 keeps 10 bits of mantissa
    assert torch.equal(tf32_graphed, tf32) and torch.equal(ieee_graphed, ieee)
    assert low.dtype == low_graphed.dtype == torch.bfloat16
    assert torch.equal(low, cast) and torch.equal(low_graphed, cast)
    assert len(graphed._graphs) == 3


class _FakeCompiled:
    """Stands in for Triton's compiled kernel: compiled[grid](*args) records the launch."""

    def __init__(self, launches, fail=False):
        self.launches, self.fail = launches, fail

    def __getitem__(self, grid):
        def run(*args):
            if self.fail:
                raise TypeError("function takes exactly 3 arguments")
            self.launches.append(("direct", grid, args))
        return run


class _FakeKernel:
    """Stands in for a @triton.jit function: kernel[grid](*tensors, **kwargs) records the launch and
    returns the compiled kernel, as JITFunction.run does."""

    arg_names = ["x_ptr", "y_ptr", "n", "BLOCK"]

    def __init__(self, fail=False):
        self.launches = []
        self.compiled = _FakeCompiled(self.launches, fail)

    def __getitem__(self, grid):
        def run(*tensors, **kwargs):
            self.launches.append(("plain", grid, tensors, kwargs))
            return self.compiled
        return run


def test_a_compiled_launch_goes_direct_once_the_kernel_is_known(monkeypatch):
    # The argument bookkeeping of direct launches, on a stand-in kernel (the real one needs a GPU):
    # every argument in the kernel's order, the grid in three dimensions, and the plain launch
    # again wherever the tensors' alignment differs from what the kernel was compiled for.
    from fused_resnet.kernels import backend

    kernel = _FakeKernel()
    launch = backend.KernelLaunch(kernel, lambda meta: (4,), {"n": 7}, on_cuda=True,
                                  config={"BLOCK": 32, "num_warps": 4})
    x, y = torch.zeros(64), torch.zeros(64)
    launch(x, y)
    launch(x, y)
    launch(x[1:], y)  # 4 bytes off: not 16-byte aligned
    launch(x, y)
    kinds = [entry[0] for entry in kernel.launches]
    assert kinds == ["plain", "direct", "plain", "direct"]
    assert kernel.launches[0][3] == {"n": 7, "BLOCK": 32, "num_warps": 4}
    _, grid, args = kernel.launches[1]
    assert grid == (4, 1, 1) and args[:2] == (x, y) and args[2:] == (7, 32)

    monkeypatch.setattr(backend, "DIRECT_LAUNCH", False)
    plain = _FakeKernel()
    launch = backend.KernelLaunch(plain, lambda meta: (4,), {"n": 7}, on_cuda=True, config={"BLOCK": 32})
    for _ in range(3):
        launch(x, y)
    assert [entry[0] for entry in plain.launches] == ["plain"] * 3


class _OnGPU:
    """Stands in for a tensor on GPU `index`, 16-byte aligned."""

    def __init__(self, index):
        self.index = index

    def get_device(self):
        return self.index

    def data_ptr(self):
        return 0


def test_a_launch_runs_on_its_tensors_gpu(monkeypatch):
    # Triton launches on the current GPU: a launch whose tensors are on another makes theirs
    # current for the launch (plain and direct alike), and one on the current GPU changes nothing.
    import contextlib

    from fused_resnet.kernels import backend

    current, entered = [0], []

    @contextlib.contextmanager
    def device(index):
        entered.append(index)
        current.insert(0, index)
        yield
        current.pop(0)

    class OnWhichGPU(list):  # records each launch's kind with the GPU current when it ran
        def append(self, entry):
            super().append((entry[0], current[0]))

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", device)
    kernel = _FakeKernel()
    kernel.launches = kernel.compiled.launches = OnWhichGPU()
    launch = backend.KernelLaunch(kernel, lambda meta: (4,), {"n": 7}, on_cuda=True, config={"BLOCK": 32})
    on_1, on_0 = (_OnGPU(1), _OnGPU(1)), (_OnGPU(0), _OnGPU(0))
    launch(*on_1)
    launch(*on_1)
    launch(*on_0)
    assert kernel.launches == [("plain", 1), ("direct", 1), ("direct", 0)] and entered == [1, 1]


def test_a_compiled_kernel_that_refuses_direct_arguments_gets_plain_launches():
    from fused_resnet.kernels import backend

    kernel = _FakeKernel(fail=True)
    launch = backend.KernelLaunch(kernel, lambda meta: (4, 2), {"n": 7}, on_cuda=True, config={"BLOCK": 32})
    x, y = torch.zeros(64), torch.zeros(64)
    for _ in range(3):
        launch(x, y)
    assert [entry[0] for entry in kernel.launches] == ["plain"] * 3
    assert launch.direct is False


DIRECT_SCRIPT = H100_LAUNCHES + textwrap.dedent("""
    import json
    import triton

    driver = StandInDriver()
    triton.runtime.driver.set_active(driver)

    def same(a, b):
        if isinstance(a, torch.Tensor):  # scratch comes anew each launch: alike, not the same
            return isinstance(b, torch.Tensor) and (a.shape, a.dtype, a.stride()) == (b.shape, b.dtype, b.stride())
        if type(a).__name__ == "LazyDict":  # the launch hooks' metadata, made each launch
            return type(b) is type(a) and a.data == b.data
        return a == b

    checked = []
    for launch, tensors in launches:
        kinds = {}  # a config of each kind this launch has
        for config in [launch.config] if launch.config is not None else launch.candidates:
            kind = ("split" if config.get("SPLIT_K", 1) > 1 else "tma" if config.get("USE_TMA") else
                    "box" if config.get("BOX_W") else "pointers")
            kinds.setdefault(kind, config)
        for kind, config in kinds.items():
            live = live_launch(launch, config)
            live(*tensors)  # plain: Triton binds, specializes, compiles for the H100, launches
            live(*tensors)  # direct: the compiled kernel with the plan's arguments
            plain, direct = driver.launched[-2:]
            own = [a is t for a, t in zip(direct[9:], tensors)]  # (launcher's 9 leading arguments)
            checked.append({"kernel": launch.kernel.__name__, "kind": kind, "direct": bool(live.direct),
                            "arguments": [len(plain), len(direct), len(launch.kernel.arg_names)],
                            "same": len(plain) == len(direct) and all(map(same, plain, direct)),
                            "own_tensors": all(own) and len(own) == len(tensors)})
    print(json.dumps({"checked": checked, "launches": len(driver.launched)}))
""")


def test_a_direct_launch_hands_the_compiled_kernel_what_a_plain_launch_does(tmp_path):
    # A plan's direct launch calls Triton's compiled kernel itself, with the arguments it bound at
    # the first launch. Checked without a GPU on this Triton's own compiled kernels: given a
    # stand-in for an H100's driver whose launcher records its arguments, each kernel of a
    # bottleneck, a batch-1 block, the stem and the head, in a config of each kind it has
    # (pointers, dense descriptors, box tiles, split-K with its scratch), launched plainly and
    # then directly, hands the launcher the same grid, kernel, metadata and arguments.
    found = run_compiling(DIRECT_SCRIPT, tmp_path)
    checked = found["checked"]
    assert {c["kind"] for c in checked} == {"pointers", "tma", "box", "split"}
    assert {c["kernel"] for c in checked} >= {"_conv2d_bias_act_kernel", "_conv2d_bias_act_maxpool_kernel",
                                             "_space_to_depth_kernel", "_avgpool_linear_kernel"}
    assert found["launches"] == 2 * len(checked)
    assert all(c["direct"] and c["same"] and c["own_tensors"] for c in checked), checked
    # Every argument of the kernel's, constexprs too, after the launcher's own nine.
    assert all(c["arguments"][0] == c["arguments"][1] == 9 + c["arguments"][2] for c in checked), checked


# Tracing with an H100's plans, without one: the model's buffers and input as fake CUDA tensors (a
# FakeTensorMode needs no GPU), the device queries answered for an H100, Triton given a stand-in
# H100 driver (benchmarks/host_overhead.py), and the fused network traced by AOTAutograd as
# torch.compile traces it for Inductor: each registered op runs its body (plan, config, launch
# through wrap_triton) on the fake tensors, and each launch becomes a functional kernel node, whose
# tensors_to_clone are those Inductor found the kernel to write (from its Triton IR; where it
# cannot tell, every tensor, each cloned at every call). Each case: the kernels launched, their
# nodes' clones, the guards the trace put on the input's sizes, and the output's batch beside the
# input's (symbolic where the batch is dynamic).
GPU_TRACE_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch, torchvision, triton
    import fused_resnet
    from functorch.compile import aot_function, make_boxed_func
    from fused_resnet.kernels import backend, precompile
    from host_overhead import StandInDriver
    from torch._higher_order_ops.triton_kernel_wrap import triton_kernel_wrapper_functional
    from torch.func import functional_call
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
    from torch._subclasses.fake_tensor import FakeTensorMode

    precompile.device_target = lambda index: precompile.TARGETS["H100"]
    backend._device_name = lambda index: "NVIDIA H100 80GB HBM3"
    torch.cuda.current_device = lambda: 0
    triton.runtime.driver.set_active(StandInDriver(record=False))
    wrapped = []
    wrap_triton = backend.wrap_triton

    def spy(kernel):
        inner = kernel
        while hasattr(inner, "fn"):  # (an autotuner's JITFunction, a JITFunction's Python function)
            inner = inner.fn
        wrapped.append(inner.__name__)
        return wrap_triton(kernel)

    backend.wrap_triton = spy

    def static(t):
        return StatelessSymbolicContext(dynamic_sizes=[DimDynamic.STATIC] * t.dim())

    found = []
    for arch, dtype, batch, dynamic, switches, _ in json.loads(sys.argv[1]):
        torch.manual_seed(0)
        fused = fused_resnet.fuse(getattr(torchvision.models, arch)().eval(), dtype=getattr(torch, dtype),
                                  **switches)
        mode = FakeTensorMode(shape_env=ShapeEnv())
        dims = [DimDynamic.DYNAMIC if d in dynamic else DimDynamic.STATIC for d in ("batch", "", "image", "image")]
        x = mode.from_tensor(torch.randn(batch, 3, 224, 224, dtype=getattr(torch, dtype)),
                             symbolic_context=StatelessSymbolicContext(dynamic_sizes=dims))
        # (Parameters and buffers are static, as torch.compile and torch.export trace them.)
        named = [*fused.named_parameters(), *fused.named_buffers()]
        state = [mode.from_tensor(t, symbolic_context=static(t)) for _, t in named]
        graphs = []

        def keep(graph, inputs):
            graphs.append(graph)
            return make_boxed_func(graph.forward)

        def network(x, *state):
            return functional_call(fused, {name: t for (name, _), t in zip(named, state)}, (x,))

        wrapped.clear()
        with mode, torch.no_grad():
            x = x.to("cuda").contiguous(memory_format=torch.channels_last)
            out = aot_function(network, fw_compiler=keep)(x, *[t.to("cuda") for t in state])
        nodes = [n for n in graphs[0].graph.nodes if n.target is triton_kernel_wrapper_functional]
        # (Inductor lowers torch.empty without its memory_format: a channels_last one is copied.)
        copied = [n for n in graphs[0].graph.nodes if n.target is torch.ops.aten.empty.memory_format
                  and n.kwargs.get("memory_format") == torch.channels_last]
        found.append({"kernels": list(wrapped), "nodes": len(nodes), "channels_last_empty": len(copied),
                      "clones": sorted({name for n in nodes for name in n.kwargs["tensors_to_clone"]}),
                      "guards": [str(g.expr) for g in mode.shape_env.guards],
                      "batch": [str(x.shape[0]), str(out.shape[0])], "classes": out.shape[1]})

    # torch.export with a batch Dim, which refuses a trace that guards on it.
    class Network(torch.nn.Module):
        def forward(self, x, state):
            return functional_call(fused, state, (x,))

    fused = fused_resnet.fuse(torchvision.models.resnet50().eval(), dtype=torch.float16)
    mode = FakeTensorMode()
    with mode:
        x = mode.from_tensor(torch.randn(8, 3, 224, 224, dtype=torch.float16)).to("cuda")
        state = {name: mode.from_tensor(t).to("cuda") for name, t in [*fused.named_parameters(),
                                                                       *fused.named_buffers()]}
        batch = torch.export.Dim("batch", min=2, max=1024)
        exported = torch.export.export(Network(), (x.contiguous(memory_format=torch.channels_last), state),
                                       dynamic_shapes=({0: batch}, {name: None for name in state}))
    ops = [str(n.target) for n in exported.graph.nodes if str(n.target).startswith("fused_resnet.")]
    found.append({"ops": ops, "ranges": sorted(str(r) for r in exported.range_constraints.values())})
    print(json.dumps(found))
""")

# arch, dtype, batch, dynamic sizes, fuse's switches; the kernels a forward launches: one a fused
# layer (and an add_relu a block where residual_epilogue is off), and the stem's space-to-depth copy.
GPU_TRACE_CASES = [
    ("resnet18", "float16", 8, [], {}, 19),
    ("resnet50", "float16", 32, ["batch"], {}, 51),
    ("resnet50", "float16", 2, ["batch"], {}, 51),  # few output tiles: split-K configs
    ("resnet50", "float16", 16, ["batch"], {"chain_blocks": True, "chain_3x3": True}, 27),
    ("resnext50_32x4d", "bfloat16", 16, ["batch"], {}, 51),
    ("resnet50", "float32", 16, ["batch"], {"residual_epilogue": False, "merge_downsample": False,
                                            "stem_maxpool": False, "avgpool_fc": False}, 70),
    ("resnet18", "float16", 8, ["batch", "image"], {}, 19),
]


def test_the_gpu_kernels_trace_for_any_batch(tmp_path):
    # torch.compile and torch.export trace a registered op's body with fake tensors, on a GPU with
    # its kernels' launches through wrap_triton; with a dynamic batch (torch.export's Dim,
    # torch.compile(dynamic=True), or its automatic dynamic shapes at the second batch size) the
    # sizes are symbolic. The configs are then decided for the traced batch and no size is
    # guarded on: one graph serves every batch. And Inductor, reading each kernel's Triton IR, finds
    # it writes its output (and split-K's scratch) alone, so it copies no input before a launch;
    # the outputs are made with their strides (backend.empty), so none is written twice.
    found = run_compiling(GPU_TRACE_SCRIPT, tmp_path, json.dumps(GPU_TRACE_CASES))
    exported = found.pop()
    assert len(exported["ops"]) == 50 and exported["ranges"] == ["VR[2, 1024]"], exported
    for (arch, dtype, batch, dynamic, switches, launches), case in zip(GPU_TRACE_CASES, found):
        where = f"{arch} {dtype} batch {batch} dynamic {dynamic} {switches}"
        assert case["nodes"] == launches and "_conv2d_bias_act_kernel" in case["kernels"], (where, case["nodes"])
        assert case["channels_last_empty"] == 0, where
        # (out_ptr: add_relu's output)
        assert set(case["clones"]) <= {"y_ptr", "z_ptr", "out_ptr", "partial_ptr", "count_ptr"}, (where, case["clones"])
        assert case["classes"] == 1000, where
        if dynamic == ["batch"]:
            assert case["guards"] == [], where
            assert case["batch"][0] == case["batch"][1] and not case["batch"][0].isdigit(), where
        elif not dynamic:
            assert case["batch"] == [str(batch)] * 2, where
    assert "partial_ptr" in found[2]["clones"]  # batch 2: split-K, its scratch written
    assert "_chain_1x1_kernel" in found[3]["kernels"], found[3]["kernels"]
    assert "_add_relu_kernel" in found[5]["kernels"], found[5]["kernels"]


@pytest.mark.gpu
def test_a_network_compiled_for_any_batch_runs_every_batch():
    # The GPU side of the trace above: torch.compile(dynamic=True) makes one graph of the Triton
    # kernels (Inductor generates their launches), which runs other batch sizes too. Checked against
    # the same folded network on torch's own ops, so that no eager first call tunes anything here.
    # Inductor's code writes no output before its kernel does (it fills what no one wrote with NaN).
    import torchvision
    from torch._inductor.utils import run_and_get_code

    from fused_resnet import fuse
    from fused_resnet.validate import synthetic_batchnorm

    model = fuse(synthetic_batchnorm(torchvision.models.resnet18(num_classes=10), size=32),
                 dtype=torch.float16).cuda()
    xs = [torch.randn(n, 3, 32, 32, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
          for n in (4, 6, 9)]  # (no batch of 3: dynamo would give it the channels' symbol)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        with kernels.use_backend("reference"):
            expected = [model(x) for x in xs]
        compiled = torch.compile(model, dynamic=True)
        first, code = run_and_get_code(compiled, xs[0])
        outs = [first]
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        outs += [compiled(x) for x in xs[1:]]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # nothing traced again
    assert code and not any('float("nan")' in source for source in code)
    for out, reference in zip(outs, expected):
        assert out.shape == reference.shape
        torch.testing.assert_close(out, reference, rtol=0, atol=2e-2 * reference.abs().max().item())


LAUNCH_COSTS_SCRIPT = textwrap.dedent("""
    import json, sys
    import host_overhead

    sys.argv = ["host_overhead.py", "--launches", "--batch", "1", "--size", "32", "--rounds", "1", "--calls", "20",
                "--json", sys.argv[1]]
    print(json.dumps(host_overhead.main()))
""")


def test_what_each_launch_costs_in_python(tmp_path):
    # benchmarks/host_overhead.py --launches: every launch of a resnet50 forward, compiled for an
    # H100 here, timed three ways on the stand-in driver; the direct ways need the launch to have
    # gone direct (a plan that fell back to plain launches has nothing to time there).
    out = tmp_path / "launches.json"
    rows = run_compiling(LAUNCH_COSTS_SCRIPT, tmp_path, out)
    kernels_launched = {r["kernel"] for r in rows}
    assert {"_conv2d_bias_act_kernel", "_conv2d_bias_act_maxpool_kernel", "_avgpool_linear_kernel"} <= kernels_launched
    assert len(rows) > 50 and all(r[way] > 0 for r in rows for way in ("first", "plain", "direct", "planned"))
    payload = json.loads(out.read_text())
    assert [c["launch"] for c in payload["cases"]] == ["first", "plain", "direct", "planned"]
    assert all(c["launches"] == len(rows) and c["batch"] == 1 for c in payload["cases"])
    assert payload["cases"][1]["launch_python_ms"] == round(sum(r["plain"] for r in rows) / 1e3, 4)
    assert "stand-in driver" in payload["provenance"]["path"] and payload["per_launch"] == rows


@pytest.mark.gpu
def test_direct_launches_compute_what_plain_launches_do(monkeypatch):
    import torchvision
    from conftest import make_case
    from fused_resnet.kernels import backend

    from fused_resnet import fuse
    from fused_resnet.validate import synthetic_batchnorm

    direct = []
    real = backend._direct

    def counted(*args):
        found = real(*args)
        if found:
            run, rest, alignment = found
            found = (lambda *a: (direct.append(1), run(*a)), rest, alignment)
        return found

    monkeypatch.setattr(backend, "_direct", counted)
    model = synthetic_batchnorm(torchvision.models.resnet18(num_classes=10), size=32)
    x = torch.randn(4, 3, 64, 64, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        monkeypatch.setattr(backend, "DIRECT_LAUNCH", False)
        plain = fuse(model, dtype=torch.float16).cuda()
        expected = [plain(x), plain(x[:2])]
        assert not direct
        monkeypatch.setattr(backend, "DIRECT_LAUNCH", True)
        fused = fuse(model, dtype=torch.float16).cuda()
        for _ in range(3):
            out = fused(x)
        torch.testing.assert_close(out, expected[0], rtol=0, atol=0)
        torch.testing.assert_close(fused(x[:2]), expected[1], rtol=0, atol=0)
    layers = sum(isinstance(m, (FusedConv2d, FusedConv2dMaxPool, FusedAvgPoolLinear)) for m in fused.modules())
    assert len(direct) >= 2 * layers, (len(direct), layers)  # the second and third forwards went direct

    # A residual 2 bytes off 16-byte alignment: the kernel compiled for aligned ones must not run.
    x, weight, bias = make_case(2, 64, 8, 8, 64, 3, 3, dtype=torch.float16)
    residual = torch.randn(2, 64, 8, 8, device="cuda", dtype=torch.float16)
    plan = kernels.plan_conv2d_bias_act(x, weight, bias, 1, 1, residual=residual, relu=True)
    expected = torch.relu(F.conv2d(x.float(), weight.float(), bias.float(), 1, 1) + residual.float())
    for _ in range(3):
        torch.testing.assert_close(plan(x, residual).float(), expected, rtol=2e-3, atol=2e-2)
    shifted = torch.empty(residual.numel() + 1, device="cuda", dtype=torch.float16)[1:].view_as(residual)
    shifted.copy_(residual)
    assert shifted.data_ptr() % 16
    torch.testing.assert_close(plan(x, shifted).float(), expected, rtol=2e-3, atol=2e-2)
