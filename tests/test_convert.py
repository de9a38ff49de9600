"""fuse(model) over every torchvision ResNet: parity with torchvision, and fuse's behaviour.

Whole-network parity of the big networks runs through the reference backend (plain torch ops),
which is fast on a CPU; the Triton kernels themselves are checked layer by layer in
test_conv2d.py, and one whole network runs through them here (test_resnet18_through_the_kernels).
"""

import copy
import functools
import io
import warnings

import pytest
import torch
import torchvision
from conftest import DEVICE, traced
from torch import nn

from fused_resnet import (
    FusedAvgPoolLinear,
    FusedBasicBlock,
    FusedBottleneck,
    FusedChain1x1,
    FusedConv2d,
    FusedConv2dMaxPool,
    FusedConvChain1x1,
    FusedStage,
    compare,
    fuse,
    kernels,
    warmup,
)
from fused_resnet.validate import synthetic_batchnorm

ARCHS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
         "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2"]
# torchvision's BasicBlock refuses dilation, so resnet18/34 have no dilated variant.
DILATED = [a for a in ARCHS if a not in ("resnet18", "resnet34")]
# On the GPU: every architecture, and the dilated variant of a plain and a grouped bottleneck
# network (their dilated 3x3 convs, 2 and 4 apart, are the kernels the others do not launch).
GPU_ARCHS = [(a, False) for a in ARCHS] + [(a, True) for a in ("resnet50", "resnext50_32x4d")]
SIZE = 64


@functools.lru_cache(maxsize=2)
def model(arch, dilated=False):
    kwargs = {"replace_stride_with_dilation": [False, True, True]} if dilated else {}
    torch.manual_seed(0)
    return synthetic_batchnorm(getattr(torchvision.models, arch)(num_classes=100, **kwargs), size=SIZE)


def images(n=2):
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def reference_backend():
    with kernels.use_backend("reference"):
        yield


def test_synthetic_batchnorm_is_far_from_identity():
    bns = [m for m in model("resnet18").modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(bn.running_mean.abs().max() > 0.05 for bn in bns[1:])
    assert all((bn.running_var - 1).abs().max() > 0.1 for bn in bns)


@pytest.mark.slow
@pytest.mark.parametrize("dilated", [False, True], ids=["", "dilated"])
@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_parity(arch, dilated, reference_backend):
    if dilated and arch not in DILATED:
        pytest.skip("torchvision's BasicBlock does not support dilation")
    ref = model(arch, dilated)
    fused = fuse(ref)
    result = compare(ref, fused, images())
    assert result.nonfinite_mismatch == 0
    assert result.max_rel_err < 1e-4, result
    assert result.top1_agreement == 1.0, result


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("arch", ARCHS)
def test_low_precision_error_within_twice_torchvisions(arch, dtype, reference_backend):
    ref = model(arch)
    exact = copy.deepcopy(ref).double()
    x = images()
    fused_err = compare(exact, fuse(ref, dtype=dtype), x)
    torchvision_err = compare(exact, copy.deepcopy(ref).to(dtype), x)
    atol = 1e-3 if dtype == torch.float16 else 8e-3
    assert fused_err.nonfinite_mismatch == 0
    assert fused_err.max_abs_err <= 2 * torchvision_err.max_abs_err + atol, (fused_err, torchvision_err)


KERNEL_OPS = {"fused_resnet::conv2d_bias_act", "fused_resnet::conv2d_bias_act_maxpool", "fused_resnet::avgpool_linear"}


@pytest.mark.parametrize("arch,batch,blocks", [("resnet18", 2, False), ("resnet50", 1, False), ("resnet18", 2, True)],
                         ids=["resnet18", "resnet50", "resnet18-space-to-depth"])
def test_whole_network_through_the_kernels_with_all_fusions(arch, batch, blocks, monkeypatch):
    # The whole network on the Triton kernels (interpreted on CPU, compiled on a GPU) at 32x32,
    # every fusion on: no aten conv, pooling or linear runs, only the three fused ops. (With
    # igemm.SPACE_TO_DEPTH, the stem's input is copied into 2x2 blocks first: a pad and a copy.)
    from fused_resnet.kernels import igemm

    monkeypatch.setattr(igemm, "SPACE_TO_DEPTH", blocks)
    ref = model(arch)
    fused = fuse(ref).to(DEVICE)
    x = torch.randn(batch, 3, 32, 32)
    with kernels.use_backend("triton"), torch.profiler.profile() as prof:
        result = compare(ref, fused, x)
    assert result.max_rel_err < 1e-4, result
    assert result.top1_agreement == 1.0
    counts = {e.key: e.count for e in prof.key_averages()}
    convs = sum(isinstance(m, nn.Conv2d) for m in ref.modules())
    downsamples = sum(getattr(m, "downsample", None) is not None for m in ref.modules())
    assert counts["fused_resnet::conv2d_bias_act"] == convs - 1 - downsamples  # the stem and shortcuts merged
    assert counts["fused_resnet::conv2d_bias_act_maxpool"] == 1
    assert counts["fused_resnet::avgpool_linear"] == 1
    # The reference network's own ops ran once (compare runs it); the fused one added none.
    assert counts["aten::max_pool2d"] == 1 and counts["aten::linear"] == 1, counts
    assert (counts.get("aten::constant_pad_nd", 0) > 0) == blocks, counts  # the stem's copy into blocks, or none


def test_fuse_structure_and_original_untouched(reference_backend):
    ref = model("resnet50")
    before = copy.deepcopy(ref.state_dict())
    fused = fuse(ref)
    assert isinstance(fused, torchvision.models.ResNet)
    assert isinstance(fused.conv1, FusedConv2dMaxPool) and fused.conv1.relu
    assert isinstance(fused.bn1, nn.Identity) and isinstance(fused.relu, nn.Identity)
    assert isinstance(fused.maxpool, nn.Identity)
    assert isinstance(fused.avgpool, FusedAvgPoolLinear) and isinstance(fused.fc, nn.Identity)
    assert all(isinstance(b, FusedBottleneck) for layer in (fused.layer1, fused.layer4) for b in layer)
    # Projection shortcuts are merged into the last conv of their block.
    assert fused.layer2[0].downsample is None
    assert fused.layer2[0].conv3.shortcut_weight.shape == (512, 256, 1, 1)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert not fused.training and not ref.training
    # The original is untouched: same modules, same tensors.
    assert isinstance(ref.layer1[0], torchvision.models.resnet.Bottleneck)
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())
    assert isinstance(fuse(model("resnet18")).layer1[0], FusedBasicBlock)


