"""What a fused network's first forward compiles, compiled here: seconds, shared memory, and
whether each kernel's loads are pipelined, for a GPU this machine need not have.

    python benchmarks/compile_report.py --arch resnet50 --dtype float16 --batch 256 --gpu H100 \
        [--every-candidate | --sweep] [--workers 2] [--json benchmarks/results/NAME.json]

The fused network runs once inside kernels.precompile.compile_only(gpu): every launch records the
kernels its first call would compile (the config table's entry, else each candidate it would
time) and nothing runs. The jobs are then compiled for that GPU's architecture into an empty Triton
cache, timed one by one, and each compiled kernel's PTX is searched for the markers of
kernels.precompile.ASM_MARKERS: asynchronous copies (software-pipelined loads), tensor-descriptor
(TMA) copies, the tensor-core instruction (Hopper's wgmma, Blackwell's tcgen05, mma.sync),
unvectorized 2-byte loads; ptxas -v gives its registers and spill stores a thread, from which and
its shared memory follow the programs an SM holds at once
("/SM", kernels.precompile.programs_per_sm: one program an SM leaves a memory-bound conv nothing to
run while it waits), and its machine code the instructions a warp issues per iteration of
the main loop against the tensor-core cycles of that iteration's MMAs ("issue": their ratio, the
least share of the loop's time that issuing takes; near 1 the loop is bound by its address and mask
arithmetic, not by the tensor cores; kernels.precompile.loop_instructions; Hopper's HGMMAs only:
Blackwell's MMA rate is not modelled, and its loops show "-"). A loop size marked *
is the whole kernel's code: the compiler unrolled its loops. "loads" are the global loads an
iteration of a loop without MMAs holds (the head's pooling), about what a thread keeps in flight
each time it waits for memory.

With --sweep the jobs are instead what benchmarks/sweep_convs.py compiles before it times anything:
every config of its list on every distinct resnet50 conv and the head, each case naming its layer.
Their compile seconds, over the GPU machine's workers, are about how long the sweep's compiling takes
there, and a config that fails or spills here does so there.

Compile seconds are this machine's CPU, one job a process: a cold first forward on a GPU pays
about their sum (plus the timing of candidates) when it compiles serially.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from unittest import mock

import torch
import torchvision
from fused_resnet.kernels import precompile

from fused_resnet import bench, fuse
from fused_resnet.validate import synthetic_batchnorm

OP_NAMES = {"conv2d_bias_act": "conv", "conv2d_bias_act_maxpool": "conv+pool", "chain_1x1": "chain",
            "conv_chain_1x1": "chain3x3"}


def describe(job):
    """A short name of the launch: op and the sizes that tell layers apart."""
    sizes = dict(part.split("=", 1) for part in job.key.split(",") if "=" in part)
    if job.op in ("chain_1x1", "conv_chain_1x1"):
        added = f"+shortcut C{sizes['C_sc']}" if sizes.get("SHORTCUT") == "1" else "+residual"
        head = f"Ch{sizes['Ch']} {sizes['H']}->{sizes['P']} " if sizes.get("HEAD") == "1" else ""
        nxt = f" J{sizes['J']}" if sizes.get("NEXT", "1") == "1" else ""
        return f"{OP_NAMES[job.op]}: {head}C{sizes['C']} K{sizes['K']}{nxt} {added}"
    if "Cg" in sizes:
        text = f"C{sizes['Cg']} K{sizes.get('Kg', '?')} {sizes.get('R', '?')}x{sizes.get('S', '?')}"
        text += f" {sizes.get('H', '?')}->{sizes.get('P', '?')}"
        dilation = {sizes.get("dil_h", "1"), sizes.get("dil_w", "1")}
        if dilation != {"1"}:
            text += f" dil{'x'.join(sorted(dilation))}"
        if sizes.get("EPILOGUE", "none") != "none":
            text += f" +{sizes['EPILOGUE']}"
        return f"{OP_NAMES.get(job.op, job.op)}: {text}"
    return job.op or job.kernel[1]


def config_text(config):
    short = {"BLOCK_M": "m", "BLOCK_N": "n", "BLOCK_K": "k", "num_warps": "w", "num_stages": "s",
             "FLAT_LOOP": "flat", "USE_TMA": "tma", "BOX_W": "box", "ROWS": "rows", "SPLIT_K": "split",
             "BLOCK_SIZE": "block", "BLOCK_HW": "hw"}
    return " ".join(f"{short[k]}{v}" for k, v in config.items() if k in short)


def issue_ratio(result):
    """Instructions per tensor-core cycle of the kernel's first main loop, or of its whole code
    where the compiler unrolled every loop (None without HGMMAs)."""
    loops, cycles = result.get("loop_instructions") or [], result.get("loop_tensor_cycles") or []
    if not loops:
        loops, cycles = [result.get("kernel_instructions")], [result.get("kernel_tensor_cycles")]
    return loops[0] / cycles[0] if loops[0] and cycles[0] else None


def loop_text(result):
    loops = result.get("loop_instructions") or []
    ratio = issue_ratio(result)
    size = loops[0] if loops else f"{result.get('kernel_instructions', '-')}*"  # *: the whole kernel, unrolled
    return f"{size:>6}" + (f"{ratio:>7.2f}" if ratio is not None else f"{'-':>7}")


def sweep_jobs(dtype, batch, size, gpu):
    """The CompileJobs of benchmarks/sweep_convs.py's configs for `gpu`, and each job's layer."""
    import sweep_convs  # beside this script

    model = synthetic_batchnorm(torchvision.models.resnet50(), size=32)
    layers = sweep_convs.distinct_layers(model, batch, size, dtype, "cpu")
    labels = []
    with precompile.compile_only(gpu) as jobs, torch.no_grad():
        for _, layer, x_shape, r_shape in layers:
            x, r = (None if shape is None else torch.empty(shape, dtype=dtype).contiguous(
                memory_format=torch.channels_last) for shape in (x_shape, r_shape))
            for config in sweep_convs.sweep_configs(layer, x_shape, dtype, cuda=True):
                with sweep_convs.forced(config):
                    sweep_convs.plan_of(layer, x, r, pool_apart=bool(config.get("POOL_APART")))(x, r)
            labels += [sweep_convs.describe(layer, x_shape)] * (len(jobs) - len(labels))
    return jobs, labels


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=bench.ARCHS, default="resnet50")
    parser.add_argument("--dtype", choices=list(bench.DTYPES), default="float16")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--gpu", choices=sorted(precompile.CAPABILITY), default="H100")
    parser.add_argument("--every-candidate", action="store_true",
                        help="compile every candidate config, even where the table holds one")
    parser.add_argument("--sweep", action="store_true",
                        help="compile what benchmarks/sweep_convs.py compiles (resnet50), not a first forward")
    parser.add_argument("--workers", type=int, default=1, help="compile in this many processes (default: 1)")
    parser.add_argument("--limit", type=int, default=None, help="compile only the first N jobs")
    parser.add_argument("--no-tf32", action="store_true", help="fp32 dots in IEEE precision, not TF32")
    parser.add_argument("--chain-blocks", action="store_true", help="the network as fuse(chain_blocks=True) runs it")
    parser.add_argument("--chain-3x3", action="store_true", help="the network as fuse(chain_3x3=True) runs it")
    parser.add_argument("--dilated", action="store_true",
                        help="the arch with replace_stride_with_dilation=[False, True, True] (bottleneck archs)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.sweep and (args.arch != "resnet50" or args.every_candidate or args.chain_blocks or args.chain_3x3
                       or args.dilated):
        parser.error("--sweep compiles the sweep's configs of resnet50: no --arch other than resnet50, "
                     "--every-candidate, --chain-blocks, --chain-3x3 or --dilated with it")
    if args.dilated and args.arch in ("resnet18", "resnet34"):
        parser.error(f"--dilated: torchvision's BasicBlock does not support dilation ({args.arch})")
    dtype = bench.DTYPES[args.dtype]
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    if args.sweep:
        jobs, layers = sweep_jobs(dtype, args.batch, args.size, args.gpu)
    else:
        dilation = {"replace_stride_with_dilation": [False, True, True]} if args.dilated else {}
        model = fuse(synthetic_batchnorm(getattr(torchvision.models, args.arch)(**dilation), size=32), dtype=dtype,
                     chain_blocks=args.chain_blocks, chain_3x3=args.chain_3x3)
        x = torch.empty(args.batch, 3, args.size, args.size, dtype=dtype).contiguous(memory_format=torch.channels_last)
        with precompile.compile_only(args.gpu, every_candidate=args.every_candidate) as jobs, torch.no_grad():
            model(x)
        layers = [None] * len(jobs)
    jobs = jobs[: args.limit]
    # An empty Triton cache of its own, so that every compile is a cold one; gone afterwards.
    with tempfile.TemporaryDirectory(prefix="fused_resnet_compile_report_") as cache, \
            mock.patch.dict(os.environ, TRITON_CACHE_DIR=cache):
        start = time.perf_counter()
        results = precompile.compile_jobs(jobs, workers=args.workers, machine_code=True)
        wall = time.perf_counter() - start
    cases = []
    print(f"{'launch':<48}{'config':<34}{'s':>6}{'smem KB':>9}{'regs':>6}{'spill B':>8}{'/SM':>5}{'async':>7}{'tma':>5}"
          f"{'wgmma':>7}{'tc05':>5}{'mma':>5}{'loop':>6}{'issue':>7}{'loads':>6}")
    arch = args.arch + ("-dilated" if args.dilated else "")
    for job, layer, result in zip(jobs, layers, results):
        case = {"arch": arch, "dtype": args.dtype, "batch": args.batch, "target": args.gpu,
                "tf32": not args.no_tf32 if args.dtype == "float32" else None,
                "launch": describe(job), "op": job.op, "key": job.key, "config": job.config, **result}
        if layer is not None:
            case["sweep_layer"] = layer
        cases.append(case)
        if "error" in result:
            print(f"{describe(job):<48}{config_text(job.config):<34}  failed: {result['error'][:80]}")
            continue
        print(f"{describe(job):<48}{config_text(job.config):<34}{result['seconds']:>6.1f}"
              f"{result['shared'] / 1024:>9.0f}{result['registers']:>6}{result['spill_bytes']:>8}"
              f"{result.get('programs_per_sm', '-'):>5}"
              f"{result['async_copies']:>7}{result['tma_loads']:>5}"
              f"{result['wgmma']:>7}{result['tcgen05']:>5}{result['mma']:>5}{loop_text(result)}"
              f"{(result.get('load_loop_loads') or ['-'])[0]:>6}")
    seconds = [r["seconds"] for r in results if "error" not in r]
    failed = len(results) - len(seconds)
    spilled = sum(1 for r in results if r.get("spill_bytes"))
    alone = sum(1 for r in results if r.get("programs_per_sm") == 1)
    ratios = [r for r in map(issue_ratio, results) if r is not None]
    if seconds:
        what = "the sweep's configs of " if args.sweep else ""
        print(f"{len(jobs)} kernels for {args.gpu} ({what}{arch}, {args.dtype}, batch {args.batch}): "
              f"{sum(seconds):.0f} s of compiling, median {statistics.median(seconds):.1f} s, "
              f"max {max(seconds):.1f} s; {wall:.0f} s wall with {args.workers} worker(s); {failed} failed, "
              f"{spilled} spill registers, {alone} run one program an SM")
    if ratios:
        print(f"main loops: instructions per tensor-core cycle, median {statistics.median(ratios):.2f}, "
              f"max {max(ratios):.2f} over {len(ratios)} kernels with warpgroup MMAs")
    if args.json:
        command = "python benchmarks/compile_report.py " + " ".join(argv if argv is not None else sys.argv[1:])
        what_ran = (f"compiled here for {args.gpu} (sm_{precompile.CAPABILITY[args.gpu]}) by Triton's compiler, "
                    "ptxas and nvdisasm; counts of the code, nothing run, no timing")
        bench.write_results(args.json, command, torch.device("cpu"), cases, what_ran=what_ran,
                            summary={"jobs": len(jobs), "sweep": args.sweep, "spilled": spilled, "one_per_sm": alone,
                                     "compile_s": round(sum(seconds), 2), "wall_s": round(wall, 2),
                                     "workers": args.workers, "failed": failed,
                                     "issue_ratio_median": round(statistics.median(ratios), 3) if ratios else None,
                                     "issue_ratio_max": round(max(ratios), 3) if ratios else None})
    return cases


if __name__ == "__main__":
    main()
