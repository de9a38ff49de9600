"""What a forward costs the CPU: host time per forward (forwards issued back to back without
waiting for the GPU, wall time / count) for the fused model and eager channels_last.

On a GPU: resnet50 fp16 at batch 256 and 1 (the batch-1 latencies, with and without CUDA graphs,
are in test_network.py). On a CPU: the same harness on the reference path (folded weights, plain
torch ops) at 1x3x32x32 on one thread, where the convs cost little and what is left is the Python
around them: the fused model runs fewer ops than eager, so it should cost no more.

`fused_plain_launch` is the fused model with every kernel launched through Triton's own per-call
binding (kernels.backend.DIRECT_LAUNCH off): what direct launches save.
"""

import pytest
import torch
from conftest import DEVICE, HAS_CUDA, record
from test_network import model

from fused_resnet import bench, kernels


def gpu_cases():
    for batch in (1, 256):
        for impl in ("eager_channels_last", "fused", "fused_plain_launch"):
            yield pytest.param("float16", batch, impl, 224, marks=pytest.mark.gpu, id=f"float16-b{batch}-{impl}")


CPU_CASES = [pytest.param("float32", 1, impl, 32, id=f"cpu-float32-b1-{impl}") for impl in ("eager_channels_last",
                                                                                            "fused")]


@pytest.mark.parametrize("dtype,batch,impl,size", list(gpu_cases()) if HAS_CUDA else CPU_CASES)
def test_host_time_per_forward(benchmark, dtype, batch, impl, size, monkeypatch):
    built = impl.removesuffix("_plain_launch")
    if built != impl:
        monkeypatch.setattr(kernels.backend, "DIRECT_LAUNCH", False)
    ready, _ = bench.build_impls(model("resnet50"), [built], bench.DTYPES[dtype], DEVICE, batch, size)
    fn, x = ready[built]
    threads = torch.get_num_threads()
    if not HAS_CUDA:
        torch.set_num_threads(1)
    try:
        with kernels.use_backend("auto" if HAS_CUDA else "reference"):
            host_ms, _ = bench.host_time(lambda: fn(x), cuda=HAS_CUDA, forwards=10, repeats=15)
            benchmark.group = f"host time resnet50 {dtype} batch {batch}"
            benchmark.extra_info.update(host_ms=host_ms)
            benchmark.pedantic(lambda: bench.host_time(lambda: fn(x), cuda=HAS_CUDA, forwards=10, repeats=1),
                               rounds=3, iterations=1)
    finally:
        torch.set_num_threads(threads)
    assert host_ms > 0
    record(model="resnet50", impl=impl, dtype=dtype, batch=batch, size=size, host_ms=round(host_ms, 4))
