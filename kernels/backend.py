"""Which implementation a kernels op runs: the Triton kernel, cuDNN, or plain torch ops.

The environment decides by default ("auto"): CUDA tensors run the compiled Triton kernel; CPU
tensors run the Triton kernel under the Triton interpreter when TRITON_INTERPRET=1 was set before
triton was imported, and the reference (plain torch ops) otherwise. `use_backend` overrides that
for a scope, so that one test, benchmark or command can pick a path without touching the
environment:

    with kernels.use_backend("reference"):   # unfused torch ops, for a baseline or a fast CPU run
        y = model(x)
"""

import contextlib
import contextvars
import os
import threading

import torch
import triton
from torch._subclasses.fake_tensor import is_fake

BACKENDS = ("auto", "triton", "reference", "cudnn")

_backend = contextvars.ContextVar("fused_resnet_kernels_backend", default="auto")

# The Triton interpreter patches triton.language while a kernel runs, so two threads interpreting
# at once break each other; compiled launches need no lock.
_interpreter_lock = threading.Lock()


def interpreting() -> bool:
    """True when triton.jit kernels run under the Triton interpreter (TRITON_INTERPRET=1)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@contextlib.contextmanager
def use_backend(name: str):
    """Run every kernels op inside the `with` block on backend `name`.

    "auto": the default described in this module's docstring. "triton": the Triton kernel, which
    on CPU tensors needs the interpreter. "reference": plain torch ops (conv, add, ReLU as separate
    kernels). "cudnn": cuDNN's fused conv+bias(+add)+ReLU on CUDA where it applies, else the
    reference.
    """
    if name not in BACKENDS:
        raise ValueError(f"kernels.use_backend: unknown backend {name!r}; expected one of {BACKENDS}")
    token = _backend.set(name)
    try:
        yield
    finally:
        _backend.reset(token)


def current_backend() -> str:
    """The backend chosen by the innermost `use_backend`, or "auto"."""
    return _backend.get()


def resolve(tensor: torch.Tensor) -> str:
    """The concrete backend ("triton", "reference" or "cudnn") for an op on `tensor`."""
    name = _backend.get()
    on_cuda = tensor.device.type == "cuda"
    if not on_cuda and name in ("auto", "triton") and is_fake(tensor):
        # An interpreted kernel runs eagerly and cannot enter a traced graph (torch.compile,
        # torch.export, fake-tensor shape checks on CPU): trace the reference instead.
        return "reference"
    if name == "auto":
        return "triton" if on_cuda or interpreting() else "reference"
    if name == "triton" and not on_cuda and not interpreting():
        raise RuntimeError(
            "kernels backend 'triton' on a CPU tensor needs the Triton interpreter: set "
            "TRITON_INTERPRET=1 before triton is imported, or move the tensors to CUDA"
        )
    if name == "cudnn" and not on_cuda:
        return "reference"
    return name


def launch_guard(tensor: torch.Tensor):
    """A context for one kernel launch on `tensor`: serialized under the interpreter, free on a GPU."""
    return contextlib.nullcontext() if tensor.is_cuda else _interpreter_lock
