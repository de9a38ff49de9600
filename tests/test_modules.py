"""FusedConv2d, FusedBasicBlock and FusedBottleneck against torchvision, and how they behave.

These run the real Triton kernels (interpreted without CUDA) on small maps with real channels.
"""

import copy
import io

import pytest
import torch
from conftest import DEVICE, HAS_CUDA, assert_close, randomize_bn, watch_descriptor_allocator
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

from fused_resnet import FusedBasicBlock, FusedBottleneck, FusedConv2d

TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def make_block(kind, inplanes, planes, stride=1, groups=1, width=64, dilation=1):
    expansion = 1 if kind is BasicBlock else 4
    downsample = None
    if stride != 1 or inplanes != planes * expansion:
        downsample = nn.Sequential(conv1x1(inplanes, planes * expansion, stride), nn.BatchNorm2d(planes * expansion))
    if kind is BasicBlock:
        block = BasicBlock(inplanes, planes, stride, downsample)
    else:
        block = Bottleneck(inplanes, planes, stride, downsample, groups=groups, base_width=width, dilation=dilation)
    return randomize_bn(block).eval()


BLOCKS = [
    ("basic", BasicBlock, dict(inplanes=64, planes=64)),
    ("basic_down", BasicBlock, dict(inplanes=64, planes=128, stride=2)),
    ("bottleneck_first", Bottleneck, dict(inplanes=64, planes=64)),
    ("bottleneck", Bottleneck, dict(inplanes=256, planes=64)),
    ("bottleneck_down", Bottleneck, dict(inplanes=256, planes=128, stride=2)),
    ("resnext", Bottleneck, dict(inplanes=256, planes=128, groups=32, width=4, stride=2)),
    ("dilated", Bottleneck, dict(inplanes=512, planes=128, dilation=2)),
]


def fused_of(block, dtype=None, **switches):
    cls = FusedBasicBlock if isinstance(block, BasicBlock) else FusedBottleneck
    return cls.from_torchvision(block, dtype=dtype, **switches)


# The fusion switches of a block; "merged" (the default) runs a projection shortcut inside the last GEMM.
SWITCHES = {
    "merged": {},
    "separate_downsample": dict(merge_downsample=False),
    "no_residual_epilogue": dict(merge_downsample=False, residual_epilogue=False),
}


