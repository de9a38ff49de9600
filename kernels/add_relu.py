"""relu(a + b) as one elementwise Triton kernel: the residual add of a block, unfused from its conv.

It serves where the conv epilogue cannot take the add, and as the unfused step that the
benchmarks and the fusion study compare the fused epilogue against.

Order of this file: configs, @triton.jit kernel, launcher, op registration, reference.
"""

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import backend
from ._checks import check_same_device, check_supported_dtype

BLOCK_SIZE = 1024
INTERPRETER_BLOCK_SIZE = 1 << 16  # few programs: each one runs in Python under the interpreter


@triton.jit
def _add_relu_kernel(
    a_ptr,  # (numel,) dense, same strides as b and out
    b_ptr,  # (numel,)
    out_ptr,  # (numel,)
    numel,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < numel
    a = tl.load(a_ptr + offs, mask=mask)
    b = tl.load(b_ptr + offs, mask=mask)
    acc = a.to(tl.float32) + b.to(tl.float32)
    # Not tl.maximum: it may turn NaN into 0, and torch.relu keeps NaN.
    acc = tl.where(acc < 0.0, 0.0, acc)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _dense_like(a, b):
    """a and b laid out identically and densely, so one flat index addresses both."""
    fmt = torch.channels_last if a.dim() == 4 and a.is_contiguous(memory_format=torch.channels_last) \
        and not a.is_contiguous() else torch.contiguous_format
    return a.contiguous(memory_format=fmt), b.contiguous(memory_format=fmt)


@triton_op("fused_resnet::add_relu", mutates_args=())
def _add_relu_op(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    named = {"a": a, "b": b}
    check_supported_dtype("add_relu", named)
    check_same_device("add_relu", named)
    if a.shape != b.shape:
        raise ValueError(f"add_relu: a and b must have one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if backend.resolve(a) != "triton" or a.dtype == torch.float64:
        return add_relu_reference(a, b)
    a, b = _dense_like(a, b)
    out = torch.empty_like(a)
    numel = a.numel()
    if numel == 0:
        return out
    block = INTERPRETER_BLOCK_SIZE if not a.is_cuda else BLOCK_SIZE

    def grid(meta):
        return (triton.cdiv(numel, meta["BLOCK_SIZE"]),)

    with backend.launch_guard(a):
        wrap_triton(_add_relu_kernel)[grid](a, b, out, numel, BLOCK_SIZE=block)
    return out


def add_relu(a, b):
    """relu(a + b) in one kernel, accumulated in fp32. Output has a's shape and memory format."""
    return torch.ops.fused_resnet.add_relu(a, b)


def add_relu_reference(a, b):
    """The same as two torch ops: an add, then a ReLU."""
    return torch.relu(a + b)
