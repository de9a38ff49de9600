"""Triton kernels for fused ResNet inference. Knows tensors, not modules.

conv2d_bias_act: conv + bias (+ residual, or a 1x1 projection of it) (+ ReLU) in one implicit-GEMM kernel.
conv2d_bias_act_maxpool: conv + bias (+ ReLU) + max pooling in one kernel (a ResNet stem).
avgpool_linear: global average pooling + linear in one kernel (a ResNet head).
chain_1x1: a block's last 1x1 conv (+ residual or projection shortcut, ReLU) and the next block's first, one kernel.
conv_chain_1x1: the same led by the block's 3x3 conv (its output never stored), the next block's first optional.
add_relu: residual add + ReLU in one elementwise kernel.
use_backend: pick Triton, the reference (plain torch ops) or cuDNN for a scope.
plan_<op>: the op checked and bound once for operands of one signature; the plan takes the tensors
alone (the fused modules' eager fast path).

Installed as fused_resnet.kernels (`from fused_resnet import kernels`), never as a top-level
`kernels`: that name belongs to another PyPI package, and importing this folder under two names
would register the same torch ops twice.
"""

if __name__ != "fused_resnet.kernels":
    raise ImportError(
        f"fused_resnet's kernels were imported as {__name__!r}; import them as `from fused_resnet import kernels` "
        "(install the project with `pip install -e .` so that fused_resnet.kernels resolves)"
    )

from .add_relu import add_relu, add_relu_reference, plan_add_relu
from .avgpool_linear import avgpool_linear, avgpool_linear_reference, plan_avgpool_linear
from .backend import current_backend, interpreting, use_backend
from .chain_1x1 import (
    chain_1x1,
    chain_1x1_reference,
    chain_fits,
    conv_chain_1x1,
    conv_chain_1x1_reference,
    plan_chain_1x1,
    plan_conv_chain_1x1,
)
from .conv2d import conv2d_bias_act, conv2d_bias_act_reference, plan_conv2d_bias_act
from .conv2d_maxpool import conv2d_bias_act_maxpool, conv2d_bias_act_maxpool_reference, plan_conv2d_bias_act_maxpool

__all__ = [
    "add_relu",
    "add_relu_reference",
    "avgpool_linear",
    "avgpool_linear_reference",
    "chain_1x1",
    "chain_1x1_reference",
    "chain_fits",
    "conv2d_bias_act",
    "conv_chain_1x1",
    "conv_chain_1x1_reference",
    "conv2d_bias_act_maxpool",
    "conv2d_bias_act_maxpool_reference",
    "conv2d_bias_act_reference",
    "current_backend",
    "interpreting",
    "plan_add_relu",
    "plan_avgpool_linear",
    "plan_chain_1x1",
    "plan_conv2d_bias_act",
    "plan_conv2d_bias_act_maxpool",
    "plan_conv_chain_1x1",
    "use_backend",
]
