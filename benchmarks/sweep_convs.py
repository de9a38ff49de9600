"""Sweep the conv kernel's configs over every distinct conv of a fused ResNet-50, against cuDNN.

    python benchmarks/sweep_convs.py --json benchmarks/results/NAME.json [--write-table] [--budget 420] [--resume]

On a GPU (the default: batch 256, fp16, channels_last, random data) for each distinct fused conv
layer (the stem conv+maxpool, each block's convs with their epilogues, the merged projection
shortcuts), in the shapes the fused model launches, and for the head (average pooling + fc):

1. every config of kernels.configs.sweep_candidates (Inductor's conv configs and the Hopper
   matmul tutorial's) in the pipelined main loop, with no more stages than the loop fills, the
   unrolled loop at the first call's tiles (configs.candidates) as its comparison, and for dense
   1x1 convs the tensor-descriptor read, for
   stride-1 convs with taps box tiles read through 4-D descriptors, where few output tiles leave
   most SMs idle (small batches) each gathered config split-K (kernels.configs.split_k), for the
   3-channel stem the row and the gathered schedules, and the same again for its space-to-depth
   plan (a 4x4/1 conv over 16 channels: kernels.igemm.space_to_depth) and for the stem's conv
   without its pooling, which torch's max pooling then follows (fuse(stem_maxpool=False)), pruned
   to the layer, to shared memory and registers) is compiled in parallel by worker processes that
   share Triton's kernel cache with this one (they run nothing on the GPU);
2. each is checked against cuDNN's output on operands of its own (OutputCheck: a config whose
   output differs by more than TOLERANCE is reported as wrong, and is never timed nor written to
   the table), then timed here by CUDA-graph replay (10 launches in a graph, kernel time = replay / 10),
   as is cuDNN's fused op on the same operands (`cudnn_convolution_relu` or `_add_relu`; for a
   merged shortcut, cuDNN's shortcut conv then its conv+add+ReLU; for the stem, cuDNN's
   conv+bias+ReLU then max pooling, and eager's conv, BatchNorm, ReLU and pooling; the head, with
   configs.head_candidates' sweep list, against eager's pooling and fc alone);
3. a table of the best config against cuDNN per layer is printed, with the share of the roof each
   reaches (least_work: the layer's least bytes at the data sheet's bandwidth, or its FLOPs at the
   peak, whichever takes longer, over its time; for the stem, the best of each plan too: the
   stem's ways to run, which its first call would otherwise time), and the cases
   {"model": "resnet50-conv" (the head: "resnet50-head"), "layer", "impl": "fused" | "cudnn_fused" |
   "eager", "dtype", "batch", "kernel_ms", "config"} are written with the run's provenance (each
   fused case adds "timed", every config with its time and its error against cuDNN, a conv's
   "least_bytes", "least_flops" and "roof_ms" (that least time at the roof), "wrong", each
   config that failed the check with its error, "failed", each that did not compile or run, and
   the stem's "by_plan"); `--write-table` merges the winners (of each plan) and the stem's fastest
   way to run (stem_ways) into kernels/tuned_configs.json, so that plans on this GPU find them;
4. with `--network`, the whole resnet50 is timed (median of CUDA-event timings) for the
   implementations named there, before the sweep and after it (`--network-after`: after it only;
   each saved as soon as it is timed; with the table it wrote in force;
   the fused model's case adds "warmup_s", the seconds fused_resnet.warmup took, which before the
   sweep on a fresh machine means compiling into empty caches and tuning without a table); an
   implementation that fails is a case with its "error", and the others are timed all the same.

A fault in the GPU (an illegal address in a kernel) leaves nothing more to measure in this process:
the sweep saves what it measured, with the config (or the network) that ran when the GPU faulted,
and exits with status FAULT_EXIT (3); `--resume` with the same --json goes on from there in a new
process, keeping the layers and the networks (before) that file holds and never running what
faulted again (benchmarks/gpu_run.sh does so while its time lasts). To look at a config that
faulted, run it alone: `compute-sanitizer python3 benchmarks/sweep_convs.py --layer NAME --config
'JSON' --workers 1` (its "name" and "config" as the results file gives them).

`--device cpu` runs the same harness under the Triton interpreter at a tiny size, with one config
per layer and wall-clock times (one call each): a check of the harness, not a measurement. With
`--every-config` it runs instead every config a GPU sweep at batch 256 (or the batch given) would
time, each under the interpreter as the GPU would run it (its tiles, loop, descriptors, split-K),
bounds-checked (kernels.backend.bounds_checked: an access outside a launch's tensors, which on a
GPU is an illegal address, fails the config), and checks its output as the GPU sweep does: the
kernels' numerics and memory accesses in each config before a GPU times it:

    TRITON_INTERPRET=1 python benchmarks/sweep_convs.py --device cpu --every-config --batch 1 --size 224 --budget 1e9
"""

import argparse
import concurrent.futures
import contextlib
import copy
import functools
import json
import math
import multiprocessing
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import torchvision
import triton
from fused_resnet.kernels import backend, configs, conv2d_maxpool, igemm
from fused_resnet.kernels._checks import pair
from fused_resnet.kernels.igemm import (
    FLAT_K_BELOW,
    box_schedule,
    box_width,
    dense_1x1,
    normalize_args,
    output_size,
    row_schedule,
    space_to_depth_fits,
)
from fused_resnet.kernels.precompile import TARGETS, compile_job, compile_only, device_target

