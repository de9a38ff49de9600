"""What each fusion saves, layer by layer: a traffic model, per-kernel timing, a roofline, an ablation.

One row per layer of a torchvision ResNet: the stem, every conv of every block, the head. For
each row the traffic model counts the bytes that its kernels read and write in global memory,
from shapes and dtype alone, under each step of the ablation (bench.ABLATION):

    unfused     torchvision: conv, BatchNorm, ReLU, add, ReLU each read and write whole tensors
    fold        BatchNorm folded, but conv, bias add, ReLU and add still separate kernels
    epilogue    bias and ReLU in the conv's epilogue
    residual    the shortcut add and last ReLU in the last conv's epilogue
    downsample  the projection shortcut inside the last conv's GEMM
    stem        stem conv + max pooling in one kernel
    head        head average pooling + fc in one kernel (fuse's defaults)
    chain       a block's last conv and the next block's first in one kernel (chain_blocks=True)
    chain3x3    a Bottleneck's 3x3 conv inside its last conv's kernel (chain_3x3=True)

With X, W and Y the elements of a conv's input, weight and output, a conv + BN + ReLU moves
X + W + 5Y unfused (the conv writes Y; BN and ReLU each read and write it) and X + W + Y fused;
a block's last conv moves X + W + 8Y unfused (the add reads two tensors and writes one) and
X + W + 2Y fused (the shortcut is read in the epilogue); chained with the next block's first conv
(weight W', output Z), W' + Z more, and that conv's own row nothing; with its 3x3 conv inside (input X3,
weight W3), X3 + W3 in place of X, and the 3x3's own row nothing. Each count is a lower bound: every
operand is read once. Bias and BN parameter vectors are left out (under 0.1%).

The fused stem's conv reads its image as 2x2 blocks of pixels (kernels.igemm.space_to_depth, on
where nothing is timed: igemm.SPACE_TO_DEPTH; a GPU's first call times both layouts): one more
kernel first writes those blocks (B elements), which the conv then reads, so its row counts
X + 2B in place of X and one kernel more, and the FLOPs of the 2x2-blocked filter (a 7x7 over 3
channels becomes a 4x4 over 16: 256 multiply-adds an output for 147), the zeros included. A
grouped conv of small groups (ResNeXt's) runs them in bundles (kernels.igemm.bundle_groups):
its executed FLOPs count the zeros between a bundle's groups too.

On a GPU, each row's unfused and fused kernels are also timed (CUDA events, median), which gives
the achieved TFLOP/s and GB/s and the share of the roof of the GPU they ran on.
"""

import copy
import dataclasses
import math

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from . import bench, kernels
from .convert import fuse
from .kernels import igemm
from .modules import can_chain, can_chain_3x3

STEPS = tuple(step for step, _, _ in bench.ABLATION)

# Dense peak throughput (FLOP/s, by dtype) and memory bandwidth (bytes/s) from NVIDIA's data
# sheets, matched against torch.cuda.get_device_name; fp32 is the TF32 tensor-core peak when
# TF32 is allowed, else the FP32 one.
GPU_ROOFS = {
    "H200": ({"float16": 989e12, "bfloat16": 989e12, "tf32": 494e12, "float32": 67e12}, 4.8e12),
    "H100 PCIe": ({"float16": 756e12, "bfloat16": 756e12, "tf32": 378e12, "float32": 51e12}, 2.0e12),
    "H100": ({"float16": 989e12, "bfloat16": 989e12, "tf32": 494e12, "float32": 67e12}, 3.35e12),
    "A100": ({"float16": 312e12, "bfloat16": 312e12, "tf32": 156e12, "float32": 19.5e12}, 2.04e12),
}
# The roofs drawn for an analytic (CPU) profile, named as such on the chart.
ANALYTIC_ROOF_GPU = "H100"
ANALYTIC_ROOF_NAME = "H100 SXM from its data sheet (nothing measured)"


