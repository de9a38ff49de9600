"""The command line: `python -m fused_resnet` or `fused-resnet`.

    fused-resnet verify --arch resnet50 --dtype float16      # same network? errors and top-1 agreement
    fused-resnet bench  --arch resnet50 --impl eager_channels_last compile fused
    fused-resnet profile --arch resnet50 --batch 256 --dtype float16 --plot roofline.png
    fused-resnet                                              # resnet50: verify, then bench
"""

import argparse
import copy
import importlib.util
import json
import os
import shlex
import sys

import torch

from . import bench
from . import profile as fusion_profile
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
    p.add_argument("--arch", default="resnet50", choices=bench.ARCHS, metavar="ARCH",
                   help=f"torchvision architecture, one of: {', '.join(bench.ARCHS)} (default: %(default)s)")
    p.add_argument("--dtype", choices=list(bench.DTYPES), default=None,
                   help="float16 on a GPU, float32 on a CPU unless given")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 256 on a GPU, 8 on a CPU)")
    p.add_argument("--size", type=int, default=None, help="image height and width (default: 224)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="where to run: the GPU if there is one ('auto'), or 'cuda' or 'cpu' (default: %(default)s)")
    p.add_argument("--weights", default=None,
                   help="state_dict file, or a torchvision weights name already in the cache "
                        "(default: random weights, BatchNorm statistics from synthetic batches)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the result as JSON (default: none)")
    p.add_argument("--quiet", action="store_true", help="no progress display")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="fused-resnet",
        description="Fuse a torchvision ResNet (BatchNorm folded, conv+bias+add+ReLU in one Triton kernel), "
                    "check it is the same network, and time it against PyTorch. With no command: "
                    "resnet50, verify then bench, on the best device present.",
        epilog=f"architectures: {', '.join(bench.ARCHS)}",
    )
    sub = parser.add_subparsers(dest="command")
    verify = sub.add_parser("verify", help="compare the fused network with torchvision's")
    _common(verify)
    b = sub.add_parser("bench", help="time implementations side by side")
    _common(b)
    b.add_argument("--impl", nargs="+", default=None, choices=bench.IMPLS, metavar="IMPL",
                   help=f"some of: {', '.join(bench.IMPLS)} (default on a GPU: {' '.join(GPU_DEFAULTS['impls'])}; "
                        f"on a CPU: {' '.join(CPU_DEFAULTS['impls'])})")
    b.add_argument("--iters", type=int, default=None,
                   help=f"timed runs per implementation (default: {GPU_DEFAULTS['iters']} on a GPU, "
                        f"{CPU_DEFAULTS['iters']} on a CPU)")
    p = sub.add_parser("profile", help="per-layer bytes, FLOPs and (on a GPU) time, unfused vs fused; ablation")
    _common(p)
    p.add_argument("--plot", default=None, metavar="PATH", help="write a roofline chart (PNG) here (default: none)")
    p.add_argument("--iters", type=int, default=20,
                   help="timed runs per layer and per ablation step on a GPU (default: %(default)s)")
    p.add_argument("--no-ablation", dest="ablation", action="store_false",
                   help="skip the ablation (one fusion added at a time)")
    p.add_argument("--readme", default=None, metavar="PATH",
                   help="write the totals and the ablation between the profile markers of this README")
    return parser


def check_args(args):
    """Every argument checked before any work starts; raises bench.UsageError naming the one at fault."""
    for key in ("batch", "size", "iters"):
        value = getattr(args, key, None)
        if value is not None and value < 1:
            raise bench.UsageError(f"--{key} must be at least 1, got {value}")
    bench.resolve_weights(args.arch, args.weights)
    bench.pick_device(args.device)
    for option in ("json", "plot"):
        _check_output_path(f"--{option}", getattr(args, option, None))
    if getattr(args, "plot", None):
        if importlib.util.find_spec("matplotlib") is None:
            raise bench.UsageError("--plot needs matplotlib: pip install 'fused_resnet[plot]'")
        dtype = bench.DTYPES[args.dtype or GPU_DEFAULTS["dtype"]]
        if fusion_profile.roof(bench.pick_device(args.device), dtype) is None:
            raise bench.UsageError("--plot: no roofs are known for this GPU, and the chart needs them")
    readme = getattr(args, "readme", None)
    if readme:
        if not args.ablation:
            raise bench.UsageError("--readme needs the ablation; drop --no-ablation")
        if not os.path.isfile(readme) or not os.access(readme, os.W_OK):
            raise bench.UsageError(f"--readme {readme}: no writable file there")
        with open(readme) as f:
            text = f.read()
        if fusion_profile.README_BEGIN not in text or fusion_profile.README_END not in text:
            raise bench.UsageError(f"--readme {readme}: the file has no profile markers "
                                   f"({fusion_profile.README_BEGIN} ... {fusion_profile.README_END})")


