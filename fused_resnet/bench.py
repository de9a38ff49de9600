"""What the command line and the benchmark suites share: models, implementations, timing, provenance.

An implementation is a name and a callable that runs one batch and returns the logits:

    eager                 torchvision, NCHW
    eager_channels_last   torchvision, NHWC
    compile               torch.compile of the channels_last model (max-autotune on a GPU)
    cudnn_fused           BatchNorm folded, cuDNN's fused conv+bias(+add)+ReLU where it applies
    fused                 fused_resnet: every conv one Triton kernel
    fused_chain           the same with fuse(chain_blocks=True): chained blocks' last and next first conv one kernel
    fused_chain3x3        fused_chain with chain_3x3=True too: a block's 3x3 conv inside its last conv's kernel
    fused_cuda_graph      fused_resnet replayed from a CUDA graph (fused_resnet.CUDAGraphModule)
    eager_channels_last_cuda_graph   torchvision NHWC replayed from a CUDA graph, the like-for-like baseline
"""

import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import time

import torch
import torchvision

from . import kernels
from .convert import fuse
from .graphs import CUDAGraphModule
from .validate import synthetic_batchnorm

# The architectures fuse() covers, as torchvision names them (each also with replace_stride_with_dilation).
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
         "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")
IMPLS = ("eager", "eager_channels_last", "compile", "cudnn_fused", "fused", "fused_chain", "fused_chain3x3",
         "fused_cuda_graph", "eager_channels_last_cuda_graph")

# The fusion ablation, one step at a time: (step, kernels backend, fuse() switches). "unfused" is
# torchvision itself; each later step adds one fusion to the one before it.
NO_FUSIONS = dict(residual_epilogue=False, merge_downsample=False, stem_maxpool=False, avgpool_fc=False)
ABLATION = (
    ("unfused", None, None),
    ("fold", "reference", NO_FUSIONS),
    ("epilogue", "triton", NO_FUSIONS),
    ("residual", "triton", dict(NO_FUSIONS, residual_epilogue=True)),
    ("downsample", "triton", dict(NO_FUSIONS, residual_epilogue=True, merge_downsample=True)),
    ("stem", "triton", dict(NO_FUSIONS, residual_epilogue=True, merge_downsample=True, stem_maxpool=True)),
    ("head", "triton", {}),
    ("chain", "triton", dict(chain_blocks=True)),
    ("chain3x3", "triton", dict(chain_blocks=True, chain_3x3=True)),
)
ABLATION_LABELS = {
    "unfused": "torchvision: conv, BN, ReLU, add, ReLU as separate ops",
    "fold": "BN folded; conv, bias, ReLU, add still separate (reference backend)",
    "epilogue": "+ bias and ReLU in the conv's epilogue (Triton)",
    "residual": "+ shortcut add and ReLU in the last conv's epilogue",
    "downsample": "+ projection shortcut merged into the last conv's GEMM",
    "stem": "+ stem conv and max pooling in one kernel",
    "head": "+ head average pooling and fc in one kernel (fuse's defaults)",
    "chain": "+ a block's last conv and the next block's first in one kernel (chain_blocks=True)",
    "chain3x3": "+ a block's 3x3 conv in its last conv's kernel (chain_3x3=True)",
}
BASELINE = "eager_channels_last"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class UsageError(ValueError):
    """A request that cannot be met as asked (unknown architecture, missing weights, no GPU): the
    command line prints its message on one line and exits with status 2."""