@dataclasses.dataclass
class Layer:
    """One row: a conv (with what follows it in torchvision) or the head, and its tensor sizes.

    kind: "stem" (conv, BN, ReLU, max pool), "conv" (conv, BN, ReLU), "last" (a block's last conv:
    conv, BN, add, ReLU), "downsample" (1x1 conv, BN), "head" (average pool, fc).
    Sizes are element counts: x input, w weight, y output, pooled (stem: the max pool's output;
    head: the pooled vector). shortcut names the downsample row a "last" row adds, if any.
    """

    name: str
    kind: str
    x_shape: tuple
    w_shape: tuple
    y_shape: tuple
    stride: tuple = (1, 1)
    flops: int = 0
    pooled: int = 0
    shortcut: str | None = None
    recompute: float = 1.0  # the stem kernel computes each conv pixel this many times
    chains: str | None = None  # a "last" row: the next block's first conv, which its kernel computes when chained
    chained: bool = False  # a "conv" row that the block before computes when chained
    head: str | None = None  # a "last" row: the block's 3x3 conv, which its kernel computes with chain_3x3
    in_head: bool = False  # a "conv" row (a 3x3) that its block's last conv computes with chain_3x3
    # The stem as space_to_depth runs it (0 where its conv reads the image itself): the elements of
    # the blocked copy of its input for the conv alone and for the conv + max pooling kernel (which
    # keeps a margin of zeros for the pool's padding), and the FLOPs of the blocked conv.
    blocks: int = 0
    pool_blocks: int = 0
    blocked_flops: int = 0
    # A grouped conv's fused kernel runs this many of its groups at once as one denser group
    # (kernels.igemm.bundle_groups): that many times the multiply-adds, the zeros between them included.
    bundle: int = 1

    @property
    def x(self):
        return math.prod(self.x_shape)

    @property
    def w(self):
        return math.prod(self.w_shape)

    @property
    def y(self):
        return math.prod(self.y_shape)


def step_on(step, fusion):
    """Whether ablation step `step` includes `fusion` (both names from STEPS)."""
    return STEPS.index(step) >= STEPS.index(fusion)


def traffic(layer, step, rows=None):
    """(elements moved, kernels launched) by `layer` under ablation step `step`.

    With the merged downsample, the last conv's kernel reads the shortcut's input and weight,
    so they are counted on the "last" row (its downsample row moves nothing); `rows` maps names
    to layers for that lookup.
    """
    x, w, y = layer.x, layer.w, layer.y
    fused_conv = step_on(step, "epilogue")
    chained = step_on(step, "chain")
    if layer.kind == "conv" and ((layer.chained and chained) or (layer.in_head and step_on(step, "chain3x3"))):
        return 0, 0
    if layer.kind == "last" and layer.head and step_on(step, "chain3x3"):
        x = rows[layer.head].x + rows[layer.head].w  # the kernel reads the 3x3's input and weight instead
    if layer.kind == "last" and layer.chains and chained:
        following = rows[layer.chains]
        own = x + w + 2 * y if layer.shortcut is None else x + w + y + rows[layer.shortcut].x + rows[layer.shortcut].w
        return own + following.w + following.y, 1
    if layer.kind == "conv":
        return (x + w + y, 1) if fused_conv else (x + w + 5 * y, 3)
    if layer.kind == "downsample":
        if step_on(step, "downsample"):
            return 0, 0
        return (x + w + y, 1) if fused_conv else (x + w + 3 * y, 2)
    if layer.kind == "last":
        if step_on(step, "downsample") and layer.shortcut is not None:
            ds = rows[layer.shortcut]
            return x + w + y + ds.x + ds.w, 1
        if step_on(step, "residual"):
            return x + w + 2 * y, 1
        return (x + w + 4 * y, 2) if fused_conv else (x + w + 8 * y, 4)
    if layer.kind == "stem":
        if not fused_conv:
            return x + w + 6 * y + layer.pooled, 4
        # A fused conv over 2x2 blocks: a kernel writes the blocked copy of x, the conv reads it.
        blocks = layer.pool_blocks if step_on(step, "stem") else layer.blocks
        copy = (2 * blocks, 1) if blocks else (0, 0)
        if step_on(step, "stem"):
            return x + w + layer.pooled + copy[0], 1 + copy[1]
        return x + w + 2 * y + layer.pooled + copy[0], 2 + copy[1]
    if layer.kind == "head":
        if step_on(step, "head"):
            return x + w + y, 1
        return x + 2 * layer.pooled + w + y, 2
    raise ValueError(f"unknown layer kind {layer.kind!r}")


