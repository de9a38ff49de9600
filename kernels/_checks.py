"""Argument checks shared by the kernels' launchers: each error names the argument at fault."""

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def pair(name, value):
    """An int or a pair of ints as a tuple of two ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 1:
        value = (value[0], value[0])
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return tuple(value)
    raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")


def check_supported_dtype(op, tensors):
    """All given tensors share one floating dtype that the kernels support."""
    present = {name: t for name, t in tensors.items() if t is not None}
    for name, t in present.items():
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{op}: {name} has dtype {t.dtype}; expected one of float32, float16, bfloat16, float64"
            )
    dtypes = {t.dtype for t in present.values()}
    if len(dtypes) > 1:
        listed = ", ".join(f"{name}={t.dtype}" for name, t in present.items())
        raise TypeError(f"{op}: all tensors must share one dtype, got {listed}")


def check_same_device(op, tensors):
    """All given tensors live on one device."""
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        listed = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {listed}")