def pick_device(name: str = "auto") -> torch.device:
    """'auto' is CUDA when there is a GPU, else the CPU; 'cuda' without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA GPU")
    return torch.device(name)


def describe_path(device: torch.device) -> str:
    """Which code the fused model runs on this device, in words a reader can check."""
    if kernels.current_backend() == "reference":
        return f"reference backend on {device.type}: folded weights, plain torch ops, no Triton kernel"
    if device.type == "cuda":
        return f"compiled Triton kernels on {torch.cuda.get_device_name(device)}"
    if kernels.interpreting():
        return "CPU: Triton kernels under the Triton interpreter (correctness only, not speed)"
    return "CPU: reference path (folded weights, plain torch ops); no Triton kernel and no GPU figure"


def resolve_weights(arch: str, weights: str | None):
    """Check `arch` and `weights` before any work: None, a state_dict path, or a cached torchvision
    weights enum. Raises UsageError with what was expected."""
    if arch not in ARCHS:
        raise UsageError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHS)}")
    if weights is None:
        return None
    if os.path.isfile(weights):
        return weights
    builder = getattr(torchvision.models, arch)
    try:
        enum = torchvision.models.get_model_weights(builder)[weights]
    except KeyError:
        raise UsageError(f"--weights {weights!r} is neither a file nor a torchvision weights name for {arch}") from None
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(enum.url))
    if not os.path.exists(cached):
        raise UsageError(f"torchvision weights {arch}.{enum.name} are not cached at {cached}; download them where "
                         f"there is a network (torchvision.models.{arch}(weights='{enum.name}')) or pass "
                         "--weights PATH to a state_dict file")
    return enum


def load_model(arch: str, weights: str | None = None, *, seed: int = 0, size: int = 64):
    """A torchvision model in eval mode, and a line that says where its weights came from.

    weights: None for random weights with BatchNorm statistics estimated on synthetic batches;
    a torchvision weights name ('DEFAULT', 'IMAGENET1K_V2', ...) if already in the torch hub cache;
    or the path of a state_dict file.
    """
    source = resolve_weights(arch, weights)
    builder = getattr(torchvision.models, arch)
    if source is None:
        torch.manual_seed(seed)
        model = synthetic_batchnorm(builder(), seed=seed, size=size)
        return model, "random weights; BatchNorm statistics estimated on synthetic batches"
    if isinstance(source, str):
        model = builder()
        try:
            model.load_state_dict(torch.load(source, map_location="cpu", weights_only=True))
        except Exception as err:  # unpickling and key/shape mismatches raise many kinds
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UsageError(f"--weights {source}: not a {arch} state_dict ({first})") from err
        return model.eval(), f"state_dict from {source}"
    return builder(weights=source).eval(), f"torchvision weights {source.name} from the cache"


def tuned_cudnn(device: torch.device):
    """On a GPU, let cuDNN time its algorithms for each new shape and keep the fastest
    (torch.backends.cudnn.benchmark), as a baseline timed against tuned kernels must: by default it
    takes its heuristics' first pick. For the rest of the process; every timing here calls it."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def build_impls(model, names, dtype, device, batch, size):
    """{name: (run, input)} for each implementation that applies here, and {name: reason} for the
    rest. On a GPU, cuDNN's algorithms are tuned from here on (tuned_cudnn)."""
    tuned_cudnn(device)
    ready, skipped = {}, {}
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    base = copy.deepcopy(model).to(device, dtype).eval()
    fused = None
    for name in names:
        if name not in IMPLS:
            raise UsageError(f"unknown implementation {name!r}; expected some of {', '.join(IMPLS)}")
        if name in ("cudnn_fused", "fused_cuda_graph", "eager_channels_last_cuda_graph") and device.type != "cuda":
            skipped[name] = "needs CUDA"
            continue
        if name == "eager":
            ready[name] = (base, x)
        elif name == "eager_channels_last":
            ready[name] = (copy.deepcopy(base).to(memory_format=torch.channels_last), x_cl)
        elif name == "eager_channels_last_cuda_graph":
            cl = copy.deepcopy(base).to(memory_format=torch.channels_last)
            ready[name] = (CUDAGraphModule(cl, copy_output=False), x_cl)
        elif name == "compile":
            mode = "max-autotune" if device.type == "cuda" else None
            cl = copy.deepcopy(base).to(memory_format=torch.channels_last)
            ready[name] = (torch.compile(cl, mode=mode), x_cl)
        else:
            fused = fused if fused is not None else fuse(model, dtype=dtype).to(device)
            if name == "fused":
                ready[name] = (fused, x_cl)
            elif name == "fused_chain":
                ready[name] = (fuse(model, dtype=dtype, chain_blocks=True).to(device), x_cl)
            elif name == "fused_chain3x3":
                ready[name] = (fuse(model, dtype=dtype, chain_blocks=True, chain_3x3=True).to(device), x_cl)
            elif name == "cudnn_fused":
                ready[name] = (_with_backend(fused, "cudnn"), x_cl)
            else:
                # The graph's own output buffer, as a graph-replay baseline would return it.
                ready[name] = (CUDAGraphModule(fused, copy_output=False), x_cl)
    return ready, skipped