SWITCHES = {
    "all": {},
    "no_stem_maxpool": dict(stem_maxpool=False),
    "no_avgpool_fc": dict(avgpool_fc=False),
    "no_merge_downsample": dict(merge_downsample=False),
    "no_residual_epilogue": dict(merge_downsample=False, residual_epilogue=False),
    "none": dict(merge_downsample=False, residual_epilogue=False, stem_maxpool=False, avgpool_fc=False),
}


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("switch", list(SWITCHES))
def test_fusion_switches(arch, switch, reference_backend):
    flags = SWITCHES[switch]
    ref = model(arch)
    fused = fuse(ref, **flags)
    on = {name: flags.get(name, True)
          for name in ("stem_maxpool", "avgpool_fc", "merge_downsample", "residual_epilogue")}
    assert isinstance(fused.conv1, FusedConv2dMaxPool) == on["stem_maxpool"]
    assert isinstance(fused.conv1, FusedConv2d) and fused.conv1.relu
    assert isinstance(fused.maxpool, nn.Identity if on["stem_maxpool"] else nn.MaxPool2d)
    assert isinstance(fused.avgpool, FusedAvgPoolLinear if on["avgpool_fc"] else nn.AdaptiveAvgPool2d)
    assert isinstance(fused.fc, nn.Identity if on["avgpool_fc"] else nn.Linear)
    first = fused.layer2[0]
    last_conv = first.conv2 if arch == "resnet18" else first.conv3
    assert (first.downsample is None) == on["merge_downsample"]
    assert (last_conv.shortcut_weight is not None) == on["merge_downsample"]
    assert first.residual_epilogue == on["residual_epilogue"] == last_conv.relu
    result = compare(ref, fused, images())
    assert result.max_rel_err < 1e-4, result
    assert result.top1_agreement == 1.0


