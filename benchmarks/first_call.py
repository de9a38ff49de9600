"""Time the first forward of a fused model in a fresh process, with cold and then warm caches.

    python benchmarks/first_call.py [--arch resnet50 ...] [--dtype float16 ...] [--batch 256]
                                    [--how forward warmup] [--json PATH]

For each (arch, dtype, how) a child process builds the fused model and times its first forward
(compiling and choosing every kernel's config) with empty caches: Triton's kernel cache and
fused_resnet's config cache both point into a new temporary folder ("cold"). A second child
process with the same folders times it again ("warm"). `how`: "forward" is a plain first call
(whose CompileAhead hook lists and compiles the forward's kernels first, in parallel); "warmup"
is fused_resnet.warmup followed by that call, which does the same explicitly. fp32 runs twice,
with TF32 off and on. Needs a CUDA
GPU. Cases: {"model", "impl": "fused", "dtype", "batch", "first_call_s", "cache", "how"}, and
"compile_ahead_s": the part of first_call_s spent listing the forward's kernels and compiling them
in worker processes (or finding them in Triton's cache), the rest being the forward itself (loading
the compiled kernels, choosing configs, timing candidates where no table or cache names one).
"""

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile

CHILD = """
import json, sys, time, torch
from fused_resnet import bench, fuse, modules, warmup
arch, dtype, batch, tf32, how = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]
# The part of the first call that lists the forward's kernels and compiles them in worker
# processes (warmup's, or the CompileAhead hook's: both call modules._compile_ahead), timed apart
# from the rest (loading the compiled kernels, choosing configs, timing candidates, the forward).
ahead, compile_ahead = [], modules._compile_ahead
def timed_compile_ahead(*args):
    start = time.perf_counter()
    compile_ahead(*args)
    ahead.append(time.perf_counter() - start)
modules._compile_ahead = timed_compile_ahead
torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
model, _ = bench.load_model(arch)
fused = fuse(model, dtype=bench.DTYPES[dtype]).cuda()
x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=bench.DTYPES[dtype]).contiguous(
    memory_format=torch.channels_last)
torch.cuda.synchronize()
def first():
    if how == "warmup":
        warmup(fused, x)
    return fused(x)
print(json.dumps({"s": bench.first_call(first, cuda=True), "compile_ahead_s": sum(ahead)}))
"""


def first_call(arch, dtype, batch, tf32, how, cache_root, timeout):
    env = {**os.environ, "TRITON_CACHE_DIR": os.path.join(cache_root, "triton"),
           "FUSED_RESNET_CACHE_DIR": os.path.join(cache_root, "fused_resnet")}
    try:
        done = subprocess.run([sys.executable, "-c", CHILD, arch, dtype, str(batch), "1" if tf32 else "0", how],
                              env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"did not finish within {timeout} s"
    if done.returncode != 0:
        return None, done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
    return json.loads(done.stdout.strip().splitlines()[-1]), None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["resnet50"])
    parser.add_argument("--dtype", nargs="+", default=["float16", "bfloat16", "float32"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--how", nargs="+", choices=["forward", "warmup"], default=["forward", "warmup"])
    parser.add_argument("--timeout", type=int, default=300, help="seconds a child may take (default: %(default)s)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("first_call.py: needs a CUDA GPU (the first call's cost is compiling for one)")
    from fused_resnet import bench

    cases = []
    for arch in args.arch:
        for dtype in args.dtype:
            for tf32, how in itertools.product([False, True] if dtype == "float32" else [False], args.how):
                with tempfile.TemporaryDirectory() as root:
                    for cache in ("cold", "warm"):
                        timed, error = first_call(arch, dtype, args.batch, tf32, how, root, args.timeout)
                        case = {"model": arch, "impl": "fused", "dtype": dtype, "batch": args.batch, "cache": cache,
                                "how": how, "first_call_s": None if timed is None else round(timed["s"], 2)}
                        if timed is not None:
                            case["compile_ahead_s"] = round(timed["compile_ahead_s"], 2)
                        if dtype == "float32":
                            case["tf32"] = tf32
                        if error:
                            case["error"] = error
                        cases.append(case)
                        print(json.dumps(case), flush=True)
                        if args.json:  # after each case, so that a run stopped part-way keeps what it measured
                            bench.write_results(args.json, "python benchmarks/first_call.py " + " ".join(sys.argv[1:]),
                                                torch.device("cuda"), cases)


if __name__ == "__main__":
    main()
