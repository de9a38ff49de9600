"""The command line: `python -m fused_resnet` or `fused-resnet`.

    fused-resnet verify --arch resnet50 --dtype float16      # same network? errors and top-1 agreement
    fused-resnet bench  --arch resnet50 --impl eager_channels_last compile fused
    fused-resnet                                              # resnet50: verify, then bench
"""

import argparse
import copy
import json
import shlex
import sys

import torch

from . import bench
from .convert import fuse
from .validate import compare

GPU_DEFAULTS = {"batch": 256, "size": 224, "dtype": "float16", "iters": 50,
                "impls": ["eager", "eager_channels_last", "compile", "cudnn_fused", "fused"]}
# About a minute on a 2-core CPU, verification included.
CPU_DEFAULTS = {"batch": 8, "size": 224, "dtype": "float32", "iters": 10,
                "impls": ["eager", "eager_channels_last", "fused"]}


class Progress:
    """One status line on stderr, rewritten in place on a terminal, printed plainly otherwise."""

    def __init__(self, enabled=True):
        self.enabled = enabled
        self.tty = sys.stderr.isatty()

    def __call__(self, message):
        if not self.enabled:
            return
        if self.tty:
            sys.stderr.write("\r\033[K" + message)
        else:
            sys.stderr.write(message + "\n")
        sys.stderr.flush()

    def done(self):
        if self.enabled and self.tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _common(p):
    p.add_argument("--arch", default="resnet50", help="torchvision architecture (default: resnet50)")
    p.add_argument("--dtype", choices=list(bench.DTYPES), default=None,
                   help="float16 on a GPU, float32 on a CPU unless given")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 256 on a GPU, 8 on a CPU)")
    p.add_argument("--size", type=int, default=None, help="image height and width (default: 224)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--weights", default=None,
                   help="state_dict file, or a torchvision weights name already in the cache "
                        "(default: random weights, BatchNorm statistics from synthetic batches)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress display")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="fused-resnet",
        description="Fuse a torchvision ResNet (BatchNorm folded, conv+bias+add+ReLU in one Triton kernel), "
                    "check it is the same network, and time it against PyTorch. With no command: "
                    "resnet50, verify then bench, on the best device present.",
    )
    sub = parser.add_subparsers(dest="command")
    verify = sub.add_parser("verify", help="compare the fused network with torchvision's")
    _common(verify)
    b = sub.add_parser("bench", help="time implementations side by side")
    _common(b)
    b.add_argument("--impl", nargs="+", default=None, choices=bench.IMPLS, metavar="IMPL",
                   help=f"some of: {', '.join(bench.IMPLS)}")
    b.add_argument("--iters", type=int, default=None, help="timed runs per implementation")
    return parser


def _settings(args, device):
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    for key in ("batch", "size", "dtype", "iters"):
        if getattr(args, key, None) is None:
            setattr(args, key, defaults[key])
    if getattr(args, "impl", None) is None:
        args.impl = list(defaults["impls"])
    if args.batch < 1 or args.size < 1:
        raise SystemExit("error: --batch and --size must be positive")
    return args


def _write_json(path, payload):
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")


def _prepare(args, progress, model, note):
    """The device, dtype and model (built unless given) that a command runs with."""
    device = bench.pick_device(args.device)
    _settings(args, device)
    if model is None:
        progress(f"building {args.arch}")
        model, note = bench.load_model(args.arch, args.weights)
    return device, bench.DTYPES[args.dtype], model, note


def run_verify(args, progress, model=None, note=None):
    device, dtype, model, note = _prepare(args, progress, model, note)
    progress("fusing")
    fused = fuse(model, dtype=dtype).to(device)
    reference = copy.deepcopy(model).to(device, dtype)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    progress("running both networks")
    result = compare(reference, fused, x)
    progress.done()
    path = bench.describe_path(device)
    print(f"verify {args.arch}  {args.dtype}  batch {args.batch}  {args.size}x{args.size}  on {device}")
    print(f"  weights: {note}")
    print(f"  fused path: {path}")
    print(f"  fused vs torchvision ({args.dtype} both): {result}")
    payload = {"arch": args.arch, "dtype": args.dtype, "batch": args.batch, "size": args.size,
               "device": str(device), "path": path, "weights": note, **result.as_dict()}
    _write_json(args.json, payload)
    return payload


def run_bench(args, progress, model=None, note=None, command=None):
    device, dtype, model, note = _prepare(args, progress, model, note)
    progress("preparing implementations")
    ready, skipped = bench.build_impls(model, args.impl, dtype, device, args.batch, args.size)
    cases = []
    for i, (name, (fn, x)) in enumerate(ready.items()):
        median, _ = bench.time_impl(fn, x, iters=args.iters,
                                    progress=lambda m, n=name, i=i: progress(f"[{i + 1}/{len(ready)}] {n}: {m}"))
        cases.append({"model": args.arch, "impl": name, "dtype": args.dtype, "batch": args.batch,
                      "size": args.size, "median_ms": round(median, 4),
                      "images_per_s": round(args.batch / median * 1e3, 1)})
    progress.done()
    base = next((c for c in cases if c["impl"] == bench.BASELINE), None)
    print(f"bench {args.arch}  {args.dtype}  batch {args.batch}  {args.size}x{args.size}  on {device}"
          f"  ({args.iters} timed runs, median)")
    print(f"  weights: {note}")
    print(f"  fused path: {bench.describe_path(device)}")
    header = f"  {'implementation':<22}{'median ms':>12}{'images/s':>12}{'vs ' + bench.BASELINE:>26}"
    print(header)
    print("  " + "-" * (len(header) - 2))
    for c in cases:
        speedup = f"{base['median_ms'] / c['median_ms']:.2f}x" if base else "-"
        print(f"  {c['impl']:<22}{c['median_ms']:>12.3f}{c['images_per_s']:>12.1f}{speedup:>26}")
    for name, reason in skipped.items():
        print(f"  {name:<22}{'skipped: ' + reason:>50}")
    payload = {"provenance": bench.provenance(command or "fused-resnet bench", device), "cases": cases}
    _write_json(args.json, payload)
    return payload


def main(argv=None):
    """Entry point of `python -m fused_resnet` and of the `fused-resnet` script."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    command = "fused-resnet " + shlex.join(argv)
    if args.command is None:
        args = parser.parse_args(["bench"])  # the embedded default: resnet50, verify then bench
        progress = Progress()
        device = bench.pick_device("auto")
        print(f"fused_resnet default run: {args.arch}, verify then bench on {device}\n")
        model, note = bench.load_model(args.arch, None)
        run_verify(argparse.Namespace(**{**vars(args), "json": None}), progress, model, note)
        print()
        run_bench(args, progress, model, note, command="python -m fused_resnet")
        return 0
    progress = Progress(enabled=not args.quiet)
    if args.command == "verify":
        run_verify(args, progress)
    else:
        run_bench(args, progress, command=command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
