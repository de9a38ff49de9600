"""The implicit-GEMM core that every conv kernel here is built on.

A convolution is a GEMM whose rows are output pixels (N*P*Q), whose columns are output channels
(K / groups per group) and whose reduction runs over R*S*(C / groups). Nothing is unfolded in
memory ("implicit" GEMM): each program gathers its tile of the input on the fly from the NHWC
activations. This module holds what the conv kernels share:

    dot                     acc += a @ b, the one place the interpreter's operand upcast is written
    tile_ids, output_tile   which output tile a program owns (grouped order, for L2 reuse)
    output_box              the same as a box of pixels of one image (box tiles)
    conv_tile               the main loop: acc += one tile of conv(x, w), gathered by pointers
    next_block              the main loops' (tap, channel block) counters
    row_runs, row_filters   the row schedule's operand tiles (few-channel convs over dense rows)
    dense_tile, box_tile    the main loop read through tensor descriptors (1x1; boxes, stride 1 or 2)
    residual_tile           the residual's tile by pointers, where no tensor descriptor reads it
    epilogue                bias, residual, ReLU on the fp32 accumulator
    conv_launch             the host side: a KernelLaunch with the conv's sizes, strides and flags
    check_conv_args, normalize_args, output_size   argument checks and F.conv2d's argument forms

kernels/conv2d.py (conv + epilogue, with an optional projection shortcut in the same GEMM) and
kernels/conv2d_maxpool.py (conv + max pooling) are kernels built from these pieces.
"""

import torch
import triton
import triton.language as tl

from . import backend, configs, precompile
from ._checks import check_same_device, check_supported_dtype, pair

# ----------------------------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------------------------

# Below this many channels a group, the reduction is flattened over (r, s, c) so that tl.dot gets
# a usable K (the 3-channel 7x7 stem: 147 in one flat reduction instead of 49 reductions of 3).
FLAT_K_BELOW = 16
# Such a conv over its own channels (the 7x7 stem over 3, not space-to-depth's 16) in fp32 holds its
# input runs beside the accumulator: compiled for an H100 in TF32, the stem's 128x64 tile over 4
# warps (64 accumulators a thread) took 254 registers a thread on triton 3.6 and spilled 108 bytes
# on triton 3.8; at 64x64, 167-179 registers. So its fp32 candidates hold at most this many.
FEW_CHANNELS_FP32_MAX_ACC = 32

# A grouped conv's groups of fewer input channels than this run in bundles as one denser group
# each (bundle_groups).
BUNDLE_CHANNELS = 64

# The main loop under the interpreter (a config's FLAT_LOOP on a GPU): the tests run both.
INTERPRETER_FLAT_LOOP = 1
# Whether a few-channel conv over dense NHWC rows takes the row schedule under the interpreter (a
# config's ROWS on a GPU): the tests run both.
INTERPRETER_ROWS = 1
# Whether a dense 1x1 conv reads through tensor descriptors under the interpreter (a config's
# USE_TMA on a GPU): the tests run both.
INTERPRETER_TMA = 0
# The box width of a stride-1 conv's box tiles under the interpreter (a config's BOX_W on a GPU;
# 0: rows of the flattened output, gathered): the tests run both.
INTERPRETER_BOX_W = 0
# Split-K's ways under the interpreter (a config's SPLIT_K on a GPU), for kernels that take it: the
# tests run several.
INTERPRETER_SPLIT_K = 1
# Whether a few-channel stride-2 conv (the stem) runs as a stride-1 conv over 2x2 pixel blocks
# (space_to_depth) where nothing is timed: under the interpreter, while tracing, under
# configs.override. It changes the operands, not just the kernel, so it is a plan's choice rather
# than a config's: plans built while it is set take it. On a GPU a plan times both layouts at its
# first call and keeps the faster (backend.PlanChoice; this one is its way 0). On from the compiled
# code, before any GPU timing of it: for an H100 the direct stem's input runs load one 2-byte
# element at a time, synchronously inside the main loop (nothing to overlap with its MMAs), 1827
# instructions a warp per pooling tap; space-to-depth's load as pipelined 16-byte copies, 557
# (compile_report.py). benchmarks/sweep_convs.py times both and ships the faster in the table.
SPACE_TO_DEPTH = True


# The GPU a launch on `x` runs on is precompile.launch_target(x): x's, or, for the CPU tensors of
# the interpreter and of precompile.compile_only, the GPU they plan for.


def launch_shared_memory(x):
    """The shared memory a program may take on the GPU a launch on `x` runs on."""
    return precompile.launch_target(x).shared_memory


def launch_multiprocessors(x):
    """The SMs of the GPU a launch on `x` runs on."""
    return precompile.launch_target(x).multiprocessors


def launch_has_tma(x):
    """Whether the GPU a launch on `x` runs on copies tensor-descriptor tiles in hardware (the Tensor
    Memory Accelerator, compute capability 9.0 and newer). Older GPUs compile descriptor loads into
    the pointer loads the other schedules already make, so there they are not tried."""
    return precompile.launch_target(x).capability >= 90


# ----------------------------------------------------------------------------------------------
# The GEMM core (@triton.jit helpers)
# ----------------------------------------------------------------------------------------------


