"""Triton kernels for fused ResNet inference. Knows tensors, not modules.

conv2d_bias_act: conv + bias (+ residual) (+ ReLU) in one implicit-GEMM kernel.
add_relu: residual add + ReLU in one elementwise kernel.
use_backend: pick Triton, the reference (plain torch ops) or cuDNN for a scope.
"""

from .add_relu import add_relu, add_relu_reference
from .backend import current_backend, interpreting, use_backend
from .conv2d import conv2d_bias_act, conv2d_bias_act_reference

__all__ = [
    "add_relu",
    "add_relu_reference",
    "conv2d_bias_act",
    "conv2d_bias_act_reference",
    "current_backend",
    "interpreting",
    "use_backend",
]
