"""Whole networks: eager, eager channels_last, torch.compile, cuDNN fused, fused, fused with chained
blocks (+ CUDA graphs at batch 1)."""

import pytest
from conftest import DEVICE, HAS_CUDA, measure

from fused_resnet import bench

ARCHS = ["resnet18", "resnet50"]
DTYPES = ["float16", "bfloat16", "float32"]
LARGE_BATCH = 256
_MODELS = {}


def model(arch):
    if arch not in _MODELS:
        _MODELS[arch] = bench.load_model(arch)[0]
    return _MODELS[arch]


def gpu_cases():
    for arch in ARCHS:
        for dtype in DTYPES:
            for batch in (1, LARGE_BATCH):
                impls = ["eager", "eager_channels_last", "compile", "cudnn_fused", "fused", "fused_chain",
                         "fused_chain3x3"]
                if batch == 1:
                    impls += ["fused_cuda_graph", "eager_channels_last_cuda_graph"]
                for impl in impls:
                    yield pytest.param(arch, dtype, batch, impl, marks=pytest.mark.gpu,
                                       id=f"{arch}-{dtype}-b{batch}-{impl}")


CPU_CASES = [pytest.param("resnet18", "float32", 2, impl, id=f"cpu-resnet18-float32-b2-{impl}")
             for impl in ("eager", "eager_channels_last", "fused", "fused_chain", "fused_chain3x3")]


@pytest.mark.parametrize("arch,dtype,batch,impl", list(gpu_cases()) if HAS_CUDA else CPU_CASES)
def test_network(benchmark, arch, dtype, batch, impl):
    size = 224 if HAS_CUDA else 64
    ready, skipped = bench.build_impls(model(arch), [impl], bench.DTYPES[dtype], DEVICE, batch, size)
    if impl in skipped:
        pytest.skip(skipped[impl])
    fn, x = ready[impl]
    benchmark.group = f"{arch} {dtype} batch {batch}"
    measure(benchmark, lambda: fn(x), model=arch, impl=impl, dtype=dtype, batch=batch, size=size)