def executed_flops(layer, step, rows=None):
    """FLOPs that `layer`'s kernels execute under `step` (merges, recomputation and the zeros of
    bundled groups and blocked filters included)."""
    if layer.kind == "downsample" and step_on(step, "downsample"):
        return 0
    if layer.kind == "conv" and ((layer.chained and step_on(step, "chain"))
                                 or (layer.in_head and step_on(step, "chain3x3"))):
        return 0
    flops = _kernel_flops(layer, step)
    if layer.kind == "last":
        if layer.shortcut is not None and step_on(step, "downsample"):
            flops += _kernel_flops(rows[layer.shortcut], step)
        if layer.chains and step_on(step, "chain"):
            flops += _kernel_flops(rows[layer.chains], step)
        if layer.head and step_on(step, "chain3x3"):
            flops += _kernel_flops(rows[layer.head], step)
    return flops


def _kernel_flops(layer, step):
    """The FLOPs of `layer`'s own conv as `step` runs it: torch's where the conv is not fused; fused,
    a grouped conv's bundles and the stem's blocked filter (with its pooling, each conv pixel
    `recompute` times)."""
    if not step_on(step, "epilogue"):
        return layer.flops
    if layer.kind == "stem":
        flops = layer.blocked_flops or layer.flops
        return round(flops * layer.recompute) if step_on(step, "stem") else flops
    return layer.flops * layer.bundle


def layers(model, batch, size):
    """The rows of a torchvision ResNet at this batch and image size, from shapes on the meta device."""
    model = copy.deepcopy(model).to("meta").eval()
    shapes = {}

    def record(name):
        def hook(module, inputs, output):
            shapes[name] = (tuple(inputs[0].shape), tuple(output.shape))
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear, nn.MaxPool2d, nn.AdaptiveAvgPool2d))]
    with torch.no_grad():
        model(torch.empty(batch, 3, size, size, device="meta"))
    for h in handles:
        h.remove()

    def conv_row(name, kind, conv, **extra):
        x_shape, y_shape = shapes[name]
        cg = conv.in_channels // conv.groups
        flops = 2 * math.prod(y_shape) * cg * conv.kernel_size[0] * conv.kernel_size[1]
        return Layer(name, kind, x_shape, tuple(conv.weight.shape), y_shape, tuple(conv.stride), flops,
                     bundle=igemm.bundle_size(cg, conv.groups), **extra)

    pool_in, pool_out = shapes["maxpool"]
    pool_size = model.maxpool.kernel_size
    taps = pool_size * pool_size if isinstance(pool_size, int) else math.prod(pool_size)
    stem = conv_row("conv1", "stem", model.conv1, pooled=math.prod(pool_out),
                    recompute=taps * math.prod(pool_out) / math.prod(pool_in))
    conv = model.conv1
    if igemm.space_to_depth_schedule(conv.weight, conv.stride, conv.dilation, conv.groups):
        n, _, p, q = stem.y_shape
        padding = model.maxpool.padding  # the pooled kernel's margin: its padding (an int or a pair)
        margin = max(padding) if isinstance(padding, (tuple, list)) else padding
        stem.blocks = math.prod(igemm.space_to_depth_shape(n, (p, q), conv.kernel_size))
        stem.pool_blocks = math.prod(igemm.space_to_depth_shape(n, (p, q), conv.kernel_size, margin))
        stem.blocked_flops = 2 * stem.y * 16 * math.ceil(conv.kernel_size[0] / 2) * math.ceil(conv.kernel_size[1] / 2)
    rows = [stem]
    # Every block in forward order: a stage's last block chains with the next stage's first.
    blocks = [(f"{stage}.{i}", block) for stage in ("layer1", "layer2", "layer3", "layer4")
              for i, block in enumerate(getattr(model, stage))]
    for index, (prefix, block) in enumerate(blocks):
        if not isinstance(block, (BasicBlock, Bottleneck)):
            raise TypeError(f"profile: {prefix} is a {type(block).__name__}, not a torchvision block")
        convs = ["conv1", "conv2"] + (["conv3"] if isinstance(block, Bottleneck) else [])
        ds = f"{prefix}.downsample" if block.downsample is not None else None
        chains = index + 1 < len(blocks) and can_chain(block, blocks[index + 1][1])
        chained = index > 0 and can_chain(blocks[index - 1][1], block)
        headed = can_chain_3x3(block)
        for conv_name in convs:
            last = conv_name == convs[-1]
            rows.append(conv_row(f"{prefix}.{conv_name}", "last" if last else "conv", getattr(block, conv_name),
                                 shortcut=ds if last else None,
                                 chains=f"{blocks[index + 1][0]}.conv1" if last and chains else None,
                                 chained=chained and conv_name == "conv1",
                                 head=f"{prefix}.conv2" if last and headed else None,
                                 in_head=headed and conv_name == "conv2"))
        if ds:
            row = conv_row(f"{ds}.0", "downsample", block.downsample[0])
            row.name = ds
            rows.append(row)
    head_in, _ = shapes["avgpool"]
    _, out = shapes["fc"]
    n, c = head_in[0], head_in[1]
    rows.append(Layer("fc", "head", head_in, tuple(model.fc.weight.shape), out,
                      flops=2 * n * c * model.fc.out_features + math.prod(head_in), pooled=n * c))
    return rows