from fused_resnet import FusedAvgPoolLinear, FusedConv2d, FusedConv2dMaxPool, bench, fuse, kernels, profile, warmup
from fused_resnet.validate import synthetic_batchnorm


def distinct_layers(model, batch, size, dtype, device):
    """[(name, layer, x shape, residual shape or None)] of every distinct fused conv the fused
    model launches at this batch and size, and its head (average pooling + fc): the stem and the
    head first (they have plans of their own to settle), then the convs in the order they run."""
    fused = fuse(model)
    seen, found = set(), []

    def hook(name):
        def record(module, args, kwargs):
            x = args[0]
            residual = args[1] if len(args) > 1 else kwargs.get("residual")
            if isinstance(module, FusedAvgPoolLinear):
                found.append((name, module, tuple(x.shape), None))
                return
            key = (tuple(module.weight.shape), module.stride, module.padding, module.dilation, module.groups,
                   type(module).__name__, tuple(x.shape), None if residual is None else tuple(residual.shape),
                   None if module.shortcut_weight is None else tuple(module.shortcut_weight.shape))
            if key not in seen:
                seen.add(key)
                found.append((name, module, tuple(x.shape), None if residual is None else tuple(residual.shape)))
        return record

    hooks = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in fused.named_modules()
             if isinstance(m, (FusedConv2d, FusedAvgPoolLinear))]
    with torch.no_grad(), kernels.use_backend("reference"):
        fused(torch.randn(1, 3, size, size))
    for h in hooks:
        h.remove()
    found.sort(key=lambda layer: not isinstance(layer[1], (FusedConv2dMaxPool, FusedAvgPoolLinear)))
    return [(name, copy.deepcopy(module).to(device, dtype), (batch,) + x[1:], None if r is None else (batch,) + r[1:])
            for name, module, x, r in found]


def describe(layer, x_shape):
    if isinstance(layer, FusedAvgPoolLinear):
        return f"head C{layer.in_features} {x_shape[2]}x{x_shape[3]} -> {layer.out_features}"
    k, c, r, s = layer.weight.shape
    c *= layer.groups
    text = f"C{c} K{k} {r}x{s}/{layer.stride[0]} {x_shape[2]}x{x_shape[3]}"
    if layer.groups > 1:
        text += f" g{layer.groups}"
    if isinstance(layer, FusedConv2dMaxPool):
        text += " +maxpool"
    elif layer.shortcut_weight is not None:
        text += f" +shortcut C{layer.shortcut_weight.shape[1]}"
    return text


def least_work(layer, x_shape, r_shape, y_shape, element_size):
    """(bytes, FLOPs) below which no implementation of a conv layer goes: x, the weights, the bias
    and the residual or the shortcut's input each read once and y written once; two FLOPs a
    multiply-add of the conv (the stem's once a conv pixel, its pooling aside) and of a merged
    projection shortcut. None for the head."""
    if isinstance(layer, FusedAvgPoolLinear):
        return None
    k, cg, r, s = layer.weight.shape
    (ph, pw), stride, dilation = (pair(name, getattr(layer, name)) for name in ("padding", "stride", "dilation"))
    p, q = output_size(x_shape[2], x_shape[3], r, s, stride, (ph, ph, pw, pw), dilation)
    flops = 2 * x_shape[0] * p * q * k * cg * r * s
    tensors = [x_shape, layer.weight.shape, y_shape] + ([] if r_shape is None else [r_shape])
    tensors += [] if layer.bias is None else [layer.bias.shape]
    if layer.shortcut_weight is not None:
        tensors.append(layer.shortcut_weight.shape)
        flops += 2 * math.prod(y_shape) * layer.shortcut_weight.shape[1]
    return element_size * sum(math.prod(t) for t in tensors), flops