def _with_backend(module, name):
    def run(x):
        with kernels.use_backend(name):
            return module(x)

    return run


def time_impl(run, x, *, iters, warmup=3, progress=None, warmup_note=""):
    """Median and all per-call times of run(x) in milliseconds; each timed call waits for the GPU."""
    return time_call(lambda: run(x), cuda=x.is_cuda, iters=iters, warmup=warmup, progress=progress,
                     warmup_note=warmup_note)


def time_call(fn, *, cuda, iters, warmup=3, progress=None, warmup_note=""):
    """Median and all per-call times of fn() in milliseconds: CUDA events on a GPU, a wall clock elsewhere.

    `warmup_note` says what the warm-up calls do beyond warming up (compiling, autotuning), for the
    progress line."""
    if iters < 1:
        raise UsageError(f"need at least one timed run, got iters={iters}")
    times = []
    with torch.no_grad():
        for i in range(warmup):
            if progress:
                progress(f"warm-up {i + 1}/{warmup}" + (f" ({warmup_note})" if warmup_note else ""))
            fn()
        if cuda:
            torch.cuda.synchronize()
        for i in range(iters):
            if progress:
                progress(f"timed run {i + 1}/{iters}")
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), times


def first_call(fn, *, cuda):
    """Seconds the first call of fn() takes, compiling, tuning and capturing included."""
    with torch.no_grad():
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
    return time.perf_counter() - t0


def host_time(fn, *, cuda, forwards=10, repeats=7):
    """What one call of fn() costs the CPU, in ms: `forwards` calls issued back to back without
    waiting for the GPU, wall time divided by their number; the median of `repeats` such runs,
    each after the GPU has drained. On a CPU the calls do the work too, so it is their whole time."""
    times = []
    with torch.no_grad():
        fn()  # plans, compiled kernels and caches exist before timing
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(forwards):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / forwards)
        if cuda:
            torch.cuda.synchronize()
    return statistics.median(times), times


def spread(times):
    """min, quartiles and max of a list of times (ms), as the bench table and JSON report them."""
    ordered = sorted(times)
    q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else ordered * 3
    return {"min_ms": ordered[0], "q1_ms": q1, "median_ms": statistics.median(ordered), "q3_ms": q3,
            "max_ms": ordered[-1]}


def within_noise(case, base):
    """True when two timings' medians differ by less than either one's interquartile range: the
    ratio of their medians is then not a measured difference."""
    difference = abs(case["median_ms"] - base["median_ms"])
    return difference < max(case["q3_ms"] - case["q1_ms"], base["q3_ms"] - base["q1_ms"])


def provenance(command: str, device: torch.device, what_ran: str | None = None) -> dict:
    """Where a result came from: the machine, the versions and the command; `what_ran`, in words,
    as its "path" (default: describe_path(device))."""
    import triton

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    driver = None
    if gpu:
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            driver = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10, cwd=os.path.dirname(__file__)).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "gpu": gpu,
        "driver": driver,
        "cuda": torch.version.cuda if gpu else None,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": commit,
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": platform.processor() or platform.machine(),
        "path": what_ran or describe_path(device),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }


def write_results(path, command: str, device: torch.device, cases, *, what_ran=None, **extra):
    """Write a results file: {"provenance", "cases", **extra} as JSON at `path` (`what_ran`: the
    provenance's "path", where describe_path(device) would not say it). Scripts that run long call
    it after each case, so that a run stopped part-way still leaves what it measured."""
    payload = {"provenance": provenance(command, device, what_ran), "cases": cases, **extra}
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
        f.write("\n")
    return payload


def write_between_markers(path, begin, end, text):
    """Replace what lies between the lines `begin` and `end` of the file at `path` with `text`."""
    with open(path) as f:
        content = f.read()
    if begin not in content or end not in content:
        raise UsageError(f"{path} has no markers {begin!r} ... {end!r}")
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w") as f:
        f.write(f"{head}{begin}\n{text}\n{end}{tail}")