# ---- timing on a GPU ------------------------------------------------------------------------


def _median_ms(fn, iters):
    """Median milliseconds of fn() between CUDA events, after warm-up (autotuning, compiling)."""
    return bench.time_call(fn, cuda=True, iters=iters)[0]


def _callables(layer, ref, fused, dtype, device):
    """(unfused, fused) zero-argument callables that run this layer's kernels on random inputs."""

    def rand(shape):
        return torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last) \
            if len(shape) == 4 else torch.randn(shape, device=device, dtype=dtype)

    x = rand(layer.x_shape)
    if layer.kind == "head":
        pool, fc = ref.avgpool, ref.fc
        return (lambda: fc(torch.flatten(pool(x), 1))), (lambda: fused.avgpool(x))
    if layer.kind == "stem":
        return (lambda: ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))), (lambda: fused.conv1(x))
    stage, index, conv_name = layer.name.split(".")
    block = getattr(ref, stage)[int(index)]
    fused_block = getattr(fused, stage)[int(index)]
    if layer.kind == "downsample":
        return (lambda: block.downsample(x)), None  # fused: inside the last conv (no kernel of its own)
    conv = getattr(block, conv_name)
    bn = getattr(block, "bn" + conv_name[-1])
    fused_conv = getattr(fused_block, conv_name)
    if layer.kind == "conv":
        return (lambda: block.relu(bn(conv(x)))), (lambda: fused_conv(x))
    residual_in = rand(_block_input_shape(layer, block)) if layer.shortcut else rand(layer.y_shape)
    identity = block.downsample(residual_in) if layer.shortcut else residual_in
    return (lambda: block.relu(bn(conv(x)) + identity)), (lambda: fused_conv(x, residual=residual_in))


def _block_input_shape(layer, block):
    ds = block.downsample[0]
    n, _, p, q = layer.y_shape
    return (n, ds.in_channels, (p - 1) * ds.stride[0] + 1, (q - 1) * ds.stride[1] + 1)


def roof(device, dtype):
    """(peak FLOP/s, bandwidth bytes/s, GPU name) for this device and dtype, or None if unknown."""
    on_gpu = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if on_gpu else ANALYTIC_ROOF_GPU
    for key, (peaks, bandwidth) in GPU_ROOFS.items():
        if key in name:
            dt = str(dtype).removeprefix("torch.")
            if dt == "float32" and on_gpu and kernels.backend.tf32_allowed():
                dt = "tf32"
            return peaks[dt], bandwidth, name if on_gpu else ANALYTIC_ROOF_NAME
    return None