@triton.jit
def dot(acc, a, b, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc + a @ b in fp32. DOT_FP32 upcasts the operands first: the interpreter's bf16 dot is wrong."""
    if DOT_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program in grouped order (Triton matmul tutorial): programs that
    run together share rows of the input, so the gathered activations stay in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def output_tile(M, Kg, P, Q, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's tile of a conv's output, whose rows are (n, p, q) pixels of a P x Q map and whose
    columns are output channels of group program_id(1): (m, mask_n, n, p, q, group, channel), where
    m is each row's index among the M output pixels (past M for the last tile's spare rows), so that
    in a dense NHWC tensor of the output's shape row m starts at m * K."""
    group = tl.program_id(1)
    pid_m, pid_n = tile_ids(M, Kg, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows past M wrap onto valid pixels, so unpadded loads need no row mask; the store masks them.
    rows = offs_m % M
    q = rows % Q
    p = (rows // Q) % P
    n = rows // (P * Q)
    return offs_m, offs_n < Kg, n, p, q, group, group * Kg + offs_n


@triton.jit
def output_box(M, Kg, P, Q, BOX_H: tl.constexpr, BOX_W: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's tile of a conv's output as a box of BOX_H x BOX_W pixels of one image (rows
    in row-major order) by BLOCK_N output channels: (mask_m, mask_n, n, p, q, cols, p0, q0, k0),
    where (p0, q0) is the box's top-left pixel and k0 its first channel. One group only."""
    boxes_p = tl.cdiv(P, BOX_H)
    boxes_q = tl.cdiv(Q, BOX_W)
    pid_box, pid_n = tile_ids((M // (P * Q)) * boxes_p * boxes_q, Kg, 1, BLOCK_N, GROUP_M)
    n = pid_box // (boxes_p * boxes_q)
    p0 = (pid_box // boxes_q) % boxes_p * BOX_H
    q0 = pid_box % boxes_q * BOX_W
    i = tl.arange(0, BOX_H * BOX_W)
    p = p0 + i // BOX_W
    q = q0 + i % BOX_W
    k0 = pid_n * BLOCK_N
    cols = k0 + tl.arange(0, BLOCK_N)
    return (p < P) & (q < Q), cols < Kg, n, p, q, cols, p0, q0, k0


# Up to this many taps, which of a row's taps fall inside the map is one bit each of an int32
# computed before the main loop (taps_inside); past it, each iteration compares the tap's position.
MAX_TAP_BITS = tl.constexpr(32)


@triton.jit
def taps_inside(h0, w0, H, W, dil_h, dil_w, R: tl.constexpr, S: tl.constexpr):
    """Per row, bit r * S + s set when tap (r, s) of the window at (h0, w0) lies inside the H x W
    map (R * S <= MAX_TAP_BITS; else None, and tap_inside compares instead)."""
    if R * S <= MAX_TAP_BITS:
        bits = tl.zeros_like(h0)
        for rs in tl.static_range(R * S):
            ih = h0 + (rs // S) * dil_h
            iw = w0 + (rs % S) * dil_w
            bits |= ((ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)).to(tl.int32) << rs
    else:
        bits = None
    return bits


@triton.jit
def tap_inside(bits, h0, w0, H, W, dh, dw, rs, R: tl.constexpr, S: tl.constexpr):
    """Per row, whether tap rs (offset (dh, dw) from the window's corner) lies inside the map."""
    if R * S <= MAX_TAP_BITS:
        inside = (bits & (1 << rs)) != 0
    else:
        inside = (h0 + dh >= 0) & (h0 + dh < H) & (w0 + dw >= 0) & (w0 + dw < W)
    return inside


@triton.jit
def next_block(rs, c0, Cg, BLOCK_K: tl.constexpr):
    """(tap, first channel) of the main loop's next iteration over (tap, channel block) pairs.

    Counters rather than i // k_blocks: a division by a number the compiler does not know costs
    more than the rest of an iteration's scalar work. tl.where, not an `if`, keeps the loop one
    block the compiler can pipeline."""
    c0 += BLOCK_K
    rs = tl.where(c0 < Cg, rs, rs + 1)
    return rs, tl.where(c0 < Cg, c0, 0)


@triton.jit
def split_range(trips, more, SPLIT_K: tl.constexpr):
    """(first, last, more_first, more_last) of a split-K program (SPLIT_K > 1): the trips it runs of
    a reduction made of a main loop of `trips` and a second of `more` after it (a projection
    shortcut's channel blocks), first .. last - 1 of the first loop and more_first .. more_last - 1
    of the second. The SPLIT_K programs that share an output tile, along program_id(2), take
    stretches of the whole that differ by at most one trip. (An unsplit kernel passes conv_tile
    None for these: its loop as it would be, to the instruction.)"""
    split = tl.program_id(2)
    start = split * (trips + more) // SPLIT_K
    end = (split + 1) * (trips + more) // SPLIT_K
    return min(start, trips), min(end, trips), max(start, trips) - trips, max(end, trips) - trips


@triton.jit
def split_sum(acc, partial_ptr, count_ptr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(sum, last) for split-K programs: each stores its partial tile to partial_ptr (fp32, SPLIT_K
    tiles per output tile) and counts itself in at count_ptr (int32, one per output tile, zero
    before the launch); the last of an output tile's programs to arrive sums the partials in split
    order (the same sum whichever arrives last), sets the count back to zero for the next launch,
    and gets `last` true: it alone runs the epilogue. The others' sums are not to be used.

    The barrier makes every thread's stores precede the count's release; the release and acquire of
    the count make the other programs' partials visible to the last one (read through L2, .cg).
    The sum is a loop, not unrolled: unrolled over SPLIT_K partial tiles (66 for resnet50's last
    3x3s at batch 1), compiled for an H100, a 64x256 tile over 4 warps took 83-124 s to compile and
    spilled 20 KB of registers a thread; as a loop, 1.6 s and none (compile_report.py --sweep)."""
    tile = tl.program_id(0) + tl.program_id(1) * tl.num_programs(0)
    offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    tiles = partial_ptr + tile.to(tl.int64) * (SPLIT_K * BLOCK_M * BLOCK_N)
    tl.store(tiles + tl.program_id(2) * (BLOCK_M * BLOCK_N) + offs, acc)
    tl.debug_barrier()
    arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
    last = arrived == SPLIT_K - 1
    if last:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for split in range(SPLIT_K):
            acc += tl.load(tiles + split * (BLOCK_M * BLOCK_N) + offs, cache_modifier=".cg")
        tl.store(count_ptr + tile, 0)
    return acc, last


@triton.jit
def row_runs(x_ptr, start, h0, w0, r0, Cg, H, W, dil_h, stride_xh, R: tl.constexpr, S: tl.constexpr,
             PADDED: tl.constexpr, ROW_PAD: tl.constexpr, ROWS_AT_ONCE: tl.constexpr):
    """The row schedule's input tile for filter rows r0 .. r0 + ROWS_AT_ONCE - 1: (BLOCK_M,
    ROWS_AT_ONCE * ROW_PAD), column i * ROW_PAD + j holding element j of the run of S*Cg contiguous
    elements that filter row r0 + i reads (x dense NHWC rows, stride_xw == Cg), from the row's
    window start `start`; zeros past S*Cg, past the filter's R rows, and in the padding."""
    i = tl.arange(0, ROWS_AT_ONCE * ROW_PAD)
    r = r0 + i // ROW_PAD
    j = i % ROW_PAD
    ptrs = x_ptr + start[:, None] + ((r * dil_h).to(tl.int64) * stride_xh + j)[None, :]
    mask = ((j < S * Cg) & (r < R))[None, :]
    if PADDED:
        # Rows above or below the map, and taps left or right of it (the horizontal padding).
        ih = h0[:, None] + (r * dil_h)[None, :]
        col = (w0 * Cg)[:, None] + j[None, :]  # the element's offset within its image row
        mask = mask & (ih >= 0) & (ih < H) & (col >= 0) & (col < W * Cg)
    # Else every window read lies inside the map (rows past M wrap onto valid pixels), or inside the
    # margin that kernel_operands keeps for it: only columns past a run's S*Cg, or past the filter,
    # are masked, the same over aligned groups of elements, so the loads can be vectors where the
    # rows are aligned (space_to_depth).
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def row_filters(w_ptr, w_col, mask_n, r0, stride_wr, R: tl.constexpr, ROW_PAD: tl.constexpr,
                ROWS_AT_ONCE: tl.constexpr):
    """The row schedule's weight tile for filter rows r0 .. r0 + ROWS_AT_ONCE - 1, (ROWS_AT_ONCE *
    ROW_PAD, BLOCK_N), from row_weight()'s packing (zeros past each row's S*Cg); zeros past R."""
    i = tl.arange(0, ROWS_AT_ONCE * ROW_PAD)
    r = r0 + i // ROW_PAD
    ptrs = w_ptr + w_col[None, :] + (r * stride_wr + i % ROW_PAD)[:, None]
    return tl.load(ptrs, mask=(r < R)[:, None] & mask_n[None, :], other=0.0)


@triton.jit
def conv_tile(
    acc,  # (BLOCK_M, BLOCK_N) fp32, accumulated into and returned
    x_ptr,
    w_ptr,
    x_row,  # (BLOCK_M,) int64 offset of each row's image (and group) in x
    h0,  # (BLOCK_M,) top input row of each output pixel's window (may be negative: padding)
    w0,  # (BLOCK_M,) left input column of each output pixel's window
    w_col,  # (BLOCK_N,) int64 offset of each output channel's filter in w
    mask_n,  # (BLOCK_N,) valid output channels
    first,  # FLAT_LOOP: the trips first .. last - 1 of the loop over (tap, channel block), of
    last,  # R * S * cdiv(Cg, BLOCK_K) (split_range); None: all. The other schedules run them all
    Cg,
    map_hw,  # (H, W) of the input map
    dilation,  # (dil_h, dil_w)
    x_strides,  # (stride_xc, stride_xh, stride_xw)
    w_strides,  # (stride_wc, stride_wr, stride_ws)
    R: tl.constexpr,
    S: tl.constexpr,
    PADDED: tl.constexpr,
    FLAT_K: tl.constexpr,
    C_PAD: tl.constexpr,  # FLAT_K: Cg rounded up to a power of two, so (r, s, c) decodes with shifts
    EVEN_C: tl.constexpr,  # Cg is a multiple of BLOCK_K: the channel blocks need no mask
    ROWS: tl.constexpr,  # FLAT_K over dense NHWC rows: one reduction per filter row (see below)
    ROW_PAD: tl.constexpr,  # ROWS: S * Cg rounded up to a power of two; the weight's row length
    FLAT_LOOP: tl.constexpr,  # one loop over (tap, channel block) that the compiler can pipeline
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The main loop of an implicit-GEMM conv: acc += the (BLOCK_M, BLOCK_N) tile of conv(x, w).

    Shared by every kernel that computes a conv tile: the plain conv, its projection shortcut
    and the conv+maxpool stem. Three schedules of the same reduction:
    FLAT_K     few channels (the stem's 3): one reduction over (r, s, c) with c padded to C_PAD,
               each element gathered on its own; the padding channels load as zeros.
      + ROWS   the same over dense NHWC rows (x's channels contiguous, pixels C apart): a filter
               row's S taps x Cg channels are S*Cg consecutive elements of x, so each output
               pixel reads one contiguous run per filter row, R loads of (BLOCK_M, ROW_PAD) in all;
               the weight comes packed as rows of ROW_PAD (zeros past S*Cg; row_weight()).
    FLAT_LOOP  one loop over (tap, channel block) pairs: every iteration is alike, so the compiler
               software-pipelines the loads of the next taps behind the current dot.
    otherwise  a loop over channel blocks inside an unrolled loop over the R*S taps.
    """
    H, W = map_hw
    dil_h, dil_w = dilation
    stride_xc, stride_xh, stride_xw = x_strides
    stride_wc, stride_wr, stride_ws = w_strides
    offs_k = tl.arange(0, BLOCK_K)
    if FLAT_K and ROWS:
        # Each row's window start, once; a filter row adds a scalar offset to it.
        start = x_row + h0.to(tl.int64) * stride_xh + w0.to(tl.int64) * stride_xw
        for r in range(R):
            a = row_runs(x_ptr, start, h0, w0, r, Cg, H, W, dil_h, stride_xh, R, S, PADDED, ROW_PAD, 1)
            b = row_filters(w_ptr, w_col, mask_n, r, stride_wr, R, ROW_PAD, 1)
            acc = dot(acc, a, b, DOT_FP32, INPUT_PRECISION)
    elif FLAT_K:
        RSC = R * S * C_PAD
        for j0 in range(0, RSC, BLOCK_K):
            j = j0 + offs_k
            c = j % C_PAD
            s = (j // C_PAD) % S
            r = j // (C_PAD * S)
            valid_k = (j < RSC) & (c < Cg)
            ih = h0[:, None] + (r * dil_h)[None, :]
            iw = w0[:, None] + (s * dil_w)[None, :]
            mask_a = valid_k[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_ptrs = (x_ptr + x_row[:, None] + ih.to(tl.int64) * stride_xh
                      + iw.to(tl.int64) * stride_xw + (c * stride_xc)[None, :])
            a = tl.load(a_ptrs, mask=mask_a, other=0.0)
            b_ptrs = w_ptr + w_col[None, :] + (c * stride_wc + r * stride_wr + s * stride_ws)[:, None]
            b = tl.load(b_ptrs, mask=valid_k[:, None] & mask_n[None, :], other=0.0)
            acc = dot(acc, a, b, DOT_FP32, INPUT_PRECISION)
    elif FLAT_LOOP:
        # What varies per row (the window's corner, which taps fall inside the map) is computed once,
        # before the loop: a 64-bit pointer to each row's window. What varies per iteration (the
        # tap, the channel block) is an offset within a window, in 32 bits (MAX_WINDOW_SPAN), so
        # each element's address costs one multiply-add onto its row's pointer and a bit test.
        a_rows = x_ptr + (x_row + h0.to(tl.int64) * stride_xh + w0.to(tl.int64) * stride_xw)
        if PADDED:
            inside_taps = taps_inside(h0, w0, H, W, dil_h, dil_w, R, S)
        if first is None:
            rs = 0
            c0 = 0
            first = 0
            last = R * S * tl.cdiv(Cg, BLOCK_K)
        else:
            rs = first // tl.cdiv(Cg, BLOCK_K)
            c0 = first % tl.cdiv(Cg, BLOCK_K) * BLOCK_K
        for _ in range(first, last):
            r = rs // S
            s = rs % S
            c = c0 + offs_k
            mask_c = tl.full([BLOCK_K], True, tl.int1) if EVEN_C else c < Cg
            a_tap = r * dil_h * stride_xh + s * dil_w * stride_xw
            a_ptrs = a_rows[:, None] + (a_tap + c * stride_xc)[None, :]
            if PADDED:
                inside = tap_inside(inside_taps, h0, w0, H, W, r * dil_h, s * dil_w, rs, R, S)
                a = tl.load(a_ptrs, mask=inside[:, None] & mask_c[None, :], other=0.0)
            else:
                a = tl.load(a_ptrs, mask=mask_c[None, :], other=0.0)
            b_ptrs = w_ptr + w_col[None, :] + (r * stride_wr + s * stride_ws + c * stride_wc)[:, None]
            b = tl.load(b_ptrs, mask=mask_c[:, None] & mask_n[None, :], other=0.0)
            acc = dot(acc, a, b, DOT_FP32, INPUT_PRECISION)
            rs, c0 = next_block(rs, c0, Cg, BLOCK_K)
    else:
        # One (r, s) tap at a time: its input rows and bounds mask are fixed over the channel loop.
        for rs in tl.static_range(R * S):
            ih = h0 + (rs // S) * dil_h
            iw = w0 + (rs % S) * dil_w
            a_row = x_row + ih.to(tl.int64) * stride_xh + iw.to(tl.int64) * stride_xw
            b_tap = w_col + (rs // S) * stride_wr + (rs % S) * stride_ws
            if PADDED:
                inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            for c0 in range(0, Cg, BLOCK_K):
                c = c0 + offs_k
                mask_c = tl.full([BLOCK_K], True, tl.int1) if EVEN_C else c < Cg
                a_ptrs = x_ptr + a_row[:, None] + (c * stride_xc)[None, :]
                if PADDED:
                    a = tl.load(a_ptrs, mask=inside[:, None] & mask_c[None, :], other=0.0)
                else:
                    a = tl.load(a_ptrs, mask=mask_c[None, :], other=0.0)
                b_ptrs = w_ptr + b_tap[None, :] + (c * stride_wc)[:, None]
                b = tl.load(b_ptrs, mask=mask_c[:, None] & mask_n[None, :], other=0.0)
                acc = dot(acc, a, b, DOT_FP32, INPUT_PRECISION)
    return acc


@triton.jit
def dense_tile(acc, x_ptr, w_ptr, M, N, Cg, stride_xm, stride_wn, pid_m, pid_n, DOT_FP32: tl.constexpr,
               INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += the (pid_m, pid_n) tile of the dense GEMM x[M, Cg] @ w[N, Cg]^T, both read through
    tensor descriptors (the TMA copy engine on Hopper; zeros past the edges): a 1x1 stride-1
    conv over dense NHWC rows, whose activations are exactly that matrix."""
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, Cg], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, Cg], strides=[stride_wn, 1], block_shape=[BLOCK_N, BLOCK_K])
    for k0 in range(0, Cg, BLOCK_K):
        a = x_desc.load([pid_m * BLOCK_M, k0])
        b = w_desc.load([pid_n * BLOCK_N, k0])
        acc = dot(acc, a, tl.trans(b), DOT_FP32, INPUT_PRECISION)
    return acc


@triton.jit
def box_tile(acc, x_ptr, w_ptr, n, h0, w0, k0, x_shape, Cg, Kg, dilation, x_strides, stride_wk,
             R: tl.constexpr, S: tl.constexpr, STRIDE: tl.constexpr, EVEN_C: tl.constexpr, DOT_FP32: tl.constexpr,
             INPUT_PRECISION: tl.constexpr, BOX_H: tl.constexpr, BOX_W: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr):
    """acc += the tile of a conv of stride STRIDE (1 or 2) whose output box's first pixel has its
    window's corner at input pixel (h0, w0) of image n, and whose first channel is k0, read through
    tensor descriptors (the TMA copy engine on Hopper).

    Tap (r, s) of a BOX_H x BOX_W output box reads an input box of the same size, shifted by
    (r * dil_h, s * dil_w): for stride 1 one 4-D [N, H, W, C] descriptor load per tap and channel
    block, whose parts outside the map (the padding) and past the channels come back as zeros, so
    no mask is computed. For stride 2 the taps read every other pixel: x is viewed as 5-D
    [N, H/2, 2, W/2, 2*C] (row 2i + a is (i, a); pixel 2j + b's channels are b*C onward in the last
    axis), in which those pixels of one tap are again a box, at the tap's row and column parity.
    The weight (K, R, S, C) in memory is read as the matrix [K, R*S*C] where channel blocks are
    whole (EVEN_C), else as [K, R*S, C] (zeros past C).

    The product is computed transposed, acc^T += w @ x^T: the tensor cores read their A operand
    from registers unless it comes straight from a load, and the box, as loaded, must be reshaped
    to (BOX_H * BOX_W, BLOCK_K). As the B operand it stays in shared memory, reshaped and
    transposed there as a view, and the weight block, 2-D as loaded, is A."""
    N, H, W = x_shape  # x (N, H, W, C) in memory: its images, rows and columns
    dil_h, dil_w = dilation
    stride_xn, stride_xh, stride_xw = x_strides
    if STRIDE == 1:
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[N, H, W, Cg], strides=[stride_xn, stride_xh, stride_xw, 1],
                                           block_shape=[1, BOX_H, BOX_W, BLOCK_K])
    else:
        tl.static_assert(EVEN_C, "stride-2 box tiles need whole channel blocks")
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[N, H // 2, 2, W // 2, 2 * Cg],
                                           strides=[stride_xn, 2 * stride_xh, stride_xh, 2 * stride_xw, 1],
                                           block_shape=[1, BOX_H, 1, BOX_W, BLOCK_K])
    if EVEN_C:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[Kg, R * S * Cg], strides=[stride_wk, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])
    else:
        # (A tap's filters are Cg apart: the weight is dense (K, R, S, C). Its stride_ws is passed
        # as 0 where S is 1.)
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[Kg, R * S, Cg], strides=[stride_wk, Cg, 1],
                                           block_shape=[BLOCK_N, 1, BLOCK_K])
    acc_t = tl.zeros((BLOCK_N, BOX_H * BOX_W), dtype=tl.float32)
    rs = 0
    c0 = 0
    for _ in range(0, R * S * tl.cdiv(Cg, BLOCK_K)):
        ih = h0 + (rs // S) * dil_h
        iw = w0 + (rs % S) * dil_w
        if STRIDE == 1:
            a = x_desc.load([n, ih, iw, c0])
        else:
            # Row ih = 2 * (ih >> 1) + (ih & 1), also where ih < 0 (the padding: zeros).
            a = x_desc.load([n, ih >> 1, ih & 1, iw >> 1, (iw & 1) * Cg + c0])
        a = a.reshape(BOX_H * BOX_W, BLOCK_K)
        if EVEN_C:
            b = w_desc.load([k0, rs * Cg + c0])
        else:
            b = w_desc.load([k0, rs, c0]).reshape(BLOCK_N, BLOCK_K)
        acc_t = dot(acc_t, b, tl.trans(a), DOT_FP32, INPUT_PRECISION)
        rs, c0 = next_block(rs, c0, Cg, BLOCK_K)
    return acc + tl.trans(acc_t)


@triton.jit
def residual_tile(r_ptr, r_rows, stride_rk, cols, mask_y):
    """The residual's tile at r_ptr + r_rows + cols * stride_rk, one pointer an element (the
    epilogue's operand where no tensor descriptor reads it)."""
    return tl.load(r_ptr + r_rows[:, None] + (cols.to(tl.int64) * stride_rk)[None, :], mask=mask_y, other=0.0)


@triton.jit
def epilogue(acc, b_ptr, cols, mask_n, res, APPLY_RELU: tl.constexpr):
    """A conv's epilogue on its fp32 accumulator: + bias (b_ptr None: none), + the residual tile
    `res` (None: none), then ReLU (if APPLY_RELU)."""
    if b_ptr is not None:
        acc += tl.load(b_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if res is not None:
        acc += res.to(tl.float32)
    if APPLY_RELU:
        # Not tl.maximum: it may turn NaN into 0, and torch.relu keeps NaN.
        acc = tl.where(acc < 0.0, 0.0, acc)
    return acc


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------


def output_size(h, w, r, s, stride, padding, dilation):
    """(P, Q) of a conv over an (h, w) map; padding is (top, bottom, left, right)."""
    p = (h + padding[0] + padding[1] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    q = (w + padding[2] + padding[3] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    return p, q


def check_conv_args(x, weight, bias, stride, padding, dilation, groups, residual, shortcut_weight, shortcut_stride,
                     op="conv2d_bias_act"):
    if x.dim() != 4:
        raise ValueError(f"{op}: input must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(
            f"{op}: weight must be 4-D (K, C // groups, R, S), got shape {tuple(weight.shape)}"
        )
    named = {"input": x, "weight": weight, "bias": bias, "residual": residual, "shortcut_weight": shortcut_weight}
    check_supported_dtype(op, named)
    check_same_device(op, named)
    if len(stride) != 2 or len(dilation) != 2 or len(padding) != 4:
        raise ValueError(f"{op}: stride and dilation take 2 values, padding 4 (top, bottom, left, right)")
    if min(stride) < 1 or min(dilation) < 1:
        raise ValueError(f"{op}: stride {tuple(stride)} and dilation {tuple(dilation)} must be >= 1")
    if min(padding) < 0:
        raise ValueError(f"{op}: padding {tuple(padding)} must be >= 0")
    if groups < 1:
        raise ValueError(f"{op}: groups must be >= 1, got {groups}")
    k, cg, r, s = weight.shape
    if k % groups != 0:
        raise ValueError(f"{op}: out_channels {k} must be divisible by groups={groups}")
    if x.shape[1] != cg * groups:
        raise ValueError(
            f"{op}: input has {x.shape[1]} channels, but weight {tuple(weight.shape)} "
            f"with groups={groups} expects {cg * groups}"
        )
    if bias is not None and tuple(bias.shape) != (k,):
        raise ValueError(f"{op}: bias must have shape ({k},), got {tuple(bias.shape)}")
    p, q = output_size(x.shape[2], x.shape[3], r, s, stride, padding, dilation)
    if p < 1 or q < 1:
        raise ValueError(
            f"{op}: a {r}x{s} kernel with dilation {tuple(dilation)} does not fit the "
            f"{x.shape[2]}x{x.shape[3]} input padded by {tuple(padding)}"
        )
    out_shape = (x.shape[0], k, p, q)
    if shortcut_weight is not None:
        check_shortcut(residual, shortcut_weight, shortcut_stride, groups, out_shape, op)
    elif residual is not None and tuple(residual.shape) != out_shape:
        raise ValueError(
            f"{op}: residual must have the output's shape {out_shape}, got {tuple(residual.shape)}"
        )
    return out_shape


def check_shortcut(residual, weight, stride, groups, out_shape, op="conv2d_bias_act"):
    n, k, p, q = out_shape
    if residual is None:
        raise ValueError(f"{op}: shortcut_weight needs a residual (the shortcut conv's input)")
    if groups != 1:
        raise ValueError(f"{op}: shortcut_weight needs groups=1 for the main conv, got groups={groups}")
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (1, 1) or weight.shape[0] != k:
        raise ValueError(
            f"{op}: shortcut_weight must be a 1x1 conv weight ({k}, C, 1, 1), got {tuple(weight.shape)}"
        )
    if len(stride) != 2 or min(stride) < 1:
        raise ValueError(f"{op}: shortcut_stride must be 2 values >= 1, got {tuple(stride)}")
    if residual.dim() != 4 or residual.shape[0] != n or residual.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{op}: residual must be ({n}, {weight.shape[1]}, H, W) for shortcut_weight "
            f"{tuple(weight.shape)}, got {tuple(residual.shape)}"
        )
    projected = output_size(residual.shape[2], residual.shape[3], 1, 1, stride, (0, 0, 0, 0), (1, 1))
    if projected != (p, q):
        raise ValueError(
            f"{op}: the shortcut conv maps the {tuple(residual.shape[2:])} residual to {projected} "
            f"with stride {tuple(stride)}, but the output is {(p, q)}"
        )




def ieee_fp32(dtype):
    """Whether convs of this dtype take fp32 dots in IEEE precision (TF32 not allowed), which run on
    the FMA units with their operands in registers, and so take configs of their own."""
    return dtype == torch.float32 and not backend.tf32_allowed()


def dense_1x1(x, weight, stride, padding, dilation, groups):
    """True when the conv is a dense GEMM that tensor descriptors can read and write, on a GPU that has
    them (launch_has_tma): 1x1, stride 1, no padding, ungrouped, x dense channels_last and the weight
    (K, 1, 1, C) in memory, rows (C in, K out) of a multiple of 16 bytes."""
    k, c, r, s = weight.shape
    return (launch_has_tma(x) and (r, s) == (1, 1) and tuple(stride) == (1, 1) and not any(padding)
            and tuple(dilation) == (1, 1) and groups == 1 and x.stride() == backend.channels_last_strides(x.shape)
            and weight.stride()[:2] == (c, 1)
            and (c * x.element_size()) % 16 == 0 and (k * x.element_size()) % 16 == 0 and backend.aligned(weight))


# A stride-2 conv's box tiles read channel blocks of a 5-D view in which each pixel's channels run
# on into its right neighbour's (box_tile): no block may cross that boundary, so its channels are a
# multiple of the largest BLOCK_K any config list holds.
BOX_STRIDE_2_CHANNELS = 128


def box_schedule(x, weight, stride, groups):
    """True when box tiles through tensor descriptors apply (box_tile), on a GPU that has them
    (launch_has_tma): a conv of stride 1, or 2 over a map of even height and width and a multiple of
    BOX_STRIDE_2_CHANNELS channels, with more than one tap, ungrouped, x dense channels_last and the
    weight dense (K, R, S, C) in memory, channel rows (input and output) a multiple of 16 bytes."""
    k, c, r, s = weight.shape
    size = x.element_size()
    strided = (tuple(stride) == (2, 2) and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0
               and c % BOX_STRIDE_2_CHANNELS == 0)
    return (launch_has_tma(x) and r * s > 1 and (tuple(stride) == (1, 1) or strided) and groups == 1
            and x.stride() == backend.channels_last_strides(x.shape)
            and weight.stride() == backend.channels_last_strides(weight.shape)
            and (c * size) % 16 == 0 and (k * size) % 16 == 0 and backend.aligned(weight))


def _box_pixels(p, q, block_m, w):
    """The pixels that boxes of BLOCK_M pixels, w wide, compute to cover a P x Q map."""
    h = block_m // w
    return triton.cdiv(p, h) * h * triton.cdiv(q, w) * w


def box_width(p, q, block_m):
    """The width of the BLOCK_M-pixel box (a power of two) that covers a P x Q map with the fewest
    pixels computed in vain; among equals the squarest (the least input read around it)."""
    return min((1 << i for i in range(block_m.bit_length())),
               key=lambda w: (_box_pixels(p, q, block_m, w), abs(block_m // w - w)))


# The first call's candidates take box tiles only where the best boxes compute at most this many
# times the map's pixels (8x8 boxes over a 7x7 map: 1.31; 16x8 boxes over it: 2.6).
MAX_BOX_OVERHANG = 1.35


def box_variant(p, q):
    """How a first-call candidate runs as box tiles over a P x Q output map: the config with the
    best box's BOX_W, or None where those boxes compute more than MAX_BOX_OVERHANG times the map."""
    def variant(config):
        w = box_width(p, q, config["BLOCK_M"])
        return {**config, "BOX_W": w} if _box_pixels(p, q, config["BLOCK_M"], w) <= MAX_BOX_OVERHANG * p * q else None

    return variant


def dense_variant(config):
    """How a first-call candidate of a dense 1x1 conv (dense_1x1) reads through tensor descriptors."""
    return {**config, "USE_TMA": 1}


def loop_trips(taps, channels, shortcut_channels=0):
    """trips(config): the trips of a gathered conv's main loop, taps x channel blocks, and of its
    projection shortcut's channel blocks after them, as split-K divides them."""
    def trips(config):
        return taps * triton.cdiv(channels, config["BLOCK_K"]) + triton.cdiv(shortcut_channels, config["BLOCK_K"])

    return trips


def stage_trips(taps, channels, shortcut_channels=0):
    """trips(config): the trips of an unsplit gathered conv's longest loop, which its pipeline
    stages fill (configs.cap_stages): the taps' channel blocks, or the projection shortcut's, a
    loop of its own."""
    def trips(config):
        return max(taps * triton.cdiv(channels, config["BLOCK_K"]), triton.cdiv(shortcut_channels, config["BLOCK_K"]))

    return trips


def split_scratch(grid):
    """A KernelLaunch's scratch for kernels that may split K (split_sum): for a config with
    SPLIT_K > 1, the partial tiles (fp32, SPLIT_K a program's output tile) and the zeroed arrival
    counts (one an output tile); else (None, None). The sizes are worked out once a config."""
    def scratch(config):
        ways = config.get("SPLIT_K", 1)
        if ways == 1:
            return lambda like: (None, None)
        tiles = grid(config)
        tiles = tiles[0] * tiles[1]
        partials = tiles * ways * config["BLOCK_M"] * config["BLOCK_N"]
        return lambda like: (backend.working_memory(like, partials), backend.zeroed_counts(like, tiles))

    return scratch


def row_pad(weight):
    """ROW_PAD of the row schedule: a filter row's S*C elements rounded up to a power of two (>= 16)."""
    return max(16, triton.next_power_of_2(weight.shape[3] * weight.shape[1]))


def channel_divisor(*channels):
    """C_DIVISOR of a launch: the largest power of two (at most 256) that divides each count of
    channels the kernel reduces over. A config whose BLOCK_K divides it reads whole channel blocks
    only, and its kernel drops the channel mask (conv_tile's EVEN_C)."""
    divisor = 256
    while any(c % divisor for c in channels):
        divisor //= 2
    return divisor


def row_schedule(x, weight, dilation, groups):
    """Whether the row schedule applies: a few-channel conv (the stem) whose x is dense NHWC rows,
    ungrouped, with a filter row wider than 1 and not dilated along it."""
    k, cg, r, s = weight.shape
    return (cg < FLAT_K_BELOW and groups == 1 and dilation[1] == 1 and s > 1 and x.stride(1) == 1
            and x.stride(3) == cg)


def row_weight(weight):
    """The weight packed for the row schedule: (K, R, ROW_PAD) in memory, each filter row's (s, c)
    elements first and zeros after, viewed as a (K, C, R, S) tensor (so the gathered schedule
    reads it too)."""
    k, cg, r, s = weight.shape
    pad = row_pad(weight)
    packed = torch.zeros(k, r, pad, dtype=weight.dtype, device=weight.device)
    packed[:, :, : s * cg] = weight.permute(0, 2, 3, 1).reshape(k, r, s * cg)
    return packed.as_strided((k, cg, r, s), (r * pad, 1, pad, cg))


def space_to_depth_fits(weight, stride, dilation, groups):
    """Whether space_to_depth can run the conv: an ungrouped, undilated stride-2 conv of at most 4
    input channels with more than one tap."""
    k, cg, r, s = weight.shape
    return groups == 1 and tuple(stride) == (2, 2) and tuple(dilation) == (1, 1) and cg <= 4 and r * s > 1


def space_to_depth_schedule(weight, stride, dilation, groups, blocks=None):
    """Whether the conv runs as space_to_depth: it fits, and `blocks` asks for it (None:
    SPACE_TO_DEPTH does)."""
    return (SPACE_TO_DEPTH if blocks is None else blocks) and space_to_depth_fits(weight, stride, dilation, groups)


def other_layout(x, weight, stride, dilation, groups):
    """The layout a conv plan's first call also times, as its way 1, or None: where space_to_depth
    fits a conv on a GPU, the one SPACE_TO_DEPTH does not name (the plan's `blocks`)."""
    if backend.on_gpu(x) and space_to_depth_fits(weight, stride, dilation, groups):
        return not SPACE_TO_DEPTH
    return None


@triton.jit
def _space_to_depth_kernel(
    x_ptr,  # (N, C, H, W), any strides, C <= 4
    y_ptr,  # (N, HM, WM, 16), dense: the 2x2 blocks of pixels, 4 channels each
    C, H, W, HM, WM,
    top, left,  # where the input's pixel (0, 0) lies in the blocks' map of 2HM x 2WM pixels
    stride_xn, stride_xc, stride_xh, stride_xw,
    BLOCK_J: tl.constexpr,
):
    # A program writes BLOCK_J blocks of one block row; a block's 16 channels are the pixels
    # (2i + b, 2j + b') of the padded input, channels ch, in the order (b, b', ch).
    row = tl.program_id(0)  # n * HM + i
    n = row // HM
    i = row - n * HM
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    lane = tl.arange(0, 16)
    ch = lane % 4
    h = 2 * i + lane // 8 - top
    w = 2 * j[:, None] + (lane // 4 % 2)[None, :] - left
    inside = ((ch < C) & (h >= 0) & (h < H))[None, :] & (w >= 0) & (w < W)
    v = tl.load(x_ptr + n.to(tl.int64) * stride_xn + (ch * stride_xc + h * stride_xh)[None, :] + w * stride_xw,
                mask=inside & (j < WM)[:, None], other=0.0)
    tl.store(y_ptr + row.to(tl.int64) * WM * 16 + j[:, None] * 16 + lane[None, :], v, mask=(j < WM)[:, None])


def space_to_depth_shape(n, out_hw, taps, margin=0):
    """(N, rows, columns, 16): the blocked copy that space_to_depth makes of n images for a conv
    with R x S taps and P x Q outputs: the 2x2 blocks those outputs read (P + ceil(R/2) - 1 rows
    by Q + ceil(S/2) - 1 columns), with `margin` blocks of zeros around them."""
    (p, q), (r, s) = out_hw, taps
    return n, p + triton.cdiv(r, 2) - 1 + 2 * margin, q + triton.cdiv(s, 2) - 1 + 2 * margin, 16


def space_to_depth(x, weight, padding, out_hw, margin=0, *, traceable=False):
    """A stride-2 conv of at most 4 channels as a stride-1 conv of 16 over 2x2 blocks of pixels.

    The input's channels are padded with zeros to 4, and pixel (2i + b, 2j + b') of the padded
    input becomes channels (b, b', 0..3) of pixel (i, j) of a map with 16 channels; tap
    (2a + b, 2a' + b') of the filter becomes tap (a, a') of a ceil(R/2) x ceil(S/2) filter over
    those channels (zeros where 2a + b >= R, and for the padding channels). The 7x7/2 stem becomes
    a 4x4/1 conv with no padding, since the copy holds it. In the row schedule each output pixel
    then reads 4 runs of 64 contiguous elements that start on 16-element boundaries (every stride
    a multiple of 16, which Triton specializes on, so the loads are 16-byte vectors), instead of 7
    runs of 21 at any 2-byte offset, one element per load. The price: a copy of the input with
    its channels padded to 4 (at 224x224 in fp16, 0.42 MB an image written for 0.30 MB read),
    made by one kernel (_space_to_depth_kernel) that reads the input once and writes the blocks
    once, zeros included.

    `margin`: block rows and columns of zeros kept around the blocks the P x Q outputs read, so
    that a kernel may read the windows of outputs up to `margin` pixels outside the map without
    masks (their values are then meaningless; the stem's pooling taps in the pool's padding).
    The kernel's x is the view of the blocks inside that margin.

    Returns (to_blocks, x as the kernel sees it, weight, padding (4 zeros)); to_blocks(x) makes the
    blocked copy of each call's input, laid out as x (with `traceable`, launched through
    wrap_triton, inside a registered op).
    """
    k, c, r, s = weight.shape
    top, _, left, _ = padding
    rb, sb = triton.cdiv(r, 2), triton.cdiv(s, 2)
    n, _, h, w = x.shape
    shape = space_to_depth_shape(n, out_hw, (r, s), margin)
    _, hm, wm, _ = shape
    hb, wb = hm - 2 * margin, wm - 2 * margin  # block rows and columns that the P x Q outputs read
    # Under the interpreter one program a block row, since each program runs in Python.
    block_j = 64 if backend.on_gpu(x) else triton.next_power_of_2(wm)
    launch = backend.KernelLaunch(
        _space_to_depth_kernel, lambda meta: (n * hm, triton.cdiv(wm, meta["BLOCK_J"])),
        dict(C=c, H=h, W=w, HM=hm, WM=wm, top=top + 2 * margin, left=left + 2 * margin,
             stride_xn=x.stride(0), stride_xc=x.stride(1), stride_xh=x.stride(2), stride_xw=x.stride(3)),
        on_cuda=x.is_cuda, config={"BLOCK_J": block_j}, traceable=traceable)

    def inside_margin(blocks):  # (N, hm, wm, 16) -> the (N, 16, hb, wb) view the kernel reads
        return blocks[:, margin:margin + hb, margin:margin + wb].permute(0, 3, 1, 2)

    def to_blocks(x):
        blocks = x.new_empty(shape)
        if blocks.numel():
            launch(x, blocks)
        return inside_margin(blocks)

    blocked = torch.nn.functional.pad(weight, (0, 2 * sb - s, 0, 2 * rb - r, 0, 4 - c))
    blocked = blocked.reshape(k, 4, rb, 2, sb, 2).permute(0, 3, 5, 1, 2, 4).reshape(k, 16, rb, sb)
    return to_blocks, inside_margin(x.new_empty(shape)), blocked, [0, 0, 0, 0]


def bundle_size(channels, groups):
    """How many of a conv's groups of `channels` input channels each bundle_groups runs as one: the
    largest divisor of `groups` that keeps the bundle within BUNDLE_CHANNELS input channels (1: none)."""
    return max(d for d in range(1, groups + 1) if groups % d == 0 and (d == 1 or d * channels <= BUNDLE_CHANNELS))


def bundle_groups(weight, groups):
    """(weight, groups) with a grouped conv's groups run b = bundle_size at a time as one group of b
    times the channels: each bundle's weight is block-diagonal, zeros between its groups.

    ResNeXt-50's first 3x3s have groups of 4 channels: as they are, tl.dot gets a reduction of 36
    (4 channels x 9 taps, padded to 64) against 4 output channels (padded to 16), and compiled for
    an H100 the loop issued 33 instructions per tensor-core cycle, spilling registers. Bundled 16
    at a time they are convs of 64 channels, the shape the kernels are built for, at 16 times the
    multiply-adds, which the tensor cores do not lack. The sums are the same, but a NaN or inf in
    the input reaches every output of its bundle (0 * inf is NaN), where torch's reaches its group's."""
    k, cg, r, s = weight.shape
    bundle = bundle_size(cg, groups)
    if bundle == 1:
        return weight, groups
    kg = k // groups
    out = torch.arange(k, device=weight.device)
    dense = weight.new_zeros((k, bundle, cg, r, s))
    dense[out, out // kg % bundle] = weight  # output channel k: its group's place in the bundle
    return dense.reshape(k, bundle * cg, r, s).contiguous(memory_format=torch.channels_last), groups // bundle


def kernel_operands(x, weight, stride, padding, dilation, groups, out_hw, margin=0, *, traceable=False,
                    blocks=None):
    """How a conv plan hands x and the weight to a kernel built on conv_tile: (to_layout, x as the
    kernel sees it, weight, groups, stride, padding, rows). Groups of few channels bundled
    (bundle_groups); then as space_to_depth where `blocks` (None: SPACE_TO_DEPTH) asks for it and
    it fits (each call's x copied into 2x2 blocks, stride 1, no padding), else x as gather_layout
    has it; then, where the row schedule applies (`rows`), the weight packed by rows (row_weight).

    `margin`: the kernel reads, without masks, the row schedule's runs of output pixels up to this
    many outside the output map (conv2d_maxpool's pooling taps): space_to_depth keeps that margin
    of zeros around its copy, and a conv without padding (whose row schedule reads unmasked) that
    is not a space-to-depth copy is left to the gathered schedule."""
    weight, groups = bundle_groups(weight, groups)
    if space_to_depth_schedule(weight, stride, dilation, groups, blocks):
        to_layout, x, weight, padding = space_to_depth(x, weight, padding, out_hw, margin, traceable=traceable)
        stride, rows = (1, 1), True
    else:
        k, cg, r, s = weight.shape
        to_layout, x = gather_layout(x, lambda strides: window_too_wide(strides, cg, (r, s), dilation))
        rows = row_schedule(x, weight, dilation, groups) and (margin == 0 or any(padding))
    if rows:
        weight = row_weight(weight)
    return to_layout, x, weight, groups, stride, padding, rows


def conv_launch(name, kernel, x, weight, bias, out_shape, m, stride, padding, dilation, groups, relu, *,
                extra_reduction=0, traceable=False, dense=None, boxes=None, rows=False, split=False,
                max_acc_per_thread=configs.MAX_ACC_PER_THREAD, shared_bytes=None, **extra):
    """A KernelLaunch of a kernel built on conv_tile over M = m output rows into a channels_last
    output of `out_shape`, for inputs laid out as `x`: called as launch(x, weight, bias, *pointers, y).

    Binds the conv's own arguments (sizes, strides, padding, epilogue flags) and the kernel's
    `extra` keyword arguments. `dense`: None for kernels without a descriptor path; else whether
    this conv may take it (dense_1x1), which adds the config switch USE_TMA. `boxes` likewise for
    box tiles (box_schedule; the config's BOX_W, 0 for rows of the flattened output). `rows`: `weight` is
    row_weight()'s packing (row_schedule applies), and the config switch ROWS picks the row schedule.
    `split`: the kernel takes the config switch SPLIT_K and split_sum's scratch after the call's
    tensors (the launch appends them); configs whose tiles leave most SMs idle are also tried
    split-K, where the schedule is the gathered FLAT_LOOP one (not the few-channel FLAT_K).
    `max_acc_per_thread`: the candidates' limit on accumulator elements per thread (lower for a
    kernel that holds more than one accumulator tile; see configs.MAX_ACC_PER_THREAD).
    `shared_bytes(config)`: the shared memory a config takes, for a kernel whose main loop is not
    configs.gemm_shared_bytes's (None: it is).
    """
    m_hint = backend.hint(m)  # (a dynamic batch: configs are the traced size's; the kernel takes m itself)
    if m_hint >= 2**31:
        raise ValueError(f"{name}: {m} output rows; at most 2**31 - 1 are supported")
    interpret = not backend.on_gpu(x)
    k, cg, r, s = weight.shape
    check_window(name, (x.stride(1), x.stride(2), x.stride(3)), cg, (r, s), dilation)
    kg = k // groups
    flat_k = cg < FLAT_K_BELOW or rows  # (space_to_depth's 16 channels take the row schedule too)
    y_strides = backend.channels_last_strides(out_shape)
    args = dict(
        M=m, Kg=kg, Cg=cg, H=x.shape[2], W=x.shape[3],
        stride_h=stride[0], stride_w=stride[1], pad_h=padding[0], pad_w=padding[2],
        dil_h=dilation[0], dil_w=dilation[1],
        stride_xn=x.stride(0), stride_xc=x.stride(1), stride_xh=x.stride(2), stride_xw=x.stride(3),
        stride_wk=weight.stride(0), stride_wc=weight.stride(1),
        # A tap axis of size 1 only ever takes index 0: its stride passes as 0, which Triton (it
        # specializes integers divisible by 16) knows to keep offsets aligned. As torch lays out a
        # 1x1 weight, these strides are 1, and its loads went one element at a time.
        stride_wr=weight.stride(2) if r > 1 else 0, stride_ws=weight.stride(3) if s > 1 else 0,
        stride_yn=y_strides[0], stride_yk=y_strides[1], stride_yp=y_strides[2], stride_yq=y_strides[3],
        R=r, S=s,
        PADDED=any(v != 0 for v in padding),
        FLAT_K=flat_k,
        C_PAD=triton.next_power_of_2(cg) if flat_k else 1,
        C_DIVISOR=channel_divisor(cg, *([extra["C_sc"]] if extra.get("C_sc") else [])),
        ROWS=0,  # a config switch where `rows`
        **({} if boxes is None else {"BOX_W": 0}),  # a config switch where `boxes`
        **({"SPLIT_K": 1} if split else {}),  # a config switch where `split`
        ROW_PAD=row_pad(weight) if rows else 1,
        APPLY_RELU=relu,
        DOT_FP32=interpret,
        INPUT_PRECISION="tf32" if x.dtype == torch.float32 and not interpret and backend.tf32_allowed() else "ieee",
        **extra,
    )

    def grid(meta):
        box_w = meta.get("BOX_W", 0)
        if box_w:  # box tiles: one program per box of the output map (and per BLOCK_N channels)
            n, _, p, q = out_shape
            tiles = n * triton.cdiv(p, meta["BLOCK_M"] // box_w) * triton.cdiv(q, box_w)
        else:
            tiles = triton.cdiv(m, meta["BLOCK_M"])
        return (tiles * triton.cdiv(kg, meta["BLOCK_N"]), groups, meta.get("SPLIT_K", 1))

    scratch = split_scratch(grid) if split else None
    reduction = max(cg * r * s if flat_k else cg, extra_reduction)
    if interpret:
        config = {**configs.interpreter(m_hint, kg, reduction), "FLAT_LOOP": INTERPRETER_FLAT_LOOP,
                  "ROWS": int(rows and INTERPRETER_ROWS)}
        if dense is not None:
            config["USE_TMA"] = int(bool(dense and INTERPRETER_TMA))
        if boxes and INTERPRETER_BOX_W:
            config["BOX_W"] = min(INTERPRETER_BOX_W, config["BLOCK_M"])
        if split and not flat_k and config["FLAT_LOOP"] and not config.get("BOX_W") and not config.get("USE_TMA"):
            config["SPLIT_K"] = INTERPRETER_SPLIT_K
        config = configs.interpreted(config)
        return backend.KernelLaunch(kernel, grid, args, on_cuda=False, traceable=traceable, config=config,
                                    scratch=scratch, descriptors=bool(config.get("USE_TMA") or config.get("BOX_W")))
    # The key: every size and flag of the launch (the batch only through M, bucketed), no strides.
    # (ROWS and BOX_W in args are the defaults of config switches, which the config overrides.)
    sizes = {k: backend.hint(v) for k, v in args.items()
             if not k.startswith("stride_") and k not in ("DOT_FP32", "ROWS", "BOX_W", "SPLIT_K")}
    switches = {"FLAT_LOOP": 1}
    if dense is not None:
        sizes["dense"] = bool(dense)  # a config that reads through descriptors fits dense layouts only
        switches["USE_TMA"] = 0
    if boxes is not None:
        sizes["boxes"] = bool(boxes)  # a config with BOX_W fits box_schedule's layouts only
        switches["BOX_W"] = 0
    if rows:
        sizes["rows"] = True  # a config with ROWS fits row-packed weights only
        switches["ROWS"] = 1
    if cg < FLAT_K_BELOW and x.element_size() >= 4:
        max_acc_per_thread = min(max_acc_per_thread, FEW_CHANNELS_FP32_MAX_ACC)
    smem = launch_shared_memory(x)
    candidates = configs.candidates(m_hint, kg, reduction, x.element_size(), smem, switches=switches,
                                    max_acc_per_thread=max_acc_per_thread, shared_bytes=shared_bytes,
                                    ieee=ieee_fp32(x.dtype))
    if not flat_k:
        candidates = configs.cap_stages(candidates, stage_trips(r * s, cg, extra_reduction))
    variants = []
    if split and not flat_k:
        sms = launch_multiprocessors(x)
        split_k = configs.split_variant(m_hint, kg, groups, loop_trips(r * s, cg, extra_reduction), sms)
        if split_k(candidates[0]) is not None:  # the layer's tiles are few even at the first candidate's size
            variants.append(split_k)
    if boxes:
        variants.append(box_variant(*out_shape[2:]))
    elif dense:
        variants.append(dense_variant)
    return backend.KernelLaunch(kernel, grid, args, on_cuda=x.is_cuda, traceable=traceable, op=name,
                                key=configs.shape_key(groups=groups, bias=bias is not None, **sizes),
                                candidates=configs.with_variants(candidates, *variants), scratch=scratch,
                                descriptors=bool(dense or boxes))


# The gathered main loop (conv_tile's FLAT_LOOP) adds each iteration's offset within a window (its
# tap and channel block) to each row's 64-bit window pointer in 32 bits: compiled for an H100, the
# 3x3 64x64x64 loop issued 130 instructions a warp per iteration with 64-bit offsets there, 115
# with these. So the elements a window spans, as a kernel reads it (channel blocks past the last
# channel included, masked), must stay below this; an input laid out otherwise is copied to dense
# channels_last, where a window spans a few of an image's rows.
MAX_WINDOW_SPAN = 2**31 - 1


def window_span(strides, channels, taps=(1, 1), dilation=(1, 1)):
    """The elements from a window's first to the last that a gathered main loop's offsets reach,
    for input strides (stride_c, stride_h, stride_w), `channels` per group, R x S taps. The last
    channel block's lanes past the last channel are masked, but their offsets are computed too:
    up to 256 of them (no config's BLOCK_K is wider) are counted."""
    stride_c, stride_h, stride_w = strides
    return ((taps[0] - 1) * dilation[0] * stride_h + (taps[1] - 1) * dilation[1] * stride_w
            + (channels + 256) * stride_c)


def window_too_wide(strides, channels, taps=(1, 1), dilation=(1, 1)):
    """Whether window_span passes MAX_WINDOW_SPAN: the gathered loop's 32-bit offsets cannot read it."""
    return window_span(strides, channels, taps, dilation) > MAX_WINDOW_SPAN


def check_window(op, strides, channels, taps=(1, 1), dilation=(1, 1)):
    if window_too_wide(strides, channels, taps, dilation):
        span = window_span(strides, channels, taps, dilation)
        raise ValueError(f"{op}: a conv window spans {span} elements of its input, even channels_last; "
                         f"at most {MAX_WINDOW_SPAN} are supported")


def gather_layout(x, too_wide=None):
    """How the kernel reads x: as it is, or copied to channels_last once per call, where x is a
    CUDA tensor whose channels are strided (gathering along them is uncoalesced), or where
    `too_wide(strides)` (window_too_wide for its (stride_c, stride_h, stride_w)) says so.
    Returns (to_layout, x as the kernel sees it)."""
    wide = too_wide is not None and too_wide((x.stride(1), x.stride(2), x.stride(3)))
    if (x.stride(1) != 1 and backend.on_gpu(x)) or wide:
        def to_layout(t):
            return t.contiguous(memory_format=torch.channels_last)
    else:
        def to_layout(t):
            return t
    return to_layout, to_layout(x)


def normalize_padding(padding, weight_shape, dilation, stride):
    """F.conv2d's padding forms (int, pair, 'same', 'valid') as (top, bottom, left, right)."""
    if isinstance(padding, str):
        if padding == "valid":
            return [0, 0, 0, 0]
        if padding == "same":
            if stride != (1, 1):
                raise ValueError("conv2d_bias_act: padding='same' is not supported for strided convolutions")
            pads = []
            for d, ksize in zip(dilation, weight_shape[2:]):
                total = d * (ksize - 1)
                pads += [total // 2, total - total // 2]  # the extra pixel goes last, as in F.conv2d
            return pads
        raise ValueError(f"conv2d_bias_act: padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    ph, pw = pair("padding", padding)
    return [ph, ph, pw, pw]


def normalize_args(input, weight, stride, padding, dilation, groups, shortcut_stride=1, op="conv2d_bias_act"):
    """F.conv2d's argument forms as (stride, padding (top, bottom, left, right), dilation, shortcut_stride)."""
    if not isinstance(input, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"{op}: input and weight must be tensors")
    if not isinstance(groups, int) or isinstance(groups, bool):
        raise TypeError(f"{op}: groups must be an int, got {groups!r}")
    stride = pair("stride", stride)
    dilation = pair("dilation", dilation)
    shortcut_stride = pair("shortcut_stride", shortcut_stride)
    return stride, normalize_padding(padding, weight.shape, dilation, stride), dilation, shortcut_stride