def operands(x_shape, r_shape, dtype, device, seed=0):
    """Random x and residual (None where r_shape is), laid out as the fused network's own activations
    and as sweep_configs plans for: dense channels_last, its strides torch's for that layout even
    along axes of size 1 (which .contiguous() would leave as they were, so that a 1x1 map would
    not read as dense rows)."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def draw(shape):
        out = torch.empty(shape, dtype=dtype, device=device, memory_format=torch.channels_last)
        return out.copy_(torch.randn(shape, generator=g))

    return draw(x_shape), None if r_shape is None else draw(r_shape)


def plan_of(layer, x, r, pool_apart=False):
    """The fused layer planned for operands laid out as x and r: run(x, r) -> its output."""
    if isinstance(layer, FusedConv2dMaxPool):
        args = layer._op_args()
        if pool_apart:  # the stem as fuse(stem_maxpool=False) runs it: the conv kernel, then torch's max pooling
            pool = [args.pop(name) for name in ("pool_size", "pool_stride", "pool_padding")]
            plan = kernels.plan_conv2d_bias_act(x, **args)
            return lambda x, r: F.max_pool2d(plan(x, None), *pool)
        plan = kernels.plan_conv2d_bias_act_maxpool(x, **args)
        return lambda x, r: plan(x)
    if isinstance(layer, FusedAvgPoolLinear):
        plan = layer._build_plan(x, None, layer._buffers)
        return lambda x, r: plan(x)
    return layer._build_plan(x, r, layer._buffers)


# Keys a sweep config may carry that choose the plan rather than the kernel's config (see `forced`):
# the stem as space-to-depth (igemm.SPACE_TO_DEPTH), and the stem's pooling apart from its conv.
PLAN_SWITCHES = ("SPACE_TO_DEPTH", "POOL_APART")


def plan_name(config):
    config = config or {}
    return ("pool_apart_" if config.get("POOL_APART") else "") + (
        "space_to_depth" if config.get("SPACE_TO_DEPTH") else "direct")


def sweep_configs(layer, x_shape, dtype, cuda):
    """The configs the sweep times for a layer (one interpreter config on a CPU). For the stem
    (conv + max pooling) also those of its other plans: as space-to-depth, marked
    {"SPACE_TO_DEPTH": 1}, and as the conv kernel followed by torch's max pooling, marked
    {"POOL_APART": 1}, each way. For the head, configs.head_candidates' sweep list."""
    sms = (device_target(0) if torch.cuda.is_available() else TARGETS["H100"]).multiprocessors
    if isinstance(layer, FusedAvgPoolLinear):
        n, c, h, w = x_shape
        element = torch.empty((), dtype=dtype).element_size()
        if not cuda:
            return [None]
        return configs.head_candidates(n, layer.out_features, c, h * w, element, sweep=True, sms=sms)
    fits = space_to_depth_fits(layer.weight, pair("stride", layer.stride), pair("dilation", layer.dilation),
                               layer.groups)
    pooled = isinstance(layer, FusedConv2dMaxPool)
    if not cuda:
        plans = [None] + ([{"SPACE_TO_DEPTH": 1}] if fits else [])
        return plans + ([{**(c or {}), "POOL_APART": 1} for c in plans] if pooled else [])
    k, cg, rr, ss = layer.weight.shape
    kg = k // layer.groups
    n, _, h, w = x_shape
    m = n * h * w // (layer.stride[0] * layer.stride[1])  # conv output pixels
    flat_k = cg < FLAT_K_BELOW
    reduction = cg * rr * ss if flat_k else cg
    element = torch.empty((), dtype=dtype).element_size()
    # fp32 with TF32 off: IEEE dots, on the FMA units, with lists (and a stem limit) of their own.
    ieee = igemm.ieee_fp32(dtype)
    candidates = functools.partial(configs.sweep_candidates, ieee=ieee)
    # The sweep's inputs are dense channels_last, as these are.
    x = torch.empty(x_shape, dtype=dtype, device="meta", memory_format=torch.channels_last)
    variants = [{"FLAT_LOOP": 1}]
    if row_schedule(x, layer.weight, layer.dilation, layer.groups):
        # The few-channel stem: its reduction per filter row over contiguous runs, or gathered.
        variants = [{"FLAT_LOOP": 1, "ROWS": rows} for rows in (1, 0)]
    conv_switches = {"USE_TMA": 0, "BOX_W": 0}

    def blocked(rows, switches, limit, pooled=False):
        """The space-to-depth plan's configs: 16 channels over ceil(R/2) x ceil(S/2) taps, both schedules."""
        if not fits:
            return []
        schedules = [{"FLAT_LOOP": 1, "ROWS": r, **switches} for r in (1, 0)]
        taps = (triton.cdiv(rr, 2), triton.cdiv(ss, 2))
        shared = None
        if pooled:  # the row schedule holds its weight tile, of the blocked weight's shape, throughout
            shared = conv2d_maxpool.shared_bytes(torch.empty(kg, 16, *taps, device="meta"), element, False)
        return [{**c, "SPACE_TO_DEPTH": 1} for c in candidates(
            rows, kg, 16 * taps[0] * taps[1], element, variants=schedules, max_acc_per_thread=limit,
            shared_bytes=shared)]

    if pooled:
        limit = conv2d_maxpool.IEEE_MAX_ACC_PER_THREAD if ieee else conv2d_maxpool.MAX_ACC_PER_THREAD
        padded = any(pair("padding", layer.padding))
        together = candidates(m // 4, kg, reduction, element, variants=variants, max_acc_per_thread=limit,
                              shared_bytes=conv2d_maxpool.shared_bytes(layer.weight, element, padded))
        together += blocked(m // 4, {}, limit, pooled=True)
        apart = candidates(m, kg, reduction, element, variants=[{**v, **conv_switches} for v in variants])
        apart += blocked(m, conv_switches, configs.MAX_ACC_PER_THREAD)
        return together + [{**c, "POOL_APART": 1} for c in apart]
    # The wide list in the pipelined schedule; the unrolled one (a loop over channel blocks in each
    # tap) at the first call's tiles alone, as the comparison: compiled for an H100 it took half
    # the sweep's compiling (500 of 1030 s, 118 of 1006 configs) and spilled registers in 36 of them,
    # the pipelined schedule in 12 (compile_report.py --sweep).
    variants = [{**v, **conv_switches} for v in variants]
    if dense_1x1(x, layer.weight, layer.stride, layer.padding, layer.dilation, layer.groups):
        variants.append({"FLAT_LOOP": 1, "USE_TMA": 1, "BOX_W": 0})
    chosen = candidates(m, kg, reduction, element, variants=variants)
    unrolled = []
    if not flat_k and rr * ss > 1:
        unrolled = configs.candidates(m, kg, reduction, element, switches={"FLAT_LOOP": 0, **conv_switches},
                                      ieee=ieee)
    split = []
    if not flat_k:
        # No more pipeline stages than the main loop fills, as the first call's candidates.
        c_sc = 0 if layer.shortcut_weight is None else layer.shortcut_weight.shape[1]
        chosen, unrolled = (configs.cap_stages(found, igemm.stage_trips(rr * ss, cg, c_sc))
                            for found in (chosen, unrolled))
        # Split-K where the tiles leave most SMs idle (small batches): each gathered config again, split.
        variant = configs.split_variant(m, kg, layer.groups, igemm.loop_trips(rr * ss, cg, c_sc), sms)
        split = [v for c in chosen if c["FLAT_LOOP"] == 1 and c["USE_TMA"] == 0 and (v := variant(c)) is not None]
    if box_schedule(x, layer.weight, layer.stride, layer.groups):
        # Box tiles through descriptors: each pipelined pointer config again, as the box that fits the map best.
        stride, padding, dilation, _ = normalize_args(x, layer.weight, layer.stride, layer.padding, layer.dilation,
                                                      layer.groups)
        p, q = output_size(h, w, rr, ss, stride, padding, dilation)
        chosen += [{**c, "BOX_W": box_width(p, q, c["BLOCK_M"])} for c in chosen
                   if c["FLAT_LOOP"] == 1 and c["USE_TMA"] == 0]
    return chosen + split + unrolled + blocked(m, conv_switches, configs.MAX_ACC_PER_THREAD)


@contextlib.contextmanager
def forced(config):
    """configs.override(config) for the plans built inside, less the PLAN_SWITCHES it may carry;
    SPACE_TO_DEPTH (igemm's, not a kernel argument) is set meanwhile. Yields the table entries the
    plans looked up."""
    saved = igemm.SPACE_TO_DEPTH
    igemm.SPACE_TO_DEPTH = bool((config or {}).get("SPACE_TO_DEPTH"))
    config = {k: v for k, v in (config or {}).items() if k not in PLAN_SWITCHES}
    try:
        with configs.override(config) as asked:
            yield asked
    finally:
        igemm.SPACE_TO_DEPTH = saved


def kernel_ms(fn, cuda, reps=10):
    """Kernel time of fn: replay of `reps` calls captured in a CUDA graph, per call; on a CPU one
    call's wall clock (the interpreter's: a check of the harness, not a measurement)."""
    if not cuda:
        return bench.time_call(fn, cuda=False, iters=1, warmup=0)[0]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def baselines(layer, x, r):
    """{impl: run(x, r)} of what cuDNN (and for the stem, eager) runs for this layer, planned for
    operands laid out as x and r; for the head, which has no cuDNN form, what eager runs
    (fuse(avgpool_fc=False): torch's pooling, then the fc). The first computes what the layer
    does (eager's stem, with a BatchNorm of its own, is there for its time alone)."""
    if isinstance(layer, FusedAvgPoolLinear):
        return {"eager": lambda x, r: kernels.avgpool_linear_reference(x, layer.weight, layer.bias)}
    with kernels.use_backend("cudnn"):
        plan = plan_of(layer, x, r)
    out = {"cudnn_fused": plan}
    if isinstance(layer, FusedConv2dMaxPool):
        weight = layer.weight
        bn = torch.nn.BatchNorm2d(weight.shape[0]).to(x.device, x.dtype).eval()
        out["eager"] = lambda x, r: F.max_pool2d(torch.relu(bn(F.conv2d(x, weight, None, layer.stride, layer.padding))),
                                                 layer.pool_size, layer.pool_stride, layer.pool_padding)
    return out


# The most a config's output may differ from cuDNN's on the same operands (the largest difference
# over the largest output): a few units in the last place of the output's dtype pass, a tile
# that was not written or a wrong index does not.
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 3e-2, torch.float32: 1e-2}


