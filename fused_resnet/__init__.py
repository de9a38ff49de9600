"""fused_resnet: torchvision ResNets with BatchNorm folded and every conv fused with its epilogue.

    model = torchvision.models.resnet50(weights=...)
    fused = fused_resnet.fuse(model, dtype=torch.float16).cuda()
    print(fused_resnet.compare(model, fused, x))
"""

from .convert import fuse
from .folding import fold_bn
from .graphs import CUDAGraphModule
from .modules import (
    FusedAvgPoolLinear,
    FusedBasicBlock,
    FusedBottleneck,
    FusedChain1x1,
    FusedConv2d,
    FusedConv2dMaxPool,
    FusedConvChain1x1,
    FusedStage,
    warmup,
)
from .validate import Comparison, compare

__all__ = [
    "CUDAGraphModule",
    "Comparison",
    "FusedAvgPoolLinear",
    "FusedBasicBlock",
    "FusedBottleneck",
    "FusedChain1x1",
    "FusedConv2d",
    "FusedConv2dMaxPool",
    "FusedConvChain1x1",
    "FusedStage",
    "compare",
    "fold_bn",
    "fuse",
    "warmup",
]
__version__ = "0.1.0"
