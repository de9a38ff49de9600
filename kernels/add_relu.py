"""relu(a + b) as one elementwise Triton kernel: the residual add of a block, unfused from its conv.

It serves where the conv epilogue cannot take the add, and as the unfused step that the
benchmarks and the fusion study compare the fused epilogue against.

Order of this file: configs, @triton.jit kernel, launcher, op registration, reference.
"""

import torch
import triton
import triton.language as tl
from torch.library import triton_op

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


def plan_add_relu(a, b, *, backend_name=None, traceable=False):
    """Check the arguments once and return run(a, b) -> relu(a + b) for operands laid out as these
    (under the backend in force, or `backend_name`)."""
    named = {"a": a, "b": b}
    check_supported_dtype("add_relu", named)
    check_same_device("add_relu", named)
    if a.shape != b.shape:
        raise ValueError(f"add_relu: a and b must have one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if backend.choose(a, backend_name) == "reference":
        return add_relu_reference
    fmt = _dense_format(a)
    numel = a.numel()
    block = BLOCK_SIZE if backend.on_gpu(a) else INTERPRETER_BLOCK_SIZE
    launch = backend.KernelLaunch(_add_relu_kernel, lambda meta: (triton.cdiv(numel, meta["BLOCK_SIZE"]),),
                                  {"numel": numel}, on_cuda=a.is_cuda, config={"BLOCK_SIZE": block},
                                  traceable=traceable)

    def run(a, b):
        # One flat index addresses a, b and the output when all three share one dense layout.
        a, b = a.contiguous(memory_format=fmt), b.contiguous(memory_format=fmt)
        out = torch.empty_like(a)
        if numel:
            launch(a, b, out)
        return out

    return run


def _dense_format(a):
    """channels_last for a 4-D tensor laid out so, else contiguous: the layout add_relu computes in."""
    if a.dim() == 4 and a.is_contiguous(memory_format=torch.channels_last) and not a.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


@triton_op("fused_resnet::add_relu", mutates_args=())
def _add_relu_op(a: torch.Tensor, b: torch.Tensor, backend_name: str) -> torch.Tensor:
    return plan_add_relu(a, b, backend_name=backend_name, traceable=True)(a, b)


def add_relu(a, b):
    """relu(a + b) in one kernel, accumulated in fp32. Output has a's shape and memory format."""
    return torch.ops.fused_resnet.add_relu(a, b, backend.current_backend())


def add_relu_reference(a, b):
    """The same as two torch ops: an add, then a ReLU."""
    return torch.relu(a + b)
