"""Test setup: without CUDA the Triton kernels run under the Triton interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is first imported, so this happens at the top of the
first conftest, before anything imports kernels.
"""

import contextlib
import importlib.util
import math
import os
import pathlib
import sys
import textwrap

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")

# Kernel tolerances relative to the largest |expected|: fp32 accumulation over up to ~20k terms,
# plus one rounding of the output. bf16 allows a whole unit in the last place because the
# interpreter truncates instead of rounding on the fp32 -> bf16 cast.
KERNEL_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (the folder is scripts, not a package)."""
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def traced(module, x):
    """torch.compile(module, fullgraph=True) called on x, through a backend that keeps the FX graph
    Dynamo hands it: (the compiled call's output, that graph's call_function nodes)."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(module, backend=keep, fullgraph=True)(x)
    return out, [n for n in graphs[0].graph.nodes if n.op == "call_function"]


def run_compiling(script, tmp_path, *args):
    """Run `script` (with `args`) in a child Python without TRITON_INTERPRET, so that it compiles
    (for a GPU it need not have), with Triton's and our caches under tmp_path and tests/ and
    benchmarks/ importable; the JSON its last line prints."""
    import json
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = pathlib.Path(__file__).resolve().parent
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton"), FUSED_RESNET_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(here), str(here.parent / "benchmarks"), env.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# For scripts that run_compiling runs: `launches`, each kernel launch (KernelLaunch, its tensors)
# that a fused resnet50 in fp16 makes for an H100 in a bottleneck with dense 1x1s and box tiles
# (descriptors), one at batch 1 (split-K, with its scratch), the stem (its pooled kernel and
# space-to-depth copy) and the head, as precompile.compile_only lists them (no kernel runs), and
# `jobs`, the compile jobs of every candidate config; and benchmarks/host_overhead.py's
# StandInDriver, a stand-in for an H100's Triton driver.
H100_LAUNCHES = textwrap.dedent("""
    import torch, torchvision
    from fused_resnet import fuse
    from host_overhead import StandInDriver, listed_launches, live_launch

    torch.manual_seed(0)
    net = fuse(torchvision.models.resnet50().eval(), dtype=torch.float16)
    cl = lambda *shape: torch.randn(*shape).half().contiguous(memory_format=torch.channels_last)
    launches, jobs = listed_launches(lambda: (net.layer1[0](cl(2, 64, 16, 16)), net.layer4[0](cl(1, 1024, 14, 14)),
                                              net.conv1(cl(1, 3, 64, 64)), net.avgpool(cl(1, 2048, 7, 7))),
                                     every_candidate=True)
""")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: compiled Triton kernels")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _bounds_checked():
    """Without a GPU every interpreted kernel in every test is bounds-checked: a load, store or atomic
    outside the tensors its launch was given fails the test (on a GPU, an illegal address)."""
    if HAS_CUDA or os.environ.get("FUSED_RESNET_NO_BOUNDS_CHECK"):
        yield
        return
    from fused_resnet.kernels import backend

    with backend.bounds_checked():
        yield


def randomize_bn(model: nn.Module, generator_seed: int = 0) -> nn.Module:
    """Give every BatchNorm2d non-trivial statistics and affine parameters, in place.

    With the defaults (mean 0, var 1, weight 1, bias 0) folding is nearly the identity and a test
    of it proves nothing.
    """
    g = torch.Generator().manual_seed(generator_seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return model


def where_mismatch(actual: torch.Tensor, expected: torch.Tensor) -> str:
    """A line that says where two tensors differ most, for assertion messages."""
    diff = (actual.double() - expected.double()).abs()
    diff = torch.nan_to_num(diff, nan=float("inf"))
    idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    return (f"max |diff| {diff.max().item():.3e} at index {idx}: actual {actual[idx].item():.6g}, "
            f"expected {expected[idx].item():.6g}; {int((diff > 0).sum())} of {diff.numel()} differ")


def assert_close(actual, expected, *, rtol, atol):
    """Element-wise |actual - expected| <= atol + rtol * |expected|, NaN matching NaN."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.double().cpu()
    e = expected.double().cpu()
    ok = torch.isclose(a, e, rtol=rtol, atol=atol, equal_nan=True)
    assert bool(ok.all()), where_mismatch(a, e)


def results_of(monkeypatch, module, name):
    """A list that records what each call of module.name returns while the test runs (the function
    itself still runs): which of the plan's helpers ran, and on what."""
    results = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args, **kwargs: results.append(real(*args, **kwargs)) or results[-1])
    return results