def profile(model, *, batch, size, dtype, device, iters=20, ablation=True, progress=None):
    """Rows, totals and ablation of `model` (torchvision ResNet) as a dict ready for JSON.

    On a CUDA device each distinct layer is timed unfused (torchvision's modules) and fused (the
    fused module), and the ablation times the whole network at each step; elsewhere only the
    analytic columns are filled.
    """
    progress = progress or (lambda message: None)
    element = torch.empty((), dtype=dtype).element_size()
    rows = layers(model, batch, size)
    by_name = {r.name: r for r in rows}
    measured = device.type == "cuda"
    roof_info = roof(device, dtype)
    ref = fused = None
    if measured:
        bench.tuned_cudnn(device)
        ref = copy.deepcopy(model).to(device, dtype).to(memory_format=torch.channels_last).eval()
        progress("compiling the fused model's kernels")
        # in parallel, up front: the rows below call its layers one by one, which CompileAhead does not see
        fused = fuse(model, dtype=dtype, example=_example(batch, size, dtype, device))
    timed = {}
    out_rows = []
    for i, layer in enumerate(rows):
        unfused_bytes, unfused_kernels = traffic(layer, "unfused", by_name)
        fused_bytes, fused_kernels = traffic(layer, "head", by_name)
        row = {
            "layer": layer.name, "kind": layer.kind, "input": list(layer.x_shape), "weight": list(layer.w_shape),
            "output": list(layer.y_shape), "flops": layer.flops,
            "fused_flops": executed_flops(layer, "head", by_name),
            "unfused_bytes": unfused_bytes * element, "fused_bytes": fused_bytes * element,
            "bytes_ratio": round(unfused_bytes / fused_bytes, 3) if fused_bytes else None,
            "unfused_kernels": unfused_kernels, "fused_kernels": fused_kernels,
            # The downsample row whose 1x1 conv this row's kernel runs inside its GEMM, if any.
            "merged_shortcut": layer.shortcut if layer.kind == "last" else None,
            # The stem's blocked copy (space_to_depth), written and read, within fused_bytes.
            "space_to_depth_bytes": 2 * layer.pool_blocks * element,
        }
        if measured:
            key = (layer.kind, layer.x_shape, layer.w_shape, layer.y_shape, layer.stride, layer.shortcut is not None)
            if key not in timed:
                progress(f"timing layer {i + 1}/{len(rows)}: {layer.name}")
                unfused_fn, fused_fn = _callables(layer, ref, fused, dtype, device)
                timed[key] = (_median_ms(unfused_fn, iters), _median_ms(fused_fn, iters) if fused_fn else None)
            row["unfused_ms"], row["fused_ms"] = (round(t, 5) if t is not None else None for t in timed[key])
            _rates(row, roof_info)
        out_rows.append(row)
    result = {"rows": out_rows, "totals": _totals(out_rows), "analytic_only": not measured,
              "roof": None if roof_info is None else
              {"gpu": roof_info[2], "peak_flops": roof_info[0], "bandwidth_bytes_per_s": roof_info[1]}}
    if ablation:
        result["ablation"] = run_ablation(model, rows, by_name, element, batch, size, dtype, device, iters, progress)
    return result


def _rates(row, roof_info):
    for which in ("unfused", "fused"):
        ms = row[f"{which}_ms"]
        flops = row["flops"] if which == "unfused" else row["fused_flops"]
        if not ms:
            row[f"{which}_tflops"] = row[f"{which}_gbps"] = row[f"{which}_roof_pct"] = None
            continue
        seconds = ms / 1e3
        row[f"{which}_tflops"] = flops / seconds / 1e12
        row[f"{which}_gbps"] = row[f"{which}_bytes"] / seconds / 1e9
        if roof_info is not None:
            peak, bandwidth, _ = roof_info
            # The roof at this layer's arithmetic intensity: the lower of compute and bandwidth.
            bound_s = max(flops / peak, row[f"{which}_bytes"] / bandwidth)
            row[f"{which}_roof_pct"] = 100 * bound_s / seconds
        else:
            row[f"{which}_roof_pct"] = None


def _totals(rows):
    totals = {key: sum(r[key] for r in rows)
              for key in ("flops", "fused_flops", "unfused_bytes", "fused_bytes", "unfused_kernels", "fused_kernels")}
    totals["bytes_saved"] = totals["unfused_bytes"] - totals["fused_bytes"]
    for which in ("unfused", "fused"):
        times = [r.get(f"{which}_ms") for r in rows]
        totals[f"{which}_ms"] = round(sum(t for t in times if t), 4) if any(times) else None
    return totals


