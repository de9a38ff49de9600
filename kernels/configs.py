"""Kernel configs without minutes of autotuning: a tuned table shipped beside the kernels, a small
candidate set for what the table lacks, and a disk cache of what was tuned on this machine.

A config is the tile and launch shape of one kernel launch, e.g. {"BLOCK_M", "BLOCK_N", "BLOCK_K",
"GROUP_M", "num_warps", "num_stages"} for the GEMM-shaped kernels. It is looked up by (GPU family,
op, dtype, shape key):

1. tuned_configs.json beside this file, made by the conv sweep on the GPUs named there: a hit
   compiles one config and benchmarks nothing;
2. the disk cache, configs.json under $FUSED_RESNET_CACHE_DIR (default
   ~/.cache/fused_resnet), where earlier processes stored what they tuned;
3. the table's entry for the same chip under another name (SAME_CHIP: an H100 takes an H200's);
4. otherwise `candidates()` gives at most four configs for the shape class, each is timed once,
   and the fastest is stored in the disk cache for every later process.

Shape keys hold the layer's sizes (channels, kernel, strides, map) exactly and the batch only
through M, the GEMM's rows, rounded up to a power of two: a served model that sees a new batch
size reuses the configs of its neighbours instead of tuning every layer again. Delete the cache
folder, or call clear_cache(), to tune afresh.
"""

import contextlib
import functools
import json
import os
import pathlib
import tempfile
import threading
import warnings

import triton

TABLE_PATH = pathlib.Path(__file__).with_name("tuned_configs.json")
GPU_FAMILIES = ("B200", "H200", "H100", "A100", "L40S", "L4")

_lock = threading.Lock()
_table = None  # {(gpu, op, dtype, key): config}, read once
_cache = None  # the disk cache, read once per process and written through
_forced = None  # (config, entries asked for) inside override()
_unwritable = None  # the cache folder that could not be written, once warned of


def gpu_family(device_name: str) -> str:
    """The table's name for a GPU: "H100" for "NVIDIA H100 80GB HBM3", the full name otherwise."""
    return next((family for family in GPU_FAMILIES if family in device_name), device_name)


def bucket(m: int) -> int:
    """M rounded up to a power of two (at least 16), as the shape keys hold it."""
    return max(16, triton.next_power_of_2(m))


def shape_key(**sizes) -> str:
    """A stable text key from a layer's sizes; pass M as `M`, which is bucketed."""
    if "M" in sizes:
        sizes = {**sizes, "M": bucket(sizes["M"])}
    return ",".join(f"{name}={_text(value)}" for name, value in sorted(sizes.items()))


def _text(value):
    if isinstance(value, (tuple, list)):
        return "x".join(str(v) for v in value)
    return str(int(value)) if isinstance(value, bool) else str(value)


def cache_dir() -> pathlib.Path:
    """Where tuned configs are kept across processes."""
    return pathlib.Path(os.environ.get("FUSED_RESNET_CACHE_DIR") or pathlib.Path.home() / ".cache" / "fused_resnet")


# GPU families that are one chip under two names: the H200 is the H100's GH100 (the SXM parts both
# with 132 SMs) with more and faster memory. Where the table has no entry for one, the other's
# serves before anything is tuned: a config swept there over dozens of candidates is a better
# first guess than the few candidates a first call would time.
SAME_CHIP = {"H100": "H200", "H200": "H100"}


def lookup(gpu: str, op: str, dtype: str, key: str):
    """The config for this launch from the shipped table or the disk cache, or None; where neither
    has one for this GPU, the shipped table's for the same chip under another name (SAME_CHIP)."""
    entry = (gpu, op, dtype, key)
    if _forced is not None:
        _forced[1].append(entry)
        return _forced[0]
    with _lock:
        table = _load_table()
        found = table.get(entry)
        if found is None:
            found = _load_cache().get(entry)
        if found is None and gpu in SAME_CHIP:
            found = table.get((SAME_CHIP[gpu], op, dtype, key))
        return found