def make_case(n, c, h, w, k, r, s, groups=1, dtype=torch.float32, device=DEVICE, bias=True):
    """Input, weight (channels_last, as FusedConv2d keeps it) and bias with O(1) outputs."""
    x = torch.randn(n, c, h, w, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    fan_in = c // groups * r * s
    weight = (torch.randn(k, c // groups, r, s, device=device) / math.sqrt(fan_in)).to(dtype)
    weight = weight.contiguous(memory_format=torch.channels_last)
    b = torch.randn(k, device=device).to(dtype) if bias else None
    return x, weight, b


def conv_expected(x, weight, bias, stride, padding, dilation, groups, residual, relu):
    """The float64 answer from the same (already rounded) operands, via F.conv2d on the CPU."""
    y = F.conv2d(x.cpu().double(), weight.cpu().double(), None if bias is None else bias.cpu().double(),
                 stride, padding, dilation, groups)
    if residual is not None:
        y = y + residual.cpu().double()
    return torch.relu(y) if relu else y


# Each variant of the conv kernel that a config can name, as (C, K, kernel, stride, padding, hw,
# config switches): the candidates a first call times cover few of them, the sweep may pick any,
# so tests compile each (for an H100 on any machine; run on a GPU where there is one).
COMPILED_VARIANTS = [
    (64, 64, 3, 1, 1, 14, {"FLAT_LOOP": 0, "USE_TMA": 0, "BOX_W": 0}),
    (64, 64, 3, 1, 1, 14, {"FLAT_LOOP": 1, "USE_TMA": 0, "BOX_W": 0}),
    (64, 64, 3, 1, 1, 14, {"FLAT_LOOP": 1, "USE_TMA": 0, "BOX_W": 8}),
    (128, 64, 3, 1, 2, 9, {"FLAT_LOOP": 1, "USE_TMA": 0, "BOX_W": 4}),
    (128, 64, 3, 2, 1, 14, {"FLAT_LOOP": 1, "USE_TMA": 0, "BOX_W": 4}),  # stride 2: the 5-D parity view
    # 48 channels in blocks of 32: the channel mask kept (no C_DIVISOR); 49 taps: bounds compared per tap
    (48, 64, 3, 1, 1, 14, {"FLAT_LOOP": 1, "USE_TMA": 0, "BOX_W": 0}),
    (16, 32, 7, 1, 3, 12, {"FLAT_LOOP": 1, "USE_TMA": 0, "BOX_W": 0}),
    (64, 256, 1, 1, 0, 14, {"FLAT_LOOP": 1, "USE_TMA": 0, "BOX_W": 0}),
    (64, 256, 1, 1, 0, 14, {"FLAT_LOOP": 1, "USE_TMA": 1, "BOX_W": 0}),
    (3, 64, 7, 2, 3, 29, {"FLAT_LOOP": 1, "USE_TMA": 0, "BOX_W": 0, "ROWS": 1}),
    (3, 64, 7, 2, 3, 29, {"FLAT_LOOP": 1, "USE_TMA": 0, "BOX_W": 0, "ROWS": 0}),
    # not a config switch but the plan's igemm.SPACE_TO_DEPTH: the stem as a 4x4/1 conv over 16 channels
    (3, 64, 7, 2, 3, 29, {"FLAT_LOOP": 1, "USE_TMA": 0, "BOX_W": 0, "ROWS": 1, "SPACE_TO_DEPTH": 1}),
    (3, 64, 7, 2, 3, 29, {"FLAT_LOOP": 1, "USE_TMA": 0, "BOX_W": 0, "ROWS": 0, "SPACE_TO_DEPTH": 1}),
]
VARIANT_TILES = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}


def variant_case(case, dtype):
    """A COMPILED_VARIANTS case as it runs: (igemm.SPACE_TO_DEPTH for it, the config to force, and
    the conv's x, weight, bias, stride, padding and residual; the ReLU is on)."""
    c, k, ksize, stride, padding, hw, switches = case
    switches = dict(switches)
    blocks = bool(switches.pop("SPACE_TO_DEPTH", 0))
    x, weight, bias = make_case(2, c, hw, hw, k, ksize, ksize, 1, dtype)
    p = (hw + 2 * padding - ksize) // stride + 1
    residual = torch.randn(2, k, p, p, device=DEVICE).to(dtype)
    return blocks, {**VARIANT_TILES, **switches}, (x, weight, bias, stride, padding, residual)


def everywhere(dtypes):
    """(dtype, where) parameters of a test of GPU configs: on a GPU ("gpu", marked so) compiled, in
    each dtype; on a CPU ("cpu") the same configs, each under the interpreter as the GPU would run
    it, in fp32 and fp16 (bf16 takes fp16's path there: the interpreter upcasts the dots' operands)."""
    gpu = [pytest.param(dtype, "gpu", id=f"{dtype}-gpu", marks=pytest.mark.gpu) for dtype in dtypes]
    cpu = [pytest.param(dtype, "cpu", id=f"{dtype}-cpu",
                        marks=pytest.mark.skipif(HAS_CUDA, reason="on a GPU the compiled case runs"))
           for dtype in dtypes if dtype != torch.bfloat16]
    return gpu + cpu


@contextlib.contextmanager
def interpreted_configs():
    """A list that records, in order, each config the interpreted kernels launched inside ran
    (configs.interpreted's answers)."""
    from unittest import mock

    from fused_resnet.kernels import configs

    ran, interpreted = [], configs.interpreted
    with mock.patch.object(configs, "interpreted", lambda default: ran.append(interpreted(default)) or ran[-1]):
        yield ran


def run_forced(config, fn):
    """fn() with `config` forced on the tuned launches inside (configs.override), checking that it
    reached them: on a GPU they looked their config up, under the interpreter each ran `config`
    itself (configs.interpreted)."""
    from fused_resnet.kernels import configs

    with configs.override(config) as asked, interpreted_configs() as ran:
        out = fn()
    assert (asked if HAS_CUDA else ran) and all(c == config for c in ran), (config, ran)
    return out


def watch_descriptor_allocator(monkeypatch):
    """A list that records each scratch allocator the kernels hand Triton: one appears when a
    kernel with tensor descriptors is launched for the first time in the test."""
    import contextvars

    import triton
    from fused_resnet.kernels import backend

    monkeypatch.setattr(backend, "_allocator_given", contextvars.ContextVar("test_allocator", default=False))
    allocators = []
    real = triton.set_allocator
    monkeypatch.setattr(triton, "set_allocator", lambda fn: (allocators.append(fn), real(fn)))
    return allocators


def compile_ahead(calls):
    """On a GPU, compile at once, in parallel processes, every kernel that `calls` (functions
    that launch kernels) would compile, so that tests which then launch them one by one find each
    in Triton's cache, as fused_resnet.warmup does for a model. Elsewhere, nothing. A kernel
    that fails to compile here fails again, with its error, in the test that launches it."""
    if not HAS_CUDA:
        return
    from fused_resnet.kernels import precompile

    with precompile.compile_only() as jobs:
        for call in calls:
            call()
    precompile.compile_jobs(jobs, workers=min(16, os.cpu_count() or 1))