# Which blocks chain their last conv with the next block's first (fuse(chain_blocks=True)): those
# followed by a Bottleneck (in the same stage or the first of the next), whose shortcut is the
# identity or a merged projection, with the channels of x and z within what one program holds
# (256; a shortcut's input is streamed): in resnet50, layer1 and layer2 (their last blocks into
# layer2.0's and layer3.0's first convs), and layer3 but its last (layer4.0's first conv has 512
# channels), not layer4.
CHAINED = {"resnet50": ["layer1.0", "layer1.1", "layer1.2", "layer2.0", "layer2.1", "layer2.2", "layer2.3",
                        "layer3.0", "layer3.1", "layer3.2", "layer3.3", "layer3.4"],
           "wide_resnet50_2": ["layer1.0", "layer1.1", "layer1.2", "layer2.0", "layer2.1", "layer2.2"],
           "resnext50_32x4d": ["layer1.0", "layer1.1", "layer1.2", "layer2.0", "layer2.1", "layer2.2"],
           "resnet18": []}


def chained_blocks(fused, kind=FusedChain1x1):
    """The blocks whose conv3 is a `kind` (FusedChain1x1 includes FusedConvChain1x1)."""
    return [name for name, m in fused.named_modules() if isinstance(getattr(m, "conv3", None), kind)]


@pytest.mark.parametrize("dilated", [False, True], ids=["", "dilated"])
@pytest.mark.parametrize("arch", list(CHAINED))
def test_chain_blocks_structure_and_parity(arch, dilated, reference_backend):
    if dilated and arch == "resnet18":
        pytest.skip("torchvision's BasicBlock has no dilation")
    ref = model(arch, dilated)
    fused = fuse(ref, chain_blocks=True)
    assert all(isinstance(getattr(fused, f"layer{i}"), FusedStage) for i in range(1, 5))
    assert chained_blocks(fused) == CHAINED[arch]
    assert chained_blocks(fuse(ref)) == [] and not isinstance(fuse(ref).layer1, FusedStage)
    # A projection shortcut left as a kernel of its own: its block does not chain.
    apart = fuse(ref, chain_blocks=True, merge_downsample=False)
    assert chained_blocks(apart) == [name for name in CHAINED[arch] if not name.endswith(".0")]
    blocks = [b for i in range(1, 5) for b in getattr(fused, f"layer{i}")]
    names = [f"layer{i}.{j}" for i in range(1, 5) for j in range(len(getattr(fused, f"layer{i}")))]
    for name in CHAINED[arch]:  # the chain holds the block's last conv and the next block's first
        chain, after = blocks[names.index(name)].conv3, blocks[names.index(name) + 1].conv1
        assert torch.equal(chain.next_weight, after.weight) and torch.equal(chain.next_bias, after.bias)
    result = compare(ref, fused, images())
    assert result.max_rel_err < 1e-4, result
    assert result.top1_agreement == 1.0


def test_chain_blocks_through_the_kernels():
    # resnet50 on the Triton kernels with chained blocks: 12 chains (2 of them across stages), each
    # in place of two convs, and the network's answer that of the unchained one.
    ref = model("resnet50")
    x = torch.randn(1, 3, 32, 32)
    fused = fuse(ref, chain_blocks=True).to(DEVICE)
    with kernels.use_backend("triton"), torch.profiler.profile() as prof:
        result = compare(ref, fused, x)
    assert result.max_rel_err < 1e-4, result
    counts = {e.key: e.count for e in prof.key_averages()}
    convs = sum(isinstance(m, nn.Conv2d) for m in ref.modules())
    assert counts["fused_resnet::chain_1x1"] == 12, counts
    assert counts["fused_resnet::conv2d_bias_act"] == convs - 1 - 4 - 2 * 12, counts  # stem, shortcuts, chains