class OutputCheck:
    """What a layer must output, reference(x, r) (the first of its baselines), on operands of its
    own (drawn apart from the timed ones, so that memory left holding a timed run's output cannot
    pass for a result), and each config's error against it. Each checked output is then filled
    with NaN, so that the next config cannot pass by leaving some of it unwritten."""

    def __init__(self, reference, x_shape, r_shape, dtype, device, seed):
        self.x, self.r = operands(x_shape, r_shape, dtype, device, seed)
        self.expected = reference(self.x, self.r).float()
        self.scale = self.expected.abs().max().clamp_min(1e-6)
        self.tolerance = TOLERANCE[dtype]

    def error(self, run):
        """The largest difference of run(x, r) from the expected output, over the largest expected
        value (NaN where the output holds NaN or Inf)."""
        out = run(self.x, self.r)
        error = ((out.float() - self.expected).abs().max() / self.scale).item()
        out.fill_(float("nan"))
        return error

    def passes(self, error):
        return error <= self.tolerance  # False for NaN


COMPILE_CHUNK = 12


def _compile_worker(task):
    """In a worker process: compile each config's kernels into Triton's cache, running nothing on
    the GPU (kernels.precompile lists what a call would compile): a config that would fault the GPU
    faults where it is timed, in the sweep's own process, which records it. `gpu` None plans on
    this process's GPU; a GPU family (kernels.precompile.TARGETS) plans CPU tensors for it."""
    spec, chosen, gpu = task
    layer, x_shape, r_shape, dtype = spec
    device = "cuda" if gpu is None else "cpu"
    layer = layer.to(device)
    x, r = operands(x_shape, r_shape, dtype, device)
    failed = []
    for config in chosen:
        try:
            with forced(config), compile_only(gpu) as jobs:
                plan_of(layer, x, r, pool_apart=bool(config.get("POOL_APART")))(x, r)
            for job in jobs:
                compile_job(job)
        except Exception as err:  # a config that does not compile is skipped, and said so
            failed.append((config, f"{type(err).__name__}: {err}"[:200]))
    return failed