def remember(gpu: str, op: str, dtype: str, key: str, config: dict):
    """Store a tuned config in the disk cache (written at once, atomically, with what other
    processes stored there since this one read it: processes that tune at once lose nothing).
    Where the cache folder cannot be written (a read-only home, say), this process keeps the
    config, and a warning says that later ones will tune again."""
    global _unwritable
    config = {k: int(v) for k, v in config.items()}
    with _lock:
        cache = _load_cache()
        cache.update(_read(cache_dir() / "configs.json"))
        cache[(gpu, op, dtype, key)] = config
        folder = cache_dir()
        entries = [dict(zip(("gpu", "op", "dtype", "key"), e), config=c) for e, c in sorted(cache.items())]
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as f:
                json.dump({"version": 1, "entries": entries}, f, indent=1)
            os.replace(f.name, folder / "configs.json")
        except OSError as err:
            if _unwritable != folder:  # once a folder
                _unwritable = folder
                warnings.warn(f"fused_resnet: cannot write the tuned-config cache in {folder} ({err}); this "
                              f"process keeps what it tunes, later ones tune again. Set FUSED_RESNET_CACHE_DIR "
                              f"to a writable folder.", stacklevel=2)


def cached(gpu: str, ops) -> dict:
    """The disk cache's entries for `ops` on the GPU family `gpu`, {(gpu, op, dtype, key): config}:
    what first calls on this machine chose."""
    with _lock:
        found = _read(cache_dir() / "configs.json")
    return {entry: config for entry, config in found.items() if entry[0] == gpu and entry[1] in ops}


def forced() -> bool:
    """Whether an override() is in force."""
    return _forced is not None


@contextlib.contextmanager
def override(config: dict):
    """Within the `with` block every lookup answers `config`: how a sweep builds a plan with the
    config it wants to time. Yields the list of (gpu, op, dtype, key) entries looked up, which
    are the table entries a winning config belongs under. Not thread-safe: for sweeps."""
    global _forced
    previous, _forced = _forced, (dict(config), [])
    try:
        yield _forced[1]
    finally:
        _forced = previous


def write_table(entries, path=None):
    """Merge {(gpu, op, dtype, key): config} into the shipped table at `path` (default TABLE_PATH; the
    sweep's output)."""
    global _table
    path = TABLE_PATH if path is None else path
    with _lock:
        table = _read(pathlib.Path(path))
        table.update({entry: {k: int(v) for k, v in config.items()} for entry, config in entries.items()})
        rows = [dict(zip(("gpu", "op", "dtype", "key"), e), config=c) for e, c in sorted(table.items())]
        with open(path, "w") as f:
            json.dump({"version": 1, "entries": rows}, f, indent=1)
            f.write("\n")
        _table = None


def clear_cache():
    """Forget every config tuned on this machine (the shipped table stays)."""
    global _cache
    with _lock:
        path = cache_dir() / "configs.json"
        if path.exists():
            path.unlink()
        _cache = None


