"""Each resnet50 and resnet18 block type: the fused block against torchvision's (eager, channels_last)."""

import copy

import pytest
import torch
import torchvision
from conftest import DEVICE, HAS_CUDA, measure

from fused_resnet import FusedBasicBlock, FusedBottleneck
from fused_resnet.validate import synthetic_batchnorm

BATCH = 64 if HAS_CUDA else 2
DTYPE = torch.float16 if HAS_CUDA else torch.float32
SIZE = 224 if HAS_CUDA else 32


def block_types(arch):
    """(name, block, input shape) for the first block of each stage and one plain block of each stage."""
    model = synthetic_batchnorm(getattr(torchvision.models, arch)(), size=64)
    found = []

    def hook(name):
        def record(module, inputs, _output):
            found.append((name, module, tuple(inputs[0].shape[1:])))
        return record

    handles = []
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        layer = getattr(model, stage)
        handles.append(layer[0].register_forward_hook(hook(f"{arch}.{stage}.0")))
        handles.append(layer[1].register_forward_hook(hook(f"{arch}.{stage}.1")))
    with torch.no_grad():
        model(torch.randn(1, 3, SIZE, SIZE))
    for h in handles:
        h.remove()
    return found


CASES = block_types("resnet50") + block_types("resnet18")
if not HAS_CUDA:
    CASES = CASES[:2]


@pytest.mark.parametrize("impl", ["eager_channels_last", "fused"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_block(benchmark, case, impl):
    name, block, shape = case
    x = torch.randn(BATCH, *shape, device=DEVICE, dtype=DTYPE).contiguous(memory_format=torch.channels_last)
    if impl == "fused":
        cls = FusedBottleneck if isinstance(block, torchvision.models.resnet.Bottleneck) else FusedBasicBlock
        module = cls.from_torchvision(block, dtype=DTYPE).to(DEVICE)
    else:
        module = copy.deepcopy(block).to(DEVICE, DTYPE).to(memory_format=torch.channels_last).eval()
    benchmark.group = f"block {name} {tuple(shape)}"
    measure(benchmark, lambda: module(x), model=name, impl=impl, dtype=str(DTYPE).removeprefix("torch."),
            batch=BATCH, size=shape[-1])
