"""Benchmark setup: GPU cases skip with a reason on a CPU; a small CPU subset still runs.

    pytest benchmarks/ --benchmark-group-by=group                      # comparisons, side by side
    pytest benchmarks/ --results benchmarks/results/                   # also keep a results file

Each timed function waits for the GPU before it returns, and the median from
triton.testing.do_bench goes into extra_info["do_bench_ms"]. Autotuning and compilation happen in
the warm-up, before pytest-benchmark starts timing.
"""

import json
import os
import re
import shlex
import sys

import pytest
import torch

from fused_resnet import bench

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
_CASES = []
bench.tuned_cudnn(DEVICE)  # every eager and cuDNN baseline here runs cuDNN's fastest algorithm


def pytest_addoption(parser):
    parser.addoption("--results", default=None, metavar="DIR",
                     help="write the measured cases as one results JSON file (with provenance) into DIR")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="GPU benchmark: no CUDA GPU here (CPU timings would say nothing about it)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def sync():
    if HAS_CUDA:
        torch.cuda.synchronize()


def measure(benchmark, fn, *, warmup=3, **case):
    """Time fn with pytest-benchmark (synchronized) and record the case for the results file."""

    def timed():
        out = fn()
        sync()
        return out

    with torch.no_grad():
        for _ in range(warmup):  # autotune and compile before timing
            timed()
        if HAS_CUDA:
            import triton.testing

            benchmark.extra_info["do_bench_ms"] = triton.testing.do_bench(fn, return_mode="median")
        benchmark.extra_info.update(case)
        benchmark.pedantic(timed, rounds=20 if HAS_CUDA else 3, iterations=1, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable: the function ran once, nothing was timed
        return
    median_ms = benchmark.stats.stats.median * 1e3
    entry = {**case, "median_ms": round(median_ms, 4)}
    if "batch" in case:
        entry["images_per_s"] = round(case["batch"] / median_ms * 1e3, 1)
    if "do_bench_ms" in benchmark.extra_info:
        entry["do_bench_ms"] = round(benchmark.extra_info["do_bench_ms"], 4)
    _CASES.append(entry)


def record(**case):
    """Keep a measured case (any keys) for the results file."""
    _CASES.append(case)


def pytest_sessionfinish(session, exitstatus):
    out_dir = session.config.getoption("--results")
    if not out_dir or not _CASES:
        return
    prov = bench.provenance("pytest " + shlex.join(sys.argv[1:]), DEVICE)
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", prov["gpu"] or "cpu").strip("-").lower()
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{prov['date'][:10]}-{gpu}-{prov['commit'] or 'nocommit'}")
    path, n = f"{stem}.json", 1
    while os.path.exists(path):  # another run of the same day and commit: keep both
        n += 1
        path = f"{stem}-{n}.json"
    with open(path, "w") as f:
        json.dump({"provenance": prov, "cases": _CASES}, f, indent=2)
        f.write("\n")
