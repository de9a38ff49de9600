"""What our Python costs per forward on the CPU path: resnet50 fused (reference backend: folded
weights, plain torch ops) against torchvision eager channels_last, interleaved, one thread.

    python benchmarks/host_overhead.py [--size 32] [--rounds 15] [--forwards 20] [--json PATH]

At 1x3x32x32 the convs cost little, so the difference is what each side spends around them; the
fused model runs fewer ops (no BatchNorm, no separate ReLU), so with a lean call path it costs less.
Each round times `forwards` calls of each model in turn; the medians over rounds and their ratio
are printed (and written with provenance to --json).
"""

import argparse
import copy
import statistics
import time

import torch
import torchvision

from fused_resnet import bench, fuse, kernels
from fused_resnet.validate import synthetic_batchnorm


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--forwards", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