def precompile(tasks, workers, work=_compile_worker):
    """Each task's configs that failed to compile, [(config, error)], compiled by work(task) in
    `workers` processes. Should a worker die (a crash inside the compiler) or a chunk fail
    otherwise, the tasks not done are left to compile where they are timed, and the sweep goes on."""
    if workers <= 1 or not tasks:
        return [work(t) for t in tasks]
    context = multiprocessing.get_context("spawn")
    results, lost = [[] for _ in tasks], 0
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(work, task): i for i, task in enumerate(tasks)}
        for future in concurrent.futures.as_completed(futures):
            try:
                results[futures[future]] = future.result()
            except Exception:  # a worker that died (BrokenProcessPool), or any error of a chunk's
                lost += 1
    if lost:
        print(f"a compile worker died or failed: the configs of {lost} of {len(tasks)} chunks compile when timed",
              file=sys.stderr)
    return results


def time_network(model, impls, dtype, device, batch, size, when, on_case=None):
    """Whole-network cases (median of 20 CUDA-event timings) for `impls`, tagged before or after
    the sweep's table is written; the fused model's with the seconds its warm-up took (compiling,
    and choosing configs where the table has none). An implementation that fails is a case with
    its error, and the others are timed all the same."""
    cases = []
    if not impls:
        return cases
    common = {"model": "resnet50", "dtype": str(dtype).removeprefix("torch."), "batch": batch, "size": size,
              "when": when}
    ready, _ = bench.build_impls(model, impls, dtype, device, batch, size)
    for impl, (fn, x) in ready.items():
        try:
            extra = {}
            if impl in ("fused", "fused_chain", "fused_chain3x3") and device.type == "cuda":
                # its kernels compiled in parallel, not one by one in the first timed call
                extra["warmup_s"] = round(warmup(fn, x), 2)
            median, _ = bench.time_impl(fn, x, iters=20)
            if impl in ("fused_chain", "fused_chain3x3") and device.type == "cuda":
                extra["chains"] = chain_plans(fn)
        except Exception as err:
            failure = {**common, "impl": impl, "error": f"{type(err).__name__}: {err}"[:300]}
            if fatal(err):  # saved as such, so that --resume does not time it again
                cases.append({**failure, "fault": True})
                if on_case is not None:
                    on_case(cases)
                raise
            print(f"network {impl} ({when}) failed: {type(err).__name__}: {err}", file=sys.stderr)
            cases.append(failure)
        else:
            cases.append({**common, "impl": impl, "median_ms": round(median, 4), **extra})
        if on_case is not None:
            on_case(cases)  # so far, should the run be stopped
    return cases


# A chain's ways to run, in the order of its PlanChoice's plans (kernels.chain_1x1): one kernel; its
# first conv apart and the rest a chain of its own; with a head, the next conv apart.
CHAIN_WAYS = ("one kernel", "first conv apart", "next conv apart")
# The table's ops for the chain kernels' configs, and for each chain's way to run.
CHAIN_OPS = ("chain_1x1", "conv_chain_1x1", "chain_1x1:plan", "conv_chain_1x1:plan")


def chain_plans(model):
    """{layer: one of CHAIN_WAYS}: how each chained layer of `model` chose to run at its first call
    on the GPU (kernels.backend.PlanChoice), for the input it has seen."""
    chosen = {}
    for name, module in model.named_modules():
        for plan in getattr(module, "_plans", {}).values():
            if isinstance(plan, backend.PlanChoice) and plan.chosen is not None:
                chosen[name] = CHAIN_WAYS[plan.plans.index(plan.chosen)]
    return chosen


def stem_ways(by_plan):
    """{(gpu, "<op>:plan", dtype, key): {"plan": i}}: the stem's ways to run, as its first call would
    choose them, from the sweep's {plan name: (ms, config, table entries)} for the layer (each plan
    at its best config); {} for a layer that has no choice.

    Way 0 of each is the layout igemm.SPACE_TO_DEPTH names, and the choice is keyed by its
    kernel's entry. The conv alone (conv2d_bias_act:plan, whether it runs on its own or before
    torch's max pooling): 0, that layout, or 1, the other. The conv with its pooling
    (conv2d_bias_act_maxpool:plan): 0, the pooled kernel; 1, the conv then torch's max pooling,
    over the faster layout; 2, the pooled kernel over the other layout."""
    default = int(igemm.SPACE_TO_DEPTH)

    def timed(blocks, apart):
        found = by_plan.get(plan_name({"SPACE_TO_DEPTH": blocks, "POOL_APART": apart}))
        return (math.inf, []) if found is None else (found[0], found[2])

    def choice(op, entries, times):
        way = {"plan": min(range(len(times)), key=times.__getitem__)}
        return {(gpu, f"{op}:plan", dtype, key): way for gpu, o, dtype, key in entries if o == op}

    ways = {}
    for apart in (0, 1):  # the conv's layout: alone (a stem without pooling), or before the pooling
        (ms, entries), (other_ms, _) = timed(default, apart), timed(1 - default, apart)
        if math.isfinite(ms) and math.isfinite(other_ms):
            ways.update(choice("conv2d_bias_act", entries, [ms, other_ms]))
    (pooled, entries), (other_pooled, _) = timed(default, 0), timed(1 - default, 0)
    apart = min(timed(default, 1)[0], timed(1 - default, 1)[0])
    if math.isfinite(pooled) and (math.isfinite(apart) or math.isfinite(other_pooled)):
        ways.update(choice("conv2d_bias_act_maxpool", entries, [pooled, apart, other_pooled]))
    return ways