def _example(batch, size, dtype, device):
    return torch.randn(batch, 3, size, size, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)


def run_ablation(model, rows, by_name, element, batch, size, dtype, device, iters, progress):
    """One entry per ablation step: bytes and kernels from the traffic model, and the time on a GPU."""
    steps = []
    x = _example(batch, size, dtype, device) if device.type == "cuda" else None
    for i, (step, backend, switches) in enumerate(bench.ABLATION):
        moved = [traffic(layer, step, by_name) for layer in rows]
        entry = {"step": step, "description": bench.ABLATION_LABELS[step],
                 "bytes": sum(b for b, _ in moved) * element, "kernels": sum(k for _, k in moved), "ms": None}
        if x is not None:
            progress(f"ablation {i + 1}/{len(bench.ABLATION)}: {step}")
            if backend is None:
                net = copy.deepcopy(model).to(device, dtype).to(memory_format=torch.channels_last).eval()
                entry["ms"] = round(_median_ms(lambda net=net: net(x), iters), 4)
            else:
                net = fuse(model, dtype=dtype, **switches).to(device)  # (compiles in parallel at its first call)

                def run(net=net, backend=backend):
                    with kernels.use_backend(backend):
                        return net(x)

                entry["ms"] = round(_median_ms(run, iters), 4)
        steps.append(entry)
    return steps


# ---- text and chart -----------------------------------------------------------------------


def _mb(n):
    return f"{n / 1e6:,.1f}"


def format_table(result):
    """The per-layer table, the totals and the ablation as text."""
    rows = result["rows"]
    measured = not result["analytic_only"]
    head = f"{'layer':<22}{'output':>20}{'GFLOP':>9}{'MB unfused':>12}{'MB fused':>10}{'ratio':>7}{'kernels':>9}"
    if measured:
        head += f"{'ms unfused':>12}{'ms fused':>10}{'TFLOP/s':>9}{'GB/s':>8}{'% roof':>8}"
    lines = [head, "-" * len(head)]
    merged, blocked = [], None
    for r in rows:
        ratio = f"{r['bytes_ratio']:.2f}" if r["bytes_ratio"] else "-"
        if r.get("merged_shortcut"):
            ratio += "*"
            merged.append(r["merged_shortcut"])
        if r.get("space_to_depth_bytes"):
            ratio += "+"
            blocked = r
        line = (f"{r['layer']:<22}{'x'.join(map(str, r['output'])):>20}{r['flops'] / 1e9:>9.2f}"
                f"{_mb(r['unfused_bytes']):>12}{_mb(r['fused_bytes']):>10}{ratio:>7}"
                f"{str(r['unfused_kernels']) + '->' + str(r['fused_kernels']):>9}")
        if measured:
            fused_ms = f"{r['fused_ms']:.4f}" if r["fused_ms"] else "merged"
            line += (f"{r['unfused_ms']:>12.4f}{fused_ms:>10}{r['fused_tflops'] or 0:>9.1f}{r['fused_gbps'] or 0:>8.0f}"
                     f"{r['fused_roof_pct'] or 0:>8.1f}")
        lines.append(line)
    if merged:
        lines += ["", f"* the row's kernel also runs the projection shortcut merged into its GEMM ({merged[0]}"
                      + (f" and {len(merged) - 1} more" if len(merged) > 1 else "") + "): its fused bytes include the "
                      "shortcut's input and weight, and the shortcut's own row moves nothing. A ratio below 1 there "
                      "is the shortcut's traffic counted in this row; the saving shows in the shortcut's row."]
    if blocked:
        lines += ["", "+ the stem's conv reads its image as 2x2 blocks of pixels (space-to-depth), which one more "
                      f"kernel writes: its fused bytes include that copy, written and read, "
                      f"{_mb(blocked['space_to_depth_bytes'])} MB. (The layout that runs where nothing is timed; a "
                      "GPU's first call also times the direct one, and the conv apart from its pooling, and keeps "
                      "the fastest.)"]
    t = result["totals"]
    lines += ["", f"total: {t['flops'] / 1e9:,.1f} GFLOP ({t['fused_flops'] / 1e9:,.1f} executed fused); "
                  f"{_mb(t['unfused_bytes'])} MB unfused, {_mb(t['fused_bytes'])} MB fused, "
                  f"{_mb(t['bytes_saved'])} MB saved ({t['unfused_bytes'] / t['fused_bytes']:.2f}x less); "
                  f"kernels {t['unfused_kernels']} -> {t['fused_kernels']}"]
    if measured:
        lines.append(f"sum of per-layer times: {t['unfused_ms']:.3f} ms unfused, {t['fused_ms']:.3f} ms fused")
    if "ablation" in result:
        lines += ["", format_ablation(result["ablation"])]
    return "\n".join(lines)