def ops_run(fn):
    """Run fn under the profiler; return its result and {op name: calls}."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, {e.key: e.count for e in prof.key_averages()}


@pytest.mark.parametrize("switch", list(SWITCHES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,kind,kwargs", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_block_matches_torchvision(name, kind, kwargs, dtype, switch):
    block = make_block(kind, **kwargs)
    fused = fused_of(block, dtype, **SWITCHES[switch]).to(DEVICE)
    x = torch.randn(2, kwargs["inplanes"], 6, 5)
    with torch.no_grad():
        expected = block.double()(x.double())
        out, ops = ops_run(lambda: fused(x.to(DEVICE, dtype).contiguous(memory_format=torch.channels_last)))
    assert out.dtype == dtype
    scale = expected.abs().max().item()
    assert_close(out, expected, rtol=TOL[dtype], atol=TOL[dtype] * scale)
    # The Triton path ran, one launch per conv, and the shortcut cost a launch only where asked.
    convs = 2 if kind is BasicBlock else 3
    separate = block.downsample is not None and switch != "merged"
    assert ops["fused_resnet::conv2d_bias_act"] == convs + separate, ops
    assert ops.get("fused_resnet::add_relu", 0) == (switch == "no_residual_epilogue"), ops
    assert not any(k.startswith("aten::") and ("conv" in k or "relu" in k) for k in ops), ops


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter's descriptor switches; on a GPU each config names them")
@pytest.mark.parametrize("name,kind,kwargs", [b for b in BLOCKS if b[0] in ("basic", "bottleneck", "bottleneck_down")],
                         ids=["basic", "bottleneck", "bottleneck_down"])
def test_block_through_tensor_descriptors(name, kind, kwargs, monkeypatch):
    # Dense 1x1s through descriptors (USE_TMA) and 3x3s as box tiles, as configs may run them on a
    # GPU: the residual (the block's input) is then read through a descriptor too, in the last
    # conv's epilogue (a 1x1 in a Bottleneck, a 3x3 in a BasicBlock).
    from fused_resnet.kernels import igemm

    monkeypatch.setattr(igemm, "INTERPRETER_TMA", 1)
    monkeypatch.setattr(igemm, "INTERPRETER_BOX_W", 4)
    allocators = watch_descriptor_allocator(monkeypatch)
    block = make_block(kind, **kwargs)
    x = torch.randn(2, kwargs["inplanes"], 6, 5)
    with torch.no_grad():
        expected = block.double()(x.double())
        out = fused_of(block, torch.float16)(x.half().contiguous(memory_format=torch.channels_last))
    assert_close(out, expected, rtol=TOL[torch.float16], atol=TOL[torch.float16] * expected.abs().max().item())
    assert allocators, "no kernel ran through tensor descriptors"


@pytest.mark.parametrize("name,kind,kwargs", [b for b in BLOCKS if b[0].endswith("down")],
                         ids=[b[0] for b in BLOCKS if b[0].endswith("down")])
def test_merged_downsample_in_float64_is_exact(name, kind, kwargs):
    # float64 runs the reference path: this checks the merge's algebra (W_d, summed biases) alone.
    block = make_block(kind, **kwargs)
    fused = fused_of(block, torch.float64)
    assert fused.downsample is None
    last = fused.conv2 if kind is BasicBlock else fused.conv3
    assert last.shortcut_weight.dtype == torch.float64 and "shortcut=1x1 conv" in repr(last)
    x = torch.randn(2, kwargs["inplanes"], 6, 5, dtype=torch.float64)
    with torch.no_grad():
        assert_close(fused(x), block.double()(x), rtol=1e-10, atol=1e-10)


def test_block_switch_errors():
    block = make_block(Bottleneck, 256, 128, stride=2)
    with pytest.raises(ValueError, match="merge_downsample=True needs residual_epilogue=True"):
        FusedBottleneck.from_torchvision(block, residual_epilogue=False)
    assert "residual_epilogue=False" in repr(
        FusedBottleneck.from_torchvision(block, residual_epilogue=False, merge_downsample=False))


def test_fused_conv_from_conv_bn_and_conv_alone():
    conv = nn.Conv2d(3, 16, 7, stride=2, padding=3, bias=False)
    bn = nn.BatchNorm2d(16)
    randomize_bn(bn)
    ref = nn.Sequential(conv, bn, nn.ReLU()).eval()
    fused = FusedConv2d.from_conv_bn(conv, bn, relu=True).to(DEVICE)
    x = torch.randn(1, 3, 11, 9)
    with torch.no_grad():
        assert_close(fused(x.to(DEVICE)), ref(x), rtol=1e-4, atol=1e-4)
        plain = FusedConv2d.from_conv_bn(conv).to(DEVICE)  # no BN, no ReLU: just the conv
        assert_close(plain(x.to(DEVICE)), conv(x), rtol=1e-4, atol=1e-4)
    assert fused.weight.is_contiguous(memory_format=torch.channels_last)
    assert "relu=True" in repr(fused)


def test_modules_have_torchvision_names_and_no_parameters():
    fused = fused_of(make_block(Bottleneck, 256, 128, stride=2), merge_downsample=False)
    names = dict(fused.named_children())
    assert set(names) == {"conv1", "conv2", "conv3", "downsample"}
    assert list(fused.parameters()) == []
    assert {k for k in fused.state_dict()} >= {"conv1.weight", "conv3.bias", "downsample.weight"}
    assert not fused.training


def test_refuses_training_and_gradients():
    fused = fused_of(make_block(BasicBlock, 16, 16)).to(DEVICE)
    with pytest.raises(RuntimeError, match="FusedBasicBlock is an inference module"):
        fused.train()
    fused.eval()  # train(False) is fine
    x = torch.randn(1, 16, 4, 4, device=DEVICE, requires_grad=True)
    with pytest.raises(RuntimeError, match="does not compute gradients"):
        fused(x)
    with torch.no_grad():
        assert fused(x).shape == (1, 16, 4, 4)


def test_bad_inputs_name_module_and_expectation():
    fused = fused_of(make_block(BasicBlock, 16, 16)).to(DEVICE)
    with torch.no_grad():
        with pytest.raises(ValueError, match="FusedConv2d: expected an input with 16 channels"):
            fused(torch.randn(1, 8, 4, 4, device=DEVICE))
        with pytest.raises(ValueError, match="4-D .* or 3-D"):
            fused(torch.randn(16, 4, device=DEVICE))
        with pytest.raises(TypeError, match="floating-point input"):
            fused(torch.ones(1, 16, 4, 4, dtype=torch.int32, device=DEVICE))
        with pytest.raises(TypeError, match="input is torch.float16 but the module's weights are torch.float32"):
            fused(torch.randn(1, 16, 4, 4, device=DEVICE).half())
        with pytest.raises(ValueError, match="input is on meta"):
            fused(torch.randn(1, 16, 4, 4, device="meta"))
        with pytest.raises(TypeError, match="expected a tensor"):
            fused([1.0])


def test_unsupported_torchvision_variants_are_refused():
    block = make_block(BasicBlock, 16, 32, stride=2)
    block.downsample = nn.Sequential(nn.AvgPool2d(2), conv1x1(16, 32), nn.BatchNorm2d(32))
    with pytest.raises(TypeError, match="downsample must be Sequential"):
        FusedBasicBlock.from_torchvision(block)
    block = make_block(BasicBlock, 16, 16)
    block.relu = nn.GELU()
    with pytest.raises(TypeError, match="relu must be nn.ReLU"):
        FusedBasicBlock.from_torchvision(block)
    with pytest.raises(TypeError, match="expected a torchvision Bottleneck"):
        FusedBottleneck.from_torchvision(make_block(BasicBlock, 16, 16))
    conv = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        FusedConv2d.from_conv_bn(conv, nn.BatchNorm2d(4))


def test_empty_batch_and_unbatched_input():
    block = make_block(Bottleneck, 64, 16)
    fused = fused_of(block).to(DEVICE)
    with torch.no_grad():
        assert fused(torch.randn(0, 64, 5, 5, device=DEVICE)).shape == (0, 64, 5, 5)
        x = torch.randn(64, 5, 5)
        assert_close(fused(x.to(DEVICE)), block(x[None])[0], rtol=1e-4, atol=1e-4)


def test_nan_and_inf_reach_the_output_as_in_torchvision():
    block = make_block(BasicBlock, 8, 8)
    fused = fused_of(block).to(DEVICE)
    x = torch.randn(1, 8, 6, 6)
    x[0, 2, 3, 3] = float("nan")
    x[0, 5, 0, 0] = float("inf")
    with torch.no_grad():
        expected = block(x)
        out = fused(x.to(DEVICE)).cpu()
    assert torch.isnan(expected).any()
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
    assert torch.equal(torch.isinf(out), torch.isinf(expected))


def test_state_dict_deepcopy_save_load_and_dtype_moves():
    block = make_block(Bottleneck, 64, 16)
    fused = fused_of(block).to(DEVICE)
    x = torch.randn(2, 64, 4, 4, device=DEVICE)
    with torch.no_grad():
        ref = fused(x)
        clone = copy.deepcopy(fused)
        assert torch.equal(clone(x), ref)

        buf = io.BytesIO()
        torch.save(fused, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert torch.equal(loaded(x), ref)

        other = fused_of(make_block(Bottleneck, 64, 16)).to(DEVICE)
        other.load_state_dict(fused.state_dict())
        assert torch.equal(other(x), ref)
        assert other.conv2.weight.is_contiguous(memory_format=torch.channels_last)

        half = copy.deepcopy(fused).half()
        assert half.conv1.weight.dtype == torch.float16
        assert half.conv2.weight.is_contiguous(memory_format=torch.channels_last)
        assert_close(half(x.half()), ref, rtol=4e-3, atol=4e-3 * ref.abs().max().item())
        bf = copy.deepcopy(fused).to(torch.bfloat16)
        assert bf(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_moves_between_devices():
    fused = fused_of(make_block(BasicBlock, 16, 16))
    x = torch.randn(1, 16, 5, 5)
    with torch.no_grad():
        cpu_out = fused(x)
        gpu_out = fused.cuda()(x.cuda())
        back = fused.cpu()(x)
    assert_close(gpu_out, cpu_out, rtol=1e-4, atol=1e-4)
    assert torch.equal(back, cpu_out)
