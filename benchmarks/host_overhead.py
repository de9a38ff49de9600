"""What our Python costs per forward on the CPU path: resnet50 fused (reference backend: folded
weights, plain torch ops) against torchvision eager channels_last, interleaved, one thread.

    python benchmarks/host_overhead.py [--size 32] [--rounds 15] [--forwards 20] [--json PATH]

At 1x3x32x32 the convs cost little, so the difference is what each side spends around them; the
fused model runs fewer ops (no BatchNorm, no separate ReLU), so with a lean call path it costs less.
Each round times `forwards` calls of each model in turn; the medians over rounds and their ratio
are printed (and written with provenance to --json).

    python benchmarks/host_overhead.py --launches [--batch 256] [--size 224] [--rounds 15] [--calls 1000]
                                       [--json PATH]

What the Python of each kernel launch of a fused resnet50 fp16 forward on an H100 costs, without
the H100: the forward's launches as precompile.compile_only lists them, each compiled for the
H100 here, then launched on a stand-in for the H100's driver whose launcher does nothing
(StandInDriver), three ways: Triton's plain `kernel[grid](...)` (bind, specialize, look up), the
compiled kernel called directly with the arguments bound at the first launch, and the plan's
KernelLaunch call (which goes direct): the median over rounds of `calls` calls each. On a GPU each
launch also pays the launcher's own call into the driver, the same for all three. Beside them,
`first`: each launch's first call in this process, which finds its kernel in Triton's disk cache
(compiled there by this script's workers, as a first forward's are) and loads it, as a first
forward with warm caches does, less what a GPU adds (loading the module onto it, the launcher).
"""

import argparse
import copy
import os
import statistics
import time

import torch
import torchvision
from fused_resnet.kernels import backend, precompile

from fused_resnet import bench, fuse, kernels
from fused_resnet.validate import synthetic_batchnorm


class StandInDriver:
    """Triton's active driver (triton.runtime.driver.set_active) for an H100 that is not there, as
    much of one as compiling and launching a kernel ask. Nothing runs: its launcher records the
    arguments of each launch in `launched` (with `record`) and returns."""

    def __init__(self, record=True):
        from triton.backends.compiler import GPUTarget

        self.launched, self.record, self.utils = [], record, self
        self.target = GPUTarget("cuda", precompile.TARGETS["H100"].capability, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_device_properties(self, device):
        h100 = precompile.TARGETS["H100"]
        return {"max_shared_mem": h100.shared_memory, "multiprocessor_count": h100.multiprocessors,
                "max_num_regs": 65536, "warpSize": 32}

    def load_binary(self, name, kernel, shared, device):
        return object(), object(), 0, 0, 1024  # module, function, registers, spills, threads a program

    def launcher_cls(self, src, metadata):
        return lambda *args: self.record and self.launched.append(args)


def listed_launches(calls, gpu="H100", every_candidate=False):
    """([(KernelLaunch, its tensors)], compile jobs): each kernel launch that calls() makes on CPU
    tensors planned for `gpu`, as precompile.compile_only lists them (no kernel runs)."""
    launches, record = [], precompile._Session.record

    def listing(session, launch, tensors):
        launches.append((launch, tensors))
        return record(session, launch, tensors)

    precompile._Session.record = listing
    try:
        with precompile.compile_only(gpu, every_candidate=every_candidate) as jobs:
            calls()
    finally:
        precompile._Session.record = record
    return launches, jobs


def live_launch(launch, config):
    """A compiled (on_cuda) KernelLaunch of `launch`'s kernel and arguments in `config`."""
    return backend.KernelLaunch(launch.kernel, launch.grid, launch.args, on_cuda=True, config=config,
                                scratch=launch.scratch, descriptors=launch.descriptors)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=None, help="default: 32, or 224 with --launches")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--forwards", type=int, default=20)
    parser.add_argument("--json", default=None)
    parser.add_argument("--launches", action="store_true", help="each launch's Python, plain and direct (above)")
    parser.add_argument("--batch", type=int, default=256, help="with --launches")
    parser.add_argument("--calls", type=int, default=1000, help="with --launches: calls of each launch a round")
    args = parser.parse_args()
    if args.launches:
        return launch_costs(args)
    args.size = args.size or 32
    torch.set_num_threads(1)
    model = synthetic_batchnorm(torchvision.models.resnet50(), size=32)
    impls = {"eager_channels_last": copy.deepcopy(model).to(memory_format=torch.channels_last),
             "fused": fuse(model)}
    x = torch.randn(1, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)
    times = {name: [] for name in impls}
    with torch.inference_mode(), kernels.use_backend("reference"):
        for fn in impls.values():
            for _ in range(5):
                fn(x)
        for _ in range(args.rounds):
            for name, fn in impls.items():
                t0 = time.perf_counter()
                for _ in range(args.forwards):
                    fn(x)
                times[name].append((time.perf_counter() - t0) * 1e3 / args.forwards)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    ratio = medians["fused"] / medians["eager_channels_last"]
    cases = [{"model": "resnet50", "impl": name, "dtype": "float32", "batch": 1, "size": args.size,
              "host_ms": round(medians[name], 4), **{k: round(v, 4) for k, v in bench.spread(ts).items()}}
             for name, ts in times.items()]
    for c in cases:
        print(f"{c['impl']:<22} median {c['host_ms']:.3f} ms per forward (q1-q3 {c['q1_ms']:.3f}-{c['q3_ms']:.3f})")
    print(f"fused / eager_channels_last: {ratio:.3f}x  (CPU, reference path, 1 thread, {args.rounds} interleaved "
          f"rounds of {args.forwards} forwards, torch {torch.__version__})")
    if args.json:
        bench.write_results(args.json, "python benchmarks/host_overhead.py", torch.device("cpu"), cases,
                            fused_over_eager=round(ratio, 4))


