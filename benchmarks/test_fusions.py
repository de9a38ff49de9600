"""What each fusion buys: resnet50, fp16, batch 256, fuse's defaults against the same model with one off
(or, for chain_blocks and chain_3x3, on).

The cumulative ablation (one fusion added at a time) is `fused-resnet profile --ablation`; this
suite puts each fusion's own gain beside the full model in one pytest-benchmark group.
"""

import pytest
import torch
from conftest import DEVICE, HAS_CUDA, measure

from fused_resnet import bench, fuse

ARCH = "resnet50"
BATCH = 256 if HAS_CUDA else 2
SIZE = 224 if HAS_CUDA else 32
DTYPE = torch.float16 if HAS_CUDA else torch.float32
VARIANTS = {
    "all": {},
    "no_merge_downsample": dict(merge_downsample=False),
    "no_stem_maxpool": dict(stem_maxpool=False),
    "no_avgpool_fc": dict(avgpool_fc=False),
    "no_residual_epilogue": dict(residual_epilogue=False, merge_downsample=False),
    "chain_blocks": dict(chain_blocks=True),  # off by default: this times whether it pays
    "chain_3x3": dict(chain_3x3=True),  # the same
}
_MODEL = []


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fusion_switch(benchmark, variant):
    if not HAS_CUDA and variant != "all":
        pytest.skip("the switches are timed compiled on a GPU; on a CPU only the full model runs (reference path)")
    if not _MODEL:
        _MODEL.append(bench.load_model(ARCH)[0])
    fused = fuse(_MODEL[0], dtype=DTYPE, **VARIANTS[variant]).to(DEVICE)
    x = torch.randn(BATCH, 3, SIZE, SIZE, device=DEVICE, dtype=DTYPE).contiguous(memory_format=torch.channels_last)
    benchmark.group = f"{ARCH} fusion switches {str(DTYPE).removeprefix('torch.')} batch {BATCH}"
    measure(benchmark, lambda: fused(x), model=ARCH, impl=f"fused_{variant}", dtype=str(DTYPE).removeprefix("torch."),
            batch=BATCH, size=SIZE)