def format_ablation(steps):
    """The ablation as a markdown table: one fusion added per row."""
    first = steps[0]["bytes"]
    lines = ["| step | what runs | MB moved | vs unfused | kernels | ms |", "|---|---|---:|---:|---:|---:|"]
    for s in steps:
        ms = f"{s['ms']:.3f}" if s["ms"] is not None else "-"
        lines.append(f"| {s['step']} | {s['description']} | {_mb(s['bytes'])} | {s['bytes'] / first:.2f} | "
                     f"{s['kernels']} | {ms} |")
    return "\n".join(lines)


README_BEGIN = "<!-- profile:begin (generated by fused-resnet profile --readme; do not edit by hand) -->"
README_END = "<!-- profile:end -->"


def readme_block(result, command):
    """The totals and the ablation, for the README's guide, with the command that made them."""
    t = result["totals"]
    kind = "analytic: bytes and kernels counted from shapes, nothing timed" if result["analytic_only"] else \
        f"measured on {result['roof']['gpu'] if result['roof'] else 'a GPU'}"
    return "\n".join([
        f"`{command}` ({kind})",
        "",
        f"Per forward pass: {t['flops'] / 1e9:,.0f} GFLOP; {_mb(t['unfused_bytes'])} MB moved unfused, "
        f"{_mb(t['fused_bytes'])} MB fused ({t['unfused_bytes'] / t['fused_bytes']:.2f}x less); "
        f"{t['unfused_kernels']} kernels unfused, {t['fused_kernels']} fused.",
        "",
        format_ablation(result["ablation"]),
    ])


def plot_roofline(result, path, title):
    """Every layer as a point, unfused and fused, under the roofs of the GPU (a PNG at `path`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roof_info = result["roof"]
    if roof_info is None:
        raise ValueError("plot_roofline: no roofs are known for this GPU, and the chart needs them")
    peak, bandwidth = roof_info["peak_flops"], roof_info["bandwidth_bytes_per_s"]
    measured = not result["analytic_only"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    points = {"unfused": ([], []), "fused": ([], [])}
    for r in result["rows"]:
        for which in points:
            flops = r["flops"] if which == "unfused" else r["fused_flops"]
            moved = r[f"{which}_bytes"]
            if not flops or not moved:
                continue
            intensity = flops / moved
            if measured:
                perf = r[f"{which}_tflops"]
                if not perf:
                    continue
            else:
                perf = min(peak, intensity * bandwidth) / 1e12  # the attainable bound, not a measurement
            points[which][0].append(intensity)
            points[which][1].append(perf)
    for which, color in (("unfused", "tab:blue"), ("fused", "tab:orange")):
        ax.scatter(*points[which], s=18, alpha=0.7, color=color, label=which)
    xs = [x for pts in points.values() for x in pts[0]] or [1.0]
    lo, hi = min(xs) / 2, max(max(xs) * 2, 2 * peak / bandwidth)
    ridge = peak / bandwidth
    ax.plot([lo, ridge, hi], [lo * bandwidth / 1e12, peak / 1e12, peak / 1e12], color="black", lw=1.2,
            label=f"roof: {bandwidth / 1e12:.2f} TB/s, {peak / 1e12:.0f} TFLOP/s")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte moved)")
    ax.set_ylabel("TFLOP/s" + ("" if measured else " (attainable bound, not measured)"))
    kind = "measured" if measured else "analytic"
    ax.set_title(f"{title}\n{kind}, roofs of {roof_info['gpu']}", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, which="both", alpha=0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