def launch_costs(args):
    import triton

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("--launches compiles for an H100: run it without TRITON_INTERPRET=1")
    size = args.size or 224
    net = fuse(torchvision.models.resnet50().eval(), dtype=torch.float16)
    x = torch.randn(args.batch, 3, size, size).half().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        launches, jobs = listed_launches(lambda: net(x))
    precompile.compile_jobs(jobs, workers=os.cpu_count() or 1)  # into Triton's cache, for the JIT to find
    triton.runtime.driver.set_active(StandInDriver(record=False))
    rows = [launch_row(launch, tensors, launch.config if launch.config is not None else configs_of(jobs, launch),
                       args.rounds, args.calls) for launch, tensors in launches]
    totals = {way: sum(r[way] for r in rows) for way in ("first", "plain", "direct", "planned")}
    for r in rows:
        print(f"{r['kernel']:<34} plain {r['plain']:6.1f} us   direct {r['direct']:5.1f} us   "
              f"planned {r['planned']:5.1f} us")
    # (The listing holds each way a first call times: the stem's four schedules, of which a forward runs one.)
    print(f"the {len(rows)} launches listed for one forward: plain {totals['plain'] / 1e3:.3f} ms, direct "
          f"{totals['direct'] / 1e3:.3f} ms, planned {totals['planned'] / 1e3:.3f} ms of Python (resnet50 fp16, "
          f"batch {args.batch}, {size}x{size}, compiled for an H100, stand-in driver; torch {torch.__version__}, "
          f"triton {triton.__version__}); their first calls, each kernel from Triton's disk cache: "
          f"{totals['first'] / 1e6:.2f} s")
    if args.json:
        cases = [{"model": "resnet50", "impl": "fused", "dtype": "float16", "batch": args.batch, "launch": way,
                  "launches": len(rows), "launch_python_ms": round(totals[way] / 1e3, 4)} for way in totals]
        bench.write_results(args.json, f"python benchmarks/host_overhead.py --launches --batch {args.batch} "
                            f"--size {size}", torch.device("cpu"), cases,
                            what_ran="CPU: each launch's Python, kernels compiled for an H100, stand-in driver",
                            per_launch=rows)
    return rows


def launch_row(launch, tensors, config, rounds, calls):
    """The Python a call of this launch costs, in microseconds, each of the three ways, and its first."""
    live = live_launch(launch, config)
    t0 = time.perf_counter()
    live(*tensors)  # plain, the first time (it finds the kernel compiled in Triton's cache), then direct
    first = (time.perf_counter() - t0) * 1e6
    live(*tensors)
    kernel, grid, kwargs = live.bound
    full = tensors + (() if live.take_scratch is None else live.take_scratch(tensors[0]))
    run, rest, _ = live.direct
    ways = {"plain": lambda: kernel[grid](*full, **kwargs), "direct": lambda: run(*full, *rest),
            "planned": lambda: live(*tensors)}
    return {"kernel": launch.kernel.__name__, "op": launch.op, "key": launch.key, "first": round(first, 1),
            **{way: round(per_call_us(fn, rounds, calls), 2) for way, fn in ways.items()}}


def configs_of(jobs, launch):
    """The config compile_only listed for `launch` (the table's, else its first candidate)."""
    return next(job.config for job in jobs if (job.op, job.key) == (launch.op, launch.key))


def per_call_us(fn, rounds, calls):
    """fn's median time a call over `rounds` rounds of `calls` calls, in microseconds."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) * 1e6 / calls)
    return statistics.median(times)


if __name__ == "__main__":
    main()