def ship_chain_choices(gpu):
    """Merge into the shipped table what the chained networks' first calls chose on this GPU family
    (the chain kernels' configs and each chain's way to run), from the disk cache, so that a first
    call elsewhere times none of it. Returns those entries."""
    chosen = configs.cached(gpu, CHAIN_OPS)
    if chosen:
        configs.write_table(chosen)
    return chosen


def fatal(err):
    """Whether `err` leaves the GPU unusable for this process (a fault inside a kernel), so that
    nothing after it can be measured."""
    text = str(err)
    return "illegal" in text or "CUDA error" in text or "unspecified launch failure" in text


# The exit status of a sweep that a fault in the GPU ended: what it measured, and the config that
# faulted, are in its results file, and `--resume` in a new process goes on from there.
FAULT_EXIT = 3


def resumed(path, dtype, batch):
    """What a results file of an earlier run of the sweep holds for `--resume`: (its cases of the
    layers it finished, of the networks it timed before the sweep and of those that faulted the GPU,
    the names of those layers,
    {layer name: the faults in it, each {"config", "error"}: the config that ran when the GPU faulted}).
    A file of another dtype or batch is refused."""
    if path is None or not os.path.exists(path):
        return [], set(), {}
    with open(path) as f:
        cases = json.load(f)["cases"]
    other = {(c["dtype"], c["batch"]) for c in cases} - {(dtype, batch)}
    if other:
        raise SystemExit(f"sweep_convs.py --resume: {path} holds a run of {sorted(other)} (dtype, batch), not "
                         f"{(dtype, batch)}; resume with the options of that run, or give another --json")
    faulted = {c["name"]: c["faulted"] for c in cases if c.get("faulted")}
    done = {c["name"] for c in cases if c["impl"] == "fused" and "name" in c and not c.get("fault")}
    kept = [c for c in cases if c.get("name") in done
            or (c["model"] == "resnet50" and (c.get("when") == "before" or c.get("fault")))]
    return kept, done, faulted


def table_rows(cases):
    """The printed table's rows from the layers' cases: (label, the fused kernel's ms, {baseline:
    ms}, the layer's time at the roof)."""
    rows = []
    for fused in cases:
        if fused["impl"] != "fused" or fused.get("kernel_ms") is None or "name" not in fused:
            continue
        base = {c["impl"]: c["kernel_ms"] for c in cases if c.get("name") == fused["name"] and c["impl"] != "fused"}
        plan = plan_name(fused["config"])
        rows.append((fused["layer"] + ("" if plan == "direct" else f" ({plan})"), fused["kernel_ms"], base,
                     fused.get("roof_ms")))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--batch", type=int, default=None, help="default: 256 on a GPU, 1 on a CPU")
    parser.add_argument("--size", type=int, default=None, help="default: 224 on a GPU, 32 on a CPU")
    parser.add_argument("--dtype", choices=list(bench.DTYPES), default="float16")
    parser.add_argument("--limit", type=int, default=None, help="only the first N distinct layers")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--budget", type=float, default=420, help="seconds for the conv sweep (default: 420)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--write-table", action="store_true", help="merge the winners into kernels/tuned_configs.json")
    parser.add_argument("--layer", nargs="+", default=None, metavar="NAME",
                        help="only these layers, by the name the results give them (e.g. layer1.0.conv2)")
    parser.add_argument("--config", type=json.loads, default=None, metavar="JSON",
                        help="only this config (as a results file gives it, e.g. a 'faulted' one's), to run "
                             "it alone, under compute-sanitizer say")
    parser.add_argument("--every-config", type=int, nargs="?", const=256, default=None, metavar="BATCH",
                        help="with --device cpu: every config a GPU sweep at BATCH (default 256) times, each "
                             "run under the interpreter and checked")
    parser.add_argument("--resume", action="store_true",
                        help="go on from the --json file of a run that a fault in the GPU ended: keep the layers "
                             "and networks it measured, and skip the configs that faulted")
    parser.add_argument("--network", nargs="*", default=[], metavar="IMPL",
                        help="also time the whole resnet50 for these implementations (e.g. fused cudnn_fused)")
    parser.add_argument("--network-after", nargs="*", default=[], metavar="IMPL",
                        help="the same, after the sweep only (after those of --network)")
    args = parser.parse_args(argv)
    # Every config on a CPU runs bounds-checked: an access outside a launch's tensors, an illegal
    # address on a GPU, fails the config there, with the kernel named.
    with backend.bounds_checked() if args.every_config is not None else contextlib.nullcontext():
        return sweep(args, argv)