def _read(path):
    if not path.exists():
        return {}
    try:
        with open(path) as f:
            payload = json.load(f)
        return {(e["gpu"], e["op"], e["dtype"], e["key"]): {k: int(v) for k, v in e["config"].items()}
                for e in payload["entries"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # a damaged cache is tuned again, not trusted


def _load_table():
    global _table
    if _table is None:
        _table = _read(TABLE_PATH)
    return _table


def _load_cache():
    global _cache
    if _cache is None:
        _cache = _read(cache_dir() / "configs.json")
    return _cache


# The most shared memory one program may take on an H100 (228 KB an SM, 1 KB of it reserved a
# program): the config lists' default limit.
H100_SHARED_MEMORY = 227 * 1024


# Under the interpreter every program and every block op runs in Python, so few large tiles beat
# many small ones; tiles shrink to the layer so that small groups do not pay for padding.
INTERPRETER_MAX_BLOCK = 128


def interpreted(default: dict) -> dict:
    """A launch's config under the Triton interpreter: `default` (its small tiles), or inside a
    non-empty override() the config forced, as a GPU would run it: how a sweep's configs are
    checked on a CPU before a GPU times them."""
    return dict(_forced[0]) if _forced is not None and _forced[0] else default


def interpreter(m: int, n: int, reduction: int) -> dict:
    """The tiles of a GEMM-shaped launch under the Triton interpreter (CPU tests), no tuning."""
    def fit(size):
        return min(INTERPRETER_MAX_BLOCK, max(16, triton.next_power_of_2(size)))

    return {"BLOCK_M": fit(m), "BLOCK_N": fit(n), "BLOCK_K": fit(reduction), "GROUP_M": 8}


def _capped(shapes, m, n, reduction):
    """(BLOCK_M, BLOCK_N, BLOCK_K, stages, warps) shapes with each tile capped to the GEMM's sizes."""
    cap_m, cap_n, cap_k = (max(16, triton.next_power_of_2(v)) for v in (m, n, reduction))
    for bm, bn, bk, stages, warps in shapes:
        yield min(bm, cap_m), min(bn, cap_n), min(bk, cap_k), stages, warps


def _config(bm, bn, bk, stages, warps, switches):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, **switches, "num_warps": warps,
            "num_stages": stages}


# The most fp32 accumulator elements (BLOCK_M * BLOCK_N / threads) a config may give each thread.
# Compiled for an H100 (ptxas -v), one-accumulator convs do not spill registers at 128; the stem's
# conv+max-pool kernel, which holds two such tiles (the running maximum and the conv tile) across
# a loop over the pooling taps, spills at 64 (128x64 over 4 warps: 712 bytes; 256x64 over 8: 688)
# and not at 32: its launches pass 32.
MAX_ACC_PER_THREAD = 128


def _fits_registers(bm, bn, warps, max_acc_per_thread):
    return bm * bn <= max_acc_per_thread * 32 * warps


def gemm_shared_bytes(config, element_size):
    """The shared memory of a config's pipelined GEMM loop: each stage holds an operand tile of
    (BLOCK_M, BLOCK_K) and one of (BLOCK_K, BLOCK_N)."""
    return (config["BLOCK_M"] + config["BLOCK_N"]) * config["BLOCK_K"] * element_size * config["num_stages"]


# fp32 dots in IEEE precision (TF32 not allowed) run on the FMA units, not the tensor cores, and
# hold their operand fragments in registers beside the accumulator: compiled for an H100, a 3x3's
# 128x64x32 tile over 4 warps (64 accumulators a thread) took 254 registers a thread and several
# spilled; at 32 accumulators a thread, 128 registers and none (compile_report.py --no-tf32).
IEEE_FP32_SHAPES = [(128, 64, 16, 3, 8), (64, 128, 16, 3, 8), (64, 64, 32, 3, 4), (32, 64, 32, 2, 4)]


def candidates(m: int, n: int, reduction: int, element_size: int, shared_memory: int = H100_SHARED_MEMORY,
               switches=None, max_acc_per_thread: int = MAX_ACC_PER_THREAD, shared_bytes=None, ieee: bool = False):
    """At most four configs for a GEMM of m rows, n columns and a reduction this long, from its
    shape class: wide tiles for large memory-bound layers, small ones where few tiles exist,
    smaller K tiles and fewer stages for 4-byte (fp32) operands, and with `ieee` (fp32 dots in
    IEEE precision) at most 32 accumulator elements a thread (IEEE_FP32_SHAPES). Each fits
    `shared_memory` (as `shared_bytes(config)` counts it; gemm_shared_bytes if None) and gives
    no thread more than `max_acc_per_thread` accumulator elements; `switches` (the kernel's own,
    such as FLAT_LOOP) are added to each."""
    shared_bytes = shared_bytes or functools.partial(gemm_shared_bytes, element_size=element_size)
    fp32 = element_size >= 4
    if fp32 and ieee:
        shapes = IEEE_FP32_SHAPES
    elif fp32:
        shapes = [(128, 64, 32, 3, 4), (64, 128, 32, 3, 4), (64, 64, 32, 3, 4), (32, 64, 32, 2, 4)]
    elif m >= 65536:
        # (256x64 tiles take BLOCK_K 64: at 32, compiled for an H100, the gathered loop issues 0.98
        # instructions per tensor-core cycle of its MMAs for a 3x3, 0.61 at 64; compile_report.py.)
        shapes = [(128, 128, 64, 3, 8), (128, 64, 64, 4, 4), (256, 64, 64, 3, 8), (64, 128, 64, 4, 4)]
    else:
        shapes = [(64, 64, 64, 4, 4), (128, 64, 64, 3, 4), (64, 128, 32, 4, 4), (32, 64, 64, 4, 4)]
    kept = []
    for bm, bn, bk, stages, warps in _capped(shapes, m, n, reduction):
        if not _fits_registers(bm, bn, warps, max_acc_per_thread):
            continue
        config = _config(bm, bn, bk, stages, warps, switches or {})
        while shared_bytes(config) > shared_memory and config["num_stages"] > 1:
            config["num_stages"] -= 1
        if shared_bytes(config) <= shared_memory:
            kept.append(config)
    return distinct_kernels(kept)


def cap_stages(found, trips):
    """`found` with each config's num_stages cut to trips(config) + 1 (at least 2), duplicates
    dropped: a pipelined loop of few trips (a 1x1 conv over 64 channels makes one) fills no more
    stages, and each stage holds shared memory that would let another program share the SM, which
    a memory-bound layer needs to keep enough loads in flight."""
    return distinct_kernels([{**config, "num_stages": min(config["num_stages"], max(2, trips(config) + 1))}
                             for config in found])


# Split-K (a config's SPLIT_K): the programs that share one output tile, each running a stretch of
# its main loop. At batch 1 a ResNet-50's later convs have few output tiles (a 7x7 map by 512
# channels: 8 tiles of 64x64) and long loops (a 3x3 over 512 channels: 72 trips of 64 channels),
# so unsplit they keep 8 of an H100's 132 SMs busy.
H100_SMS = 132
MIN_SPLIT_TRIPS = 4  # the fewest trips a split runs: below that its loads have nothing to overlap


def split_k(tiles: int, trips: int, sms: int) -> int:
    """The ways to split a main loop of `trips` whose launch has `tiles` output tiles on a GPU of
    `sms` SMs: enough that the programs fill the SMs once, each running at least MIN_SPLIT_TRIPS
    trips; 1 (no split) where the tiles alone fill half the SMs."""
    if tiles == 0 or 2 * tiles >= sms:
        return 1
    return max(1, min(trips // MIN_SPLIT_TRIPS, triton.cdiv(sms, tiles)))


def split_variant(m, n, groups, trips, sms):
    """How a config of a GEMM-shaped launch over m rows and n columns (per group) runs split-K: the
    config with SPLIT_K (split_k), or None where its tiles fill the GPU's `sms` well enough unsplit.
    `trips(config)` is its main loop's trips. (Each split runs at least MIN_SPLIT_TRIPS of them, so
    no config's stages outnumber what its stretch fills.)"""
    def variant(config):
        tiles = triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]) * groups
        ways = split_k(tiles, trips(config), sms)
        return {**config, "SPLIT_K": ways} if ways > 1 else None

    return variant


def with_variants(candidates, *variants):
    """The first call's candidates with the first two also as each `variant(config)` (split-K, box
    tiles, the dense GEMM through descriptors; None: that one does not fit), timed first; at most
    four. Compiled for an H100, at the same tile, box tiles issue about half the instructions per
    tensor-core cycle of the gathered loop (3x3, 128x64x64: 86 against 158), the dense 1x1 four
    fifths (84 against 105)."""
    found = [v for variant in variants for v in map(variant, candidates[:2]) if v is not None]
    return (found + candidates)[:4]


# The sweep's wider lists (benchmarks/sweep_convs.py): PyTorch Inductor's conv configs and the
# Triton Hopper matmul tutorial's, as (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps); fp32 has its own.
SWEEP_16BIT = [
    (64, 256, 16, 2, 4), (256, 64, 16, 2, 4), (128, 128, 32, 2, 8), (64, 64, 32, 2, 4), (64, 256, 32, 2, 8),
    (256, 64, 32, 2, 8), (128, 128, 64, 3, 8), (128, 256, 64, 3, 8), (128, 128, 64, 4, 4), (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4), (256, 128, 64, 3, 8), (64, 64, 64, 4, 4), (32, 64, 64, 4, 4),
    # Deeper channel blocks, which cut a gathered loop's instructions per MMA cycle by a third (0.62
    # -> 0.43 for a 128x64 3x3, 0.41 -> 0.29 for a 1x1; compiled for an H100, compile_report.py).
    (256, 64, 64, 3, 8), (128, 64, 128, 3, 4), (128, 64, 128, 3, 8), (128, 128, 128, 3, 8),
]
SWEEP_FP32 = [(128, 64, 32, 3, 4), (64, 128, 32, 3, 4), (64, 64, 32, 3, 4), (128, 128, 16, 3, 8), (32, 64, 32, 2, 4)]
SWEEP_IEEE_FP32 = IEEE_FP32_SHAPES + [(64, 64, 16, 3, 4), (128, 64, 32, 2, 8)]


def sweep_candidates(m, n, reduction, element_size, shared_memory=H100_SHARED_MEMORY, variants=({"FLAT_LOOP": 1},),
                     max_acc_per_thread=MAX_ACC_PER_THREAD, shared_bytes=None, ieee=False):
    """Every config of the sweep's list for this GEMM (with `ieee`, fp32 dots in IEEE precision,
    its own): tiles capped to the layer, pruned to what fits `shared_memory` and registers (as
    candidates()), once per kernel variant in `variants` (the kernel's own switches, such as
    FLAT_LOOP and USE_TMA)."""
    shared_bytes = shared_bytes or functools.partial(gemm_shared_bytes, element_size=element_size)
    shapes = SWEEP_16BIT if element_size < 4 else (SWEEP_IEEE_FP32 if ieee else SWEEP_FP32)
    kept = []
    for bm, bn, bk, stages, warps in _capped(shapes, m, n, reduction):
        if not _fits_registers(bm, bn, warps, max_acc_per_thread):
            continue
        for variant in variants:
            config = _config(bm, bn, bk, stages, warps, variant)
            if shared_bytes(config) <= shared_memory:
                kept.append(config)
    return distinct_kernels(kept)


def same_kernel(config):
    """What of a config makes its kernel: the row schedule (ROWS) reduces a filter row at a time,
    whatever BLOCK_K says, so its configs that differ in BLOCK_K alone compile to one kernel."""
    return tuple(sorted((k, v) for k, v in config.items() if not (k == "BLOCK_K" and config.get("ROWS"))))


def distinct_kernels(found):
    """`found` in order, less each config whose kernel (same_kernel) an earlier one compiles: a
    first call or a sweep compiles and times each kernel once."""
    kept, kernels = [], set()
    for config in found:
        if (kernel := same_kernel(config)) not in kernels:
            kept.append(config)
            kernels.add(kernel)
    return kept


# The head (avgpool_linear): (BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_HW, stages, warps). Its time is the
# pooling: every element of the feature maps is converted and added once by each program whose
# images it belongs to, a tile of BLOCK_M images by BLOCK_N classes. Few images a tile (16, the
# least a tl.dot takes) keep a program's additions few; many classes a tile keep the programs that
# read each image's maps again few (a ResNet's 1000 classes: 4 at 256). BLOCK_HW pixels are read
# at once (32-64 registers of loads in flight a thread).
HEAD_16BIT = [(16, 256, 64, 16, 2, 8), (16, 128, 64, 16, 2, 4), (16, 64, 64, 16, 2, 4), (32, 256, 64, 8, 2, 8)]
HEAD_FP32 = [(16, 256, 32, 16, 2, 8), (16, 128, 32, 8, 2, 4), (16, 64, 32, 8, 2, 4)]
HEAD_SWEEP_16BIT = HEAD_16BIT + [
    (16, 512, 64, 8, 2, 8), (16, 256, 128, 8, 2, 8), (16, 256, 64, 8, 3, 8), (16, 128, 64, 8, 2, 4),
    (32, 128, 64, 8, 2, 8), (16, 64, 128, 8, 2, 4), (64, 64, 64, 8, 2, 4), (16, 1024, 64, 8, 2, 8),
]


def head_candidates(images: int, classes: int, channels: int, pixels: int, element_size: int, sweep: bool = False,
                    sms: int = H100_SMS):
    """The head kernel's configs for `images` maps of `channels` x `pixels` into `classes`: at most
    four (the sweep's wider list with `sweep`), tiles capped to the sizes. Where the first one's
    tiles fill fewer than half of the GPU's `sms` (a small batch: at batch 1, 4 to 16 tiles), the
    first two split-K over the channel blocks (SPLIT_K) first; the sweep times every one split."""
    shapes = HEAD_FP32 if element_size >= 4 else (HEAD_SWEEP_16BIT if sweep else HEAD_16BIT)
    cap_hw = triton.next_power_of_2(pixels)
    kept = []
    for *tiles, hw, stages, warps in shapes:
        config = {**_config(*next(_capped([(*tiles, stages, warps)], images, classes, channels)), {}),
                  "BLOCK_HW": min(hw, cap_hw)}
        if config not in kept:
            kept.append(config)
    split = split_variant(images, classes, 1, lambda c: triton.cdiv(channels, c["BLOCK_K"]), sms)
    if sweep:
        return kept + [v for v in map(split, kept) if v is not None]
    return kept if split(kept[0]) is None else with_variants(kept, split)


def head_interpreter(images: int, classes: int, channels: int, pixels: int) -> dict:
    """The head's tiles under the Triton interpreter: interpreter()'s, reading up to 16 pixels at once."""
    return {**interpreter(images, classes, channels), "BLOCK_HW": min(16, triton.next_power_of_2(pixels))}


# The chained 1x1 convs (chain_1x1): (BLOCK_M, BLOCK_N, stages, warps). A program holds x's tile
# (BLOCK_M by all of x's channels), y's chunk and z's accumulator (BLOCK_M by all of z's channels)
# at once, so its rows are fewer than a plain GEMM tile's where z is wide.
CHAIN_SHAPES = [(128, 64, 2, 8), (64, 64, 2, 4), (64, 64, 2, 8), (64, 32, 3, 4), (32, 64, 2, 4), (16, 32, 2, 4)]


def chain_block_k(channels, element_size, interpreter=False):
    """The channels a step of a chain's loop over `channels` takes (its head conv's main loop, a
    streamed shortcut input): BLOCK_K, or BLOCK_S; 16 where there is no such loop (0 channels)."""
    cap = 32 if interpreter or element_size >= 4 else 64
    return min(cap, max(16, triton.next_power_of_2(channels))) if channels else 16


def chain_shared_bytes(config, block_c, block_j, element_size, block_s=0):
    """Shared memory of a chain config: x's (and the shortcut input's) tile once, per stage a chunk of
    each weight, and y's fp32 chunk once more, where the compiler converts its layout (compiled for
    an H100, the resnet50 chains' configs took this to the byte, or 16 KB less). With a head, its
    main loop runs before the chain's and its buffers (per stage BLOCK_M by BLOCK_K of its input and
    BLOCK_K by block_c of its weight, then x's tile) are used again by the chain's: the larger of
    the two loops counts (compiled for an H100, resnet50's shapes took this, or 8 KB less)."""
    bm, bn, stages = config["BLOCK_M"], config["BLOCK_N"], config["num_stages"]
    chain = (bm * (block_c + block_s) + (block_c + block_s + block_j) * bn * stages) * element_size + bm * bn * 4
    if not config.get("HEAD"):
        return chain
    head = ((bm + block_c) * config["BLOCK_K"] * stages + bm * block_c) * element_size
    return max(chain, head)


def chain_candidates(block_c, k, block_j, element_size, shared_memory=H100_SHARED_MEMORY, ieee=False, block_s=0,
                     head_channels=0):
    """At most four configs for a chain over x of block_c channels (a power of two; and a projection
    shortcut's input of block_s, or a step of it where it is streamed) into y of k and z of block_j
    (0: no next conv): accumulators (y's chunk and z's; a head's, x's whole tile in fp32) within
    MAX_ACC_PER_THREAD elements a thread (32 with IEEE fp32 dots, whose operands sit in registers
    too), the input tiles within as many again. None may fit (wide fp32 chains): the chain then runs
    as separate convs. With a head (head_channels > 0: x is made by a conv over that many
    channels), each config takes its BLOCK_K."""
    limit = 32 if ieee else MAX_ACC_PER_THREAD
    block_k = chain_block_k(head_channels, element_size)
    kept = []
    for bm, bn, stages, warps in CHAIN_SHAPES:
        bn = min(bn, max(16, triton.next_power_of_2(k)))
        threads = 32 * warps
        config = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": block_k, "num_warps": warps, "num_stages": stages}
        room = limit * threads
        fits = (bm * (block_j + bn) <= room and bm * (block_c + block_s) * element_size // 4 <= room
                and (not head_channels or bm * block_c <= room)
                and chain_shared_bytes({**config, "HEAD": bool(head_channels)}, block_c, block_j, element_size,
                                       block_s) <= shared_memory)
        if fits and config not in kept:
            kept.append(config)
    return kept[:4]