@pytest.mark.gpu
@pytest.mark.parametrize("switches,op,count", [
    (dict(chain_blocks=True), "chain_1x1", 12),
    (dict(chain_3x3=True), "conv_chain_1x1", 13),
    (dict(chain_blocks=True, chain_3x3=True), "conv_chain_1x1", 13),
], ids=["chain_blocks", "chain_3x3", "both"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_chained_blocks_compiled_give_the_unchained_network(dtype, switches, op, count):
    # Compiled, at a batch whose chains fill the SMs (32 images of 128x128: layer3's 8x8 maps make
    # 2048 rows): the chained network's logits are the unchained one's (the same sums, in another
    # order), and the chains ran.
    ref = model("resnet50")
    plain, chained = fuse(ref, dtype=dtype).to(DEVICE), fuse(ref, dtype=dtype, **switches).to(DEVICE)
    x = torch.randn(32, 3, 128, 128, device=DEVICE, dtype=dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = plain(x).float()
        with torch.profiler.profile() as prof:
            out = chained(x).float()
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get(f"fused_resnet::{op}") == count, counts
    tol = 4e-2 if dtype == torch.bfloat16 else 1e-2  # rounding flips, through 50 layers; a wrong kernel is O(1)
    torch.testing.assert_close(out, expected, rtol=0, atol=tol * expected.abs().max().item())


def test_a_chained_block_runs_alone_and_the_state_carries_over(reference_backend):
    ref = model("resnet50")
    fused, plain = fuse(ref, chain_blocks=True), fuse(ref)
    x = torch.randn(2, 256, 8, 8)
    with torch.no_grad():
        alone = fused.layer1[1](x)  # the chain's z is dropped
        torch.testing.assert_close(alone, plain.layer1[1](x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused.layer1[1](x[0]), alone[0], rtol=1e-5, atol=1e-5)  # unbatched
    again = fuse(model("resnet50"), chain_blocks=True)
    again.load_state_dict(fused.state_dict())
    copied = copy.deepcopy(fused).double()
    with torch.no_grad():
        y = images()
        torch.testing.assert_close(again(y), fused(y))
        torch.testing.assert_close(copied(y.double()), fused(y).double(), rtol=1e-4, atol=1e-4)
    assert "layer1.1.conv3.next_weight" in fused.state_dict()


def weight_bytes(module):
    """Bytes of the distinct storages behind a module's buffers and parameters."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*module.buffers(), *module.parameters()]}
    return sum(storages.values())


def test_chains_and_the_convs_they_took_weights_from_hold_one_copy(reference_backend):
    # A chained block keeps its 3x3 conv, and the next block its first conv, for when they run
    # alone; the chain holds the same tensors, and still does once the network is cast or moved
    # (each module's buffers are converted one by one), deep-copied or pickled.
    ref = model("resnet50")
    plain = fuse(ref, dtype=torch.float16)
    chained = fuse(ref, dtype=torch.float16, chain_blocks=True, chain_3x3=True)
    assert weight_bytes(chained) == weight_bytes(plain)
    plain, chained = plain.float(), chained.float()
    assert weight_bytes(chained) == weight_bytes(plain) == 2 * weight_bytes(fuse(ref, dtype=torch.float16))
    block, after = chained.layer1[0], chained.layer1[1]
    assert block.conv3.head_weight is block.conv2.weight and block.conv3.head_bias is block.conv2.bias
    assert block.conv3.next_weight is after.conv1.weight and block.conv3.next_bias is after.conv1.bias
    across = chained.layer2[-1].conv3  # layer2's last block into layer3.0's first conv
    assert across.next_weight is chained.layer3[0].conv1.weight and across.next_weight.dtype == torch.float32
    buffer = io.BytesIO()
    torch.save(chained, buffer)
    buffer.seek(0)
    for again in (copy.deepcopy(chained), torch.load(buffer, weights_only=False)):
        assert weight_bytes(again) == weight_bytes(plain)
        assert again.layer1[0].conv3.head_weight is again.layer1[0].conv2.weight
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(chained(x), plain(x), rtol=1e-4, atol=1e-4)
        y = torch.randn(2, 256, 8, 8)  # a block alone runs its own first conv, on the tensors it shares
        torch.testing.assert_close(after(y), plain.layer1[1](y), rtol=1e-5, atol=1e-5)


def test_a_stage_hands_its_last_chain_to_the_next_stage_only_for_its_own_output(reference_backend):
    ref = model("resnet50")
    fused, plain = fuse(ref, chain_blocks=True), fuse(ref)
    assert fused.layer1.hands_on is fused.layer2.takes_over is not None and fused.layer1.takes_over is None
    assert fused.layer3.hands_on is None and fused.layer4.takes_over is None  # layer4.0's conv1: 512 channels
    x = torch.randn(2, 64, 8, 8)

    def convs_run(fn):
        with torch.profiler.profile() as prof:
            out = fn()
        return out, sum(e.count for e in prof.key_averages() if e.key == "fused_resnet::conv2d_bias_act")

    with torch.no_grad():
        y, _ = convs_run(lambda: fused.layer1(x))
        expected = plain.layer2(y)
        # Its own output: layer2.0's first conv was computed by layer1's last kernel, and is not run again.
        out, handed = convs_run(lambda: fused.layer2(y))
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        # Taken once: the same call again, another tensor of the same values, or y changed in place
        # after layer1 made it, each runs layer2.0's first conv itself.
        again, own = convs_run(lambda: fused.layer2(y))
        assert own == handed + 1 and torch.equal(again, out)
        fused.layer1(x)
        out, own = convs_run(lambda: fused.layer2(y.clone()))
        assert own == handed + 1 and torch.equal(out, again)
        y = fused.layer1(x)
        y.mul_(0.5)
        out, own = convs_run(lambda: fused.layer2(y))
        assert own == handed + 1
        torch.testing.assert_close(out, plain.layer2(y), rtol=1e-5, atol=1e-5)
        # The handoff holds nothing in a copy or a pickle of the network, and still links its stages.
        fused.layer1(x)
        copied = copy.deepcopy(fused)
        assert copied.layer1.hands_on is copied.layer2.takes_over is not fused.layer1.hands_on
        assert copied.layer2.takes_over._held is None
        torch.testing.assert_close(copied(images()), plain(images()), rtol=1e-4, atol=1e-4)


def test_chain_refuses_what_it_cannot_run():
    ref = model("resnet50")
    fused = fuse(ref)
    with pytest.raises(ValueError, match="next_first must be a 1x1 conv of stride 1"):
        FusedChain1x1.from_convs(fused.layer1[1].conv3, fused.layer1[2].conv2)
    with pytest.raises(ValueError, match="next_first must be a 1x1 conv .* no merged shortcut"):
        FusedChain1x1.from_convs(fused.layer1[1].conv3, fused.layer2[0].conv3)
    with pytest.raises(ValueError, match="next_weight takes 256 channels, but weight gives 64"):
        FusedChain1x1(fused.layer1[1].conv1.weight, None, fused.layer1[2].conv1.weight, None)


def test_torch_compile_traces_chained_blocks_as_the_chain_op():
    block = fuse(model("resnet50"), chain_blocks=True).layer1
    x = torch.randn(2, 64, 6, 6)
    with kernels.use_backend("reference"), torch.no_grad():
        eager = block(x)
        out, nodes = traced(block, x)
    targets = [str(n.target) for n in nodes]
    # layer1: block 0 runs conv1, conv2 and the chain; block 1 conv2 and the chain; block 2 conv2
    # and its last conv alone: traced, nothing is handed to layer2, which runs its first conv itself.
    assert targets.count("fused_resnet.chain_1x1") == 2 and targets.count("fused_resnet.conv2d_bias_act") == 5, targets
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    with_3x3 = fuse(model("resnet50"), chain_blocks=True, chain_3x3=True).layer1
    with kernels.use_backend("reference"), torch.no_grad():
        eager = with_3x3(x)
        out, nodes = traced(with_3x3, x)
    chains = [n for n in nodes if str(n.target) == "fused_resnet.conv_chain_1x1"]
    # each block's 3x3 in its chain, the last one's without layer2.0's first conv
    assert [n.args[9] is None for n in chains] == [False, False, True], chains
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


# Which Bottlenecks run their 3x3 conv inside their last conv's kernel (fuse(chain_3x3=True)): those
# whose shortcut is the identity or a merged projection, whose 3x3 has one group, with the 3x3's
# output within 256 channels: in resnet50 every block of layer1 to layer3; in wide_resnet50_2
# (twice as wide) layer1 and layer2; in ResNeXt none (grouped 3x3s).
CHAINED_3X3 = {"resnet50": [f"layer{i}.{j}" for i, n in ((1, 3), (2, 4), (3, 6)) for j in range(n)],
               "wide_resnet50_2": [f"layer{i}.{j}" for i, n in ((1, 3), (2, 4)) for j in range(n)],
               "resnext50_32x4d": [],
               "resnet18": []}


@pytest.mark.parametrize("dilated", [False, True], ids=["", "dilated"])
@pytest.mark.parametrize("arch", list(CHAINED_3X3))
def test_chain_3x3_structure_and_parity(arch, dilated, reference_backend):
    if dilated and arch == "resnet18":
        pytest.skip("torchvision's BasicBlock has no dilation")
    ref = model(arch, dilated)
    x = images()
    for chain_blocks in (False, True):
        fused = fuse(ref, chain_3x3=True, chain_blocks=chain_blocks)
        assert chained_blocks(fused, FusedConvChain1x1) == CHAINED_3X3[arch]
        # With chain_blocks, a block with a 3x3 head computes the next block's first conv as well
        # where the two chain; the others keep their FusedChain1x1.
        with_next = [name for name, m in fused.named_modules()
                     if isinstance(getattr(m, "conv3", None), FusedChain1x1) and m.conv3.next_weight is not None]
        assert with_next == (CHAINED[arch] if chain_blocks else [])
        for name in CHAINED_3X3[arch]:  # the chain holds the block's own 3x3, as folded
            stage, index = name.split(".")
            block = getattr(fused, stage)[int(index)]
            assert torch.equal(block.conv3.head_weight, block.conv2.weight)
            assert (block.conv3.stride, block.conv3.padding, block.conv3.dilation) == (
                block.conv2.stride, block.conv2.padding, block.conv2.dilation)
        result = compare(ref, fused, x)
        assert result.max_rel_err < 1e-4, result
        assert result.top1_agreement == 1.0
    apart = fuse(ref, chain_3x3=True, merge_downsample=False)  # a projection shortcut of its own: not chained
    assert chained_blocks(apart, FusedConvChain1x1) == [name for name in CHAINED_3X3[arch] if not name.endswith(".0")]


def test_chain_3x3_through_the_kernels():
    # resnet50 on the Triton kernels with 3x3 heads, with and without chained blocks: 13 blocks run
    # their 3x3 in their last conv's kernel, and the network's answer is the plain one's.
    ref = model("resnet50")
    x = torch.randn(1, 3, 32, 32)
    convs = sum(isinstance(m, nn.Conv2d) for m in ref.modules())
    for chain_blocks, chained_with_next in ((False, 0), (True, 12)):
        fused = fuse(ref, chain_3x3=True, chain_blocks=chain_blocks).to(DEVICE)
        with kernels.use_backend("triton"), torch.profiler.profile() as prof:
            result = compare(ref, fused, x)
        assert result.max_rel_err < 1e-4, result
        counts = {e.key: e.count for e in prof.key_averages()}
        assert counts["fused_resnet::conv_chain_1x1"] == 13 and "fused_resnet::chain_1x1" not in counts, counts
        # stem, 4 merged shortcuts, 13 heads and their last convs, and the first convs chained before them
        assert counts["fused_resnet::conv2d_bias_act"] == convs - 1 - 4 - 2 * 13 - chained_with_next, counts


def test_chain_3x3_on_a_single_block(reference_backend):
    # fuse() of one Bottleneck: its 3x3 runs inside its last conv's kernel as in a whole network.
    block = model("resnet50").layer2[0]
    fused = fuse(block, chain_3x3=True)
    assert isinstance(fused, FusedBottleneck) and isinstance(fused.conv3, FusedConvChain1x1)
    assert fused.conv3.next_weight is None and fused.downsample is None  # the shortcut merged into it
    x = torch.randn(2, 256, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), block(x), rtol=1e-4, atol=1e-4)
    assert not isinstance(fuse(block).conv3, FusedConvChain1x1)


def test_a_block_with_a_3x3_head_runs_alone_traces_as_one_op_and_refuses_what_it_cannot_run(reference_backend):
    ref = model("resnet50")
    fused, plain = fuse(ref, chain_3x3=True, chain_blocks=True), fuse(ref)
    x = torch.randn(2, 256, 8, 8)
    with torch.no_grad():
        alone = fused.layer1[1](x)
        torch.testing.assert_close(alone, plain.layer1[1](x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused.layer1[2](x[0]), plain.layer1[2](x[0]), rtol=1e-5, atol=1e-5)  # unbatched
    again = fuse(model("resnet50"), chain_3x3=True, chain_blocks=True)
    again.load_state_dict(fused.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again(images()), fused(images()))
    with torch.no_grad():
        eager = fused.layer1(torch.randn(2, 64, 6, 6, generator=torch.Generator().manual_seed(2)))
        out, nodes = traced(fused.layer1, torch.randn(2, 64, 6, 6, generator=torch.Generator().manual_seed(2)))
    targets = [str(n.target) for n in nodes]
    # layer1: block 0 runs conv1 and its chain; blocks 1 and 2 their chains alone.
    assert targets.count("fused_resnet.conv_chain_1x1") == 3 and targets.count("fused_resnet.conv2d_bias_act") == 1, \
        targets
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="head must be a conv of one group with a ReLU"):
        FusedConvChain1x1.from_convs(fuse(model("resnext50_32x4d")).layer1[1].conv2, plain.layer1[1].conv3)
    with pytest.raises(ValueError, match=r"head_weight must be a conv weight \(64, C, R, S\)"):
        FusedConvChain1x1(plain.layer1[1].conv1.weight[:32], None, plain.layer1[1].conv3.weight, None)
    with pytest.raises(ValueError, match="FusedChain1x1: next_weight is required"):
        FusedChain1x1(plain.layer1[1].conv3.weight, None, None, None)


def test_merge_downsample_needs_the_residual_epilogue():
    with pytest.raises(ValueError, match="merge_downsample=True needs residual_epilogue=True"):
        fuse(model("resnet18"), residual_epilogue=False)


def test_fuse_dtype_casts_everything(reference_backend):
    fused = fuse(model("resnet18"), dtype=torch.bfloat16)
    assert {t.dtype for t in fused.state_dict().values() if t.is_floating_point()} == {torch.bfloat16}
    # The bf16 network is the same network: its error against float64 at most twice torchvision's own in bf16.
    exact = copy.deepcopy(model("resnet18")).double()
    out = compare(exact, fused, images(8))
    torchvision_out = compare(exact, copy.deepcopy(model("resnet18")).to(torch.bfloat16), images(8))
    assert out.fused_dtype == "torch.bfloat16" and out.nonfinite_mismatch == 0
    assert out.max_abs_err <= 2 * torchvision_out.max_abs_err + 8e-3, (out, torchvision_out)
    with pytest.raises(TypeError, match="dtype must be one of"):
        fuse(model("resnet18"), dtype=torch.int8)


UNFUSED = dict(residual_epilogue=False, merge_downsample=False, stem_maxpool=False, avgpool_fc=False)


@pytest.mark.parametrize("switches", [{}, UNFUSED, dict(chain_blocks=True, chain_3x3=True)],
                         ids=["default", "unfused", "chained"])
def test_under_autocast_the_fused_network_computes_as_torchvisions_does(switches, reference_backend):
    # A float32 network served under torch.autocast: torchvision's computes its convs and its fc in
    # bfloat16 and returns bfloat16 logits; so does the fused one, as the same network cast to
    # bfloat16 (its modules, and the torch ops between them where a fusion is off), its error
    # against float64 at most twice torchvision's own. Off again, float32.
    ref = model("resnet50")
    fused = fuse(ref, **switches)
    x = images()
    with torch.no_grad():
        exact = copy.deepcopy(ref).double()(x.double())
        plain = fused(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, theirs = fused(x), ref(x)
        cast = copy.deepcopy(fused).to(torch.bfloat16)(x.to(torch.bfloat16))
        assert got.dtype == theirs.dtype == torch.bfloat16
        assert torch.equal(got, cast)
        assert (got.double() - exact).abs().max() <= 2 * (theirs.double() - exact).abs().max() + 8e-3
        assert torch.equal(fused(x), plain)


def test_torch_compile_traces_the_casts_of_autocast():
    block = fuse(model("resnet50")).layer1[0]
    x = torch.randn(2, 64, 6, 6)
    with kernels.use_backend("reference"), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        eager = block(x)
        out, nodes = traced(block, x)
    assert out.dtype == eager.dtype == torch.bfloat16
    assert torch.equal(out, eager)
    ops = [str(n.target) for n in nodes]
    assert ops.count("fused_resnet.conv2d_bias_act") == 3, ops


def test_fused_model_behaviour(reference_backend):
    fused = fuse(model("resnet18"))
    with pytest.raises(RuntimeError, match="is an inference module"):
        fused.train()
    x = images()
    with torch.no_grad():
        ref_out = fused(x)
        half = copy.deepcopy(fused).half()
        assert half(x.half()).dtype == torch.float16
        loaded = fuse(model("resnet18"))
        loaded.load_state_dict(fused.state_dict())
        assert torch.equal(loaded(x), ref_out)
        assert fused(torch.empty(0, 3, SIZE, SIZE)).shape == (0, 100)
    with pytest.raises(RuntimeError, match="does not compute gradients"):
        fused(x.requires_grad_())


def test_unknown_block_strict_and_lenient(reference_backend):
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.conv(x))

    net = nn.Sequential(Custom(), copy.deepcopy(model("resnet18")))  # compare() restores train mode on it
    with pytest.raises(TypeError, match=r"not fused .* 0\.bn .*strict=True"):
        fuse(net, strict=True)
    with pytest.warns(UserWarning, match="0.bn"):
        lenient = fuse(net)
    assert isinstance(lenient[0].bn, nn.BatchNorm2d) and isinstance(lenient[1].layer1[0], FusedBasicBlock)
    result = compare(net, lenient, images())
    assert result.max_rel_err < 1e-4 and result.top1_agreement == 1.0, result


@pytest.mark.parametrize("make", [lambda: torchvision.models.vgg11(), lambda: nn.Linear(4, 2),
                                  lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))],
                         ids=["vgg11", "linear", "conv-bn"])
def test_fuse_refuses_a_model_without_resnet_blocks(make):
    net = make()
    with pytest.raises(TypeError, match=f"expected a torchvision ResNet .* got a {type(net).__name__} with none"):
        fuse(net)


def test_fuse_takes_a_single_block(reference_backend):
    from torchvision.models.resnet import Bottleneck

    block = randomize_bn_block(Bottleneck(64, 16))
    fused = fuse(block)
    assert isinstance(fused, FusedBottleneck)
    x = torch.randn(2, 64, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), block(x), rtol=1e-4, atol=1e-4)


def randomize_bn_block(block):
    from conftest import randomize_bn

    return randomize_bn(block).eval()


def test_fuse_warns_that_train_mode_folds_the_running_statistics():
    net = copy.deepcopy(model("resnet18")).train()
    with pytest.warns(UserWarning, match="train mode .* running statistics folded in"):
        fused = fuse(net)
    assert net.training and not fused.training  # the original's mode is left alone
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fuse(model("resnet18"))  # eval mode: no warning


@pytest.mark.parametrize("stem_maxpool", [True, False])
def test_unbatched_input_is_refused_at_the_first_layer(reference_backend, stem_maxpool):
    fused = fuse(model("resnet18"), stem_maxpool=stem_maxpool)
    with pytest.raises(ValueError, match=r"first layer\): expected a batched 4-D .* got shape \(3, 32, 32\); "
                                         r"add the batch dimension"):
        fused(torch.randn(3, 32, 32))
    # The layer alone still takes what F.conv2d takes: an unbatched image.
    stem = fuse(model("resnet18"), stem_maxpool=False).conv1
    stem.batched_only = False
    assert stem(torch.randn(3, 32, 32)).shape == (64, 16, 16)


def test_batchnorm_without_running_stats_is_an_error():
    net = torchvision.models.resnet18()
    net.bn1 = nn.BatchNorm2d(64, track_running_stats=False)
    with pytest.raises(ValueError, match="'bn1' has no running statistics"):
        fuse(net)
    with pytest.raises(TypeError, match="expected an nn.Module"):
        fuse("resnet18")


def test_compare_reports_errors_and_top1(reference_backend):
    ref = model("resnet18")
    same = compare(ref, copy.deepcopy(ref), images(4))
    assert same.max_abs_err == 0 and same.top1_agreement == 1.0
    other = copy.deepcopy(ref)
    with torch.no_grad():
        other.fc.weight.mul_(-1)
        other.fc.bias.mul_(-1)
    result = compare(ref, other, images(4))
    assert result.max_abs_err > 0 and result.top1_agreement < 1.0
    assert set(result.as_dict()) >= {"max_abs_err", "max_rel_err", "top1_agreement"}


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("precision", ["float16", "bfloat16", "float32", "tf32"])
@pytest.mark.parametrize("arch,dilated", GPU_ARCHS, ids=[a + ("-dilated" if d else "") for a, d in GPU_ARCHS])
def test_every_architecture_compiles_and_runs_on_the_gpu(arch, dilated, precision):
    # Compiled kernels in every dtype, TF32 on and off: the fused error against float64 at most
    # twice torchvision's own in that precision (plus a small atol).
    dtype = torch.float32 if precision == "tf32" else getattr(torch, precision)
    prev = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        ref = model(arch, dilated)
        exact = copy.deepcopy(ref).double()
        x = images()
        fused = fuse(ref, dtype=dtype).cuda()
        warmup(fused, x.to("cuda", dtype))  # its kernels compiled in parallel first, so that the matrix runs in minutes
        fused_err = compare(exact, fused, x)
        torchvision_err = compare(exact, copy.deepcopy(ref).to("cuda", dtype), x)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = prev
    atol = {"float16": 1e-3, "bfloat16": 8e-3, "float32": 1e-5, "tf32": 2e-3}[precision]
    assert fused_err.nonfinite_mismatch == 0
    assert fused_err.max_abs_err <= 2 * torchvision_err.max_abs_err + atol, (fused_err, torchvision_err)