def sweep(args, argv):
    """main() after its arguments are parsed."""
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("sweep_convs.py: no CUDA GPU; --device cpu checks the harness under the interpreter")
    if args.every_config is not None and (cuda or not backend.interpreting()):
        raise SystemExit("sweep_convs.py: --every-config is for --device cpu under the interpreter "
                         "(TRITON_INTERPRET=1); a GPU sweep times every config")
    batch = args.batch or (256 if cuda else 1)
    size = args.size or (224 if cuda else 32)
    dtype = bench.DTYPES[args.dtype]
    device = torch.device(args.device)
    bench.tuned_cudnn(device)  # cuDNN's fastest algorithm for each baseline
    torch.manual_seed(0)
    model = synthetic_batchnorm(torchvision.models.resnet50(), size=32)
    layers = distinct_layers(model, batch, size, dtype, device)[: args.limit]
    if args.layer is not None:
        unknown = set(args.layer) - {name for name, *_ in layers}
        if unknown:
            raise SystemExit(f"sweep_convs.py --layer: no distinct layer named {sorted(unknown)}; these are: "
                             + ", ".join(name for name, *_ in layers))
        layers = [layer for layer in layers if layer[0] in args.layer]
    kept, done, faulted = resumed(args.json, args.dtype, batch) if args.resume else ([], set(), {})
    cases = [c for c in kept if c["model"] != "resnet50"]  # the layers' cases
    before = [c for c in kept if c["model"] == "resnet50"]  # the networks' (and those that faulted, after)
    command = "python benchmarks/sweep_convs.py " + " ".join(argv if argv is not None else sys.argv[1:])

    def save(cases):
        if args.json:
            bench.write_results(args.json, command, device, cases)

    def unmeasured(impls, when):  # (--resume: what the file does not hold, or what faulted the GPU there)
        return [i for i in impls if not any(c["impl"] == i and c["when"] == when for c in before)]

    before += time_network(model, unmeasured(args.network, "before"), dtype, device, batch, size, "before",
                           on_case=lambda done: save(cases + before + done))
    started = time.perf_counter()
    # (A resumed run leaves out the layers done, and the configs that faulted the GPU.)
    def listed(layer, x_shape):  # (--every-config: the GPU's list for its batch, run at this one)
        if args.config is not None:
            return [args.config]
        if args.every_config is not None:
            return sweep_configs(layer, (args.every_config,) + x_shape[1:], dtype, True)
        return sweep_configs(layer, x_shape, dtype, cuda)

    plans = [(name, layer, x_shape, r_shape,
              [c for c in listed(layer, x_shape) if c not in [f["config"] for f in faulted.get(name, [])]])
             for name, layer, x_shape, r_shape in layers if name not in done]
    if cuda:
        # Layers travel to the workers on the CPU (plain pickles); each worker plans its own on the GPU
        # and compiles what the plans would launch, launching nothing (_compile_worker).
        # In chunks of COMPILE_CHUNK configs, so that the workers finish together (the stem alone
        # has 76 configs, most layers 24 to 54).
        tasks, owner = [], []
        for i, (_, layer, x_shape, r_shape, chosen) in enumerate(plans):
            spec = (copy.deepcopy(layer).cpu(), x_shape, r_shape, dtype)
            for start in range(0, len(chosen), COMPILE_CHUNK):
                tasks.append((spec, chosen[start:start + COMPILE_CHUNK], None))
                owner.append(i)
        failures = [[] for _ in plans]
        for i, failed in zip(owner, precompile(tasks, args.workers)):
            failures[i] += failed
        print(f"compiled {sum(len(c) for *_, c in plans)} configs in {time.perf_counter() - started:.0f} s",
              file=sys.stderr)
    else:
        failures = [[] for _ in plans]
    winners = {}
    roof = profile.roof(device, dtype)  # (peak FLOP/s, bytes/s, its name); on a CPU an H100's data sheet

    for (name, layer, x_shape, r_shape, chosen), failed in zip(plans, failures):
        if time.perf_counter() - started > args.budget:
            print(f"budget of {args.budget:.0f} s spent: {name} and the layers after it were not timed",
                  file=sys.stderr)
            break
        x, r = operands(x_shape, r_shape, dtype, device)
        bad = [c for c, _ in failed]
        base_runs = baselines(layer, x, r)  # planned for x's layout, which the check's operands share
        check = OutputCheck(next(iter(base_runs.values())), x_shape, r_shape, dtype, device, seed=len(cases) + 1)
        label = describe(layer, x_shape)
        model_name = "resnet50-head" if isinstance(layer, FusedAvgPoolLinear) else "resnet50-conv"
        common = {"model": model_name, "layer": label, "dtype": args.dtype, "batch": batch}
        faults = list(faulted.get(name, []))  # configs that faulted the GPU in an earlier run (--resume)
        by_plan = {}  # the best (ms, config, table entries) of each plan (plan_name: "direct" but for the stem)
        timed = []  # every config's time: with compile_report's counts of its compiled loop, what they predict
        wrong = []  # configs whose output is not the layer's: never timed, never a winner
        for config in chosen:
            if config in bad:
                continue
            try:
                with forced(config) as asked:
                    run = plan_of(layer, x, r, pool_apart=bool((config or {}).get("POOL_APART")))
                    error = check.error(run)  # the first call binds the config
                ms = kernel_ms(functools.partial(run, x, r), cuda) if check.passes(error) else None
            except Exception as err:  # one config that fails to run is said so; a fault in the GPU ends the sweep
                if fatal(err):
                    # Saved with the layers done, so that --resume skips this config in a new process.
                    faults.append({"config": config, "error": f"{type(err).__name__}: {err}"[:200]})
                    save(cases + [{**common, "impl": "fused", "kernel_ms": None, "name": name, "fault": True,
                                   "faulted": faults}] + before)
                    raise
                failed.append((config, f"{type(err).__name__}: {err}"[:200]))
                print(f"{name}: config {config} failed: {failed[-1][1]}", file=sys.stderr)
                continue
            if ms is None:
                wrong.append({"config": config, "error": error if math.isfinite(error) else repr(error)})
                print(f"{name}: config {config} is WRONG (error {error:.3g} of the largest output, "
                      f"tolerance {check.tolerance:g}); not timed", file=sys.stderr)
                continue
            timed.append({"config": config, "kernel_ms": round(ms, 5), "error": float(f"{error:.3g}")})
            plan = plan_name(config)
            if plan not in by_plan or ms < by_plan[plan][0]:
                by_plan[plan] = (ms, config, list(asked))
        unfit = {"wrong": wrong, "failed": [{"config": c, "error": e} for c, e in failed], "faulted": faults}
        unfit = {k: v for k, v in unfit.items() if v}
        if not by_plan:
            print(f"{name}: no config compiled and gave the layer's output; nothing to time", file=sys.stderr)
            cases.append({**common, "impl": "fused", "kernel_ms": None, "name": name, **unfit})
            save(cases + before)
            continue
        best = min(by_plan.values(), key=lambda b: b[0])
        fused = {**common, "impl": "fused", "kernel_ms": round(best[0], 5), "config": best[1],
                 "configs_timed": len(timed), "name": name, "timed": timed, **unfit}
        if len(by_plan) > 1:
            fused["by_plan"] = {plan: round(b[0], 5) for plan, b in by_plan.items()}
        cases.append(fused)
        for _, config, entries in by_plan.values():  # each plan's winner, under its own key
            for entry in entries:
                winners[entry] = {k: v for k, v in (config or {}).items() if k not in PLAN_SWITCHES}
        winners.update(stem_ways(by_plan))
        if args.write_table and cuda and winners:
            configs.write_table(winners)  # layer by layer, should the run be stopped
        base = {impl: kernel_ms(functools.partial(run, x, r), cuda) for impl, run in base_runs.items()}
        for impl, ms in base.items():
            cases.append({**common, "impl": impl, "kernel_ms": round(ms, 5), "name": name})
        work = least_work(layer, x_shape, r_shape, tuple(next(iter(base_runs.values()))(x, r).shape),
                          x.element_size())
        if work is not None and roof is not None:
            # The least time at the roof: the least bytes at the bandwidth, or the FLOPs at the peak.
            fused["least_bytes"], fused["least_flops"] = work
            fused["roof_ms"] = float(f"{max(work[0] / roof[1], work[1] / roof[0]) * 1e3:.4g}")
        save(cases + before)  # so far, should the run be stopped
        if len(by_plan) > 1:
            print(f"{label}: " + ", ".join(f"{plan} {b[0]:.4f} ms" for plan, b in by_plan.items())
                  + "; the table takes the fastest as the stem's way to run",
                  file=sys.stderr)
    after = unmeasured(args.network + [impl for impl in args.network_after if impl not in args.network], "after")
    network = before + time_network(model, after, dtype, device, batch, size, "after",
                                    on_case=lambda done: save(cases + before + done))
    cases += network
    if args.write_table and cuda:
        shipped = ship_chain_choices(configs.gpu_family(torch.cuda.get_device_name(device)))
        print(f"{len(shipped)} chain configs and ways to run, chosen by the networks' first calls, joined the table",
              file=sys.stderr)
    if roof is not None:
        print(f"roof: {roof[1] / 1e12:.2f} TB/s and {roof[0] / 1e12:.0f} TFLOP/s in {args.dtype} ({roof[2]}; NVIDIA's "
              "data sheet); 'at roof': the layer's least bytes or FLOPs (least_work) at those rates, over its time")
    print(f"{'layer':<34}{'fused ms':>10}{'cuDNN ms':>10}{'fused/cuDNN speed':>19}{'fused at roof':>15}"
          f"{'cuDNN at roof':>15}")
    ratios = []
    for label, fused_ms, base, roof_ms in table_rows(cases):
        extra = f"  (eager {base['eager']:.4f} ms: {base['eager'] / fused_ms:.2f}x)" if "eager" in base else ""
        if "cudnn_fused" not in base:  # the head: against eager alone, and not in the convs' geomean
            print(f"{label:<34}{fused_ms:>10.4f}{'-':>10}{'-':>19}{'-':>15}{'-':>15}{extra}")
            continue
        ratio = base["cudnn_fused"] / fused_ms
        ratios.append(ratio)
        at_roof = "".join(f"{'-' if roof_ms is None else f'{roof_ms / ms:.0%}':>15}"
                          for ms in (fused_ms, base["cudnn_fused"]))
        print(f"{label:<34}{fused_ms:>10.4f}{base['cudnn_fused']:>10.4f}{ratio:>18.2f}x{at_roof}{extra}")
    if ratios:
        geomean = statistics.geometric_mean(ratios)
        print(f"geomean over {len(ratios)} convs: fused at {geomean:.2f}x cuDNN's speed"
              + ("" if cuda else " (CPU, interpreted: a check of the harness, not a measurement)"))
    for c in network:
        shown = f"{c['median_ms']:>10.3f} ms" if "median_ms" in c else f"  failed: {c['error'][:60]}"
        warm = f"  (warm-up {c['warmup_s']} s)" if "warmup_s" in c else ""
        apart = sorted(f"{layer} ({way})" for layer, way in c.get("chains", {}).items() if way != CHAIN_WAYS[0])
        chains = (f"  chains: {len(c['chains']) - len(apart)} as one kernel, {len(apart)} not"
                  + "".join(f"; {layer}" for layer in apart)) if "chains" in c else ""
        print(f"network {c['impl']:<24}{c['when']:<8}{shown}{warm}{chains}")
    save(cases)
    return cases


def cli(argv=None):
    """main() as a command: the exit status FAULT_EXIT where a fault in the GPU ended the sweep."""
    try:
        main(argv)
    except Exception as err:
        if not fatal(err):
            raise
        print(f"sweep_convs.py: a fault in the GPU ended the sweep ({type(err).__name__}: {str(err)[:200]}); what "
              f"it measured is saved, and --resume goes on from there in a new process", file=sys.stderr)
        return FAULT_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(cli())