def _check_output_path(option, path):
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise bench.UsageError(f"{option} {path}: is a folder; give a file name")
    if not os.path.isdir(folder):
        raise bench.UsageError(f"{option} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise bench.UsageError(f"{option} {path}: the folder {folder} is not writable")


def _settings(args, device):
    # The profile's analytic columns cost nothing on any device: it takes the GPU's defaults everywhere.
    defaults = GPU_DEFAULTS if device.type == "cuda" or args.command == "profile" else CPU_DEFAULTS
    for key in ("batch", "size", "dtype", "iters"):
        if getattr(args, key, None) is None:
            setattr(args, key, defaults[key])
    if getattr(args, "impl", None) is None:
        args.impl = list(defaults["impls"])
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


WARMUP_NOTES = {"compile": "the first call compiles", "fused": "the first call compiles and configures the kernels",
                "fused_cuda_graph": "the first call compiles, configures and captures the graph",
                "eager_channels_last_cuda_graph": "the first call captures the graph"}


def run_bench(args, progress, model=None, note=None, command=None):
    device, dtype, model, note = _prepare(args, progress, model, note)
    progress("preparing implementations")
    ready, skipped = bench.build_impls(model, args.impl, dtype, device, args.batch, args.size)
    cases = []
    for i, (name, (fn, x)) in enumerate(ready.items()):
        progress(f"[{i + 1}/{len(ready)}] {name}: first call" + (f" ({_warmup_note(name, device)})"
                                                                  if _warmup_note(name, device) else ""))
        first_s = bench.first_call(lambda fn=fn, x=x: fn(x), cuda=device.type == "cuda")
        _, times = bench.time_impl(fn, x, iters=args.iters, warmup_note=_warmup_note(name, device),
                                   progress=lambda m, n=name, i=i: progress(f"[{i + 1}/{len(ready)}] {n}: {m}"))
        stats = {k: round(v, 4) for k, v in bench.spread(times).items()}
        cases.append({"model": args.arch, "impl": name, "dtype": args.dtype, "batch": args.batch,
                      "size": args.size, **stats, "iters": len(times), "first_call_s": round(first_s, 3),
                      "images_per_s": round(args.batch / stats["median_ms"] * 1e3, 1)})
    progress.done()
    base = next((c for c in cases if c["impl"] == bench.BASELINE), None)
    print(f"bench {args.arch}  {args.dtype}  batch {args.batch}  {args.size}x{args.size}  on {device}"
          f"  ({args.iters} timed runs after the first call and warm-up: median, and the middle half of the "
          "runs as q1-q3)")
    print(f"  weights: {note}")
    print(f"  fused path: {bench.describe_path(device)}")
    header = (f"  {'implementation':<31}{'first call s':>13}{'median ms':>11}{'q1-q3 ms':>19}{'images/s':>11}"
              f"{'vs ' + bench.BASELINE:>25}")
    print(header)
    print("  " + "-" * (len(header) - 2))
    noisy = []
    for c in cases:
        speedup = "-"
        if base:
            speedup = f"{base['median_ms'] / c['median_ms']:.2f}x"
            if c is not base and bench.within_noise(c, base):
                speedup += " (noise)"
                noisy.append(c["impl"])
        quartiles = f"{c['q1_ms']:.3f}-{c['q3_ms']:.3f}"
        print(f"  {c['impl']:<31}{c['first_call_s']:>13.2f}{c['median_ms']:>11.3f}{quartiles:>19}"
              f"{c['images_per_s']:>11.1f}{speedup:>25}")
    for name, reason in skipped.items():
        print(f"  {name:<31}{'skipped: ' + reason:>50}")
    if noisy:
        print(f"  (noise): {', '.join(noisy)} differ from {bench.BASELINE} by less than the spread of the runs "
              "(q1-q3); the ratio is not a measured difference. Run with more --iters, on a quieter machine.")
    payload = {"provenance": bench.provenance(command or "fused-resnet bench", device), "cases": cases}
    _write_json(args.json, payload)
    return payload


def _warmup_note(name, device):
    """What the warm-up calls of an implementation do besides warming up: compiling, autotuning."""
    return WARMUP_NOTES.get(name, "") if name == "compile" or device.type == "cuda" else ""


def _profile_command(args):
    """The command that reproduces a profile, as the README quotes it."""
    return (f"fused-resnet profile --arch {args.arch} --batch {args.batch} --size {args.size} --dtype {args.dtype}"
            + (" --device cpu" if args.device == "cpu" else ""))


def run_profile(args, progress, command=None):
    device, dtype, model, note = _prepare(args, progress, None, None)
    result = fusion_profile.profile(model, batch=args.batch, size=args.size, dtype=dtype, device=device,
                                    iters=args.iters, ablation=args.ablation, progress=progress)
    progress.done()
    title = f"{args.arch} {args.dtype} batch {args.batch} {args.size}x{args.size}"
    print(f"profile {title} on {device}")
    if result["analytic_only"]:
        print("  analytic only (no GPU): bytes and FLOPs computed from shapes and dtype; nothing timed")
    else:
        print(f"  measured: each layer's kernels timed alone with CUDA events (median of {args.iters}); "
              f"fused path: {bench.describe_path(device)}")
    print("  bytes: global-memory reads and writes counted from shapes, each operand once (a lower bound)\n")
    print(fusion_profile.format_table(result))
    payload = {"provenance": bench.provenance(command or "fused-resnet profile", device), "arch": args.arch,
               "dtype": args.dtype, "batch": args.batch, "size": args.size, "weights": note, **result}
    _write_json(args.json, payload)
    if args.readme:
        bench.write_between_markers(args.readme, fusion_profile.README_BEGIN, fusion_profile.README_END,
                                    fusion_profile.readme_block(result, _profile_command(args)))
    if args.plot:
        fusion_profile.plot_roofline(result, args.plot, title)
        print(f"\nroofline chart: {args.plot}")
    return payload


def main(argv=None):
    """Entry point of `python -m fused_resnet` and of the `fused-resnet` script."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    command = "fused-resnet " + shlex.join(argv)
    default_run = args.command is None
    if default_run:
        args = parser.parse_args(["bench"])  # the embedded default: resnet50, verify then bench
    try:
        check_args(args)
        if default_run:
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
        elif args.command == "profile":
            run_profile(args, progress, command=command)
        else:
            run_bench(args, progress, command=command)
    except bench.UsageError as err:
        sys.stderr.write(f"fused-resnet: error: {err}\n")
        raise SystemExit(2) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
