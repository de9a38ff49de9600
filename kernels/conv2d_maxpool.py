"""conv2d + bias (+ ReLU) + max pooling as one Triton kernel: the conv's output is never written.

A ResNet stem is conv 7x7/2 -> BN -> ReLU -> maxpool 3x3/2. Unfused, the conv writes a map four
times the size of the pooled one (112x112x64 per image at 224x224) and the pool reads it back.
Here each program owns a tile of pooled pixels x output channels and, for each of the pooling
window's taps, computes the conv tile under that tap with the implicit-GEMM main loop of
conv2d.py, keeping the running maximum in registers. Neighbouring windows overlap, so a 3x3/2
pool computes the conv 9/4 = 2.25 times over: compute traded for memory traffic. Bias and ReLU
commute with the maximum (one constant per channel, a monotone function), so they are applied once
to the pooled tile.

Order of this file: @triton.jit kernel, launcher, op registration,
reference.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op

from . import backend, configs, conv2d, precompile
from ._checks import pair
from .conv2d import cudnn_fused, reference_plan
from .igemm import (
    check_conv_args,
    conv_launch,
    conv_tile,
    dot,
    epilogue,
    ieee_fp32,
    kernel_operands,
    normalize_args,
    other_layout,
    output_size,
    output_tile,
    row_filters,
    row_pad,
    row_runs,
)

# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _conv2d_bias_act_maxpool_kernel(
    x_ptr,  # (N, C, H, W), any strides
    w_ptr,  # (K, C // groups, R, S), any strides
    b_ptr,  # (K,), or None
    y_ptr,  # (N, K, PH, PW) pooled output, dense channels_last, written once
    M,  # N * PH * PW: GEMM rows are pooled pixels
    Kg,  # K // groups
    Cg,  # C // groups
    H, W, P, Q,  # input map, conv output map
    PH, PW,  # pooled map
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    pool_stride_h, pool_stride_w, pool_pad_h, pool_pad_w,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wk, stride_wc, stride_wr, stride_ws,
    stride_yn, stride_yk, stride_yp, stride_yq,
    R: tl.constexpr,
    S: tl.constexpr,
    POOL_R: tl.constexpr,
    POOL_S: tl.constexpr,
    PADDED: tl.constexpr,
    FLAT_K: tl.constexpr,
    C_PAD: tl.constexpr,
    C_DIVISOR: tl.constexpr,  # a power of two dividing Cg: where BLOCK_K divides it, no channel mask
    ROWS: tl.constexpr,  # config, few-channel convs over dense NHWC rows: the row schedule
    ROW_PAD: tl.constexpr,
    APPLY_RELU: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    FLAT_LOOP: tl.constexpr,
):
    # Rows are pooled pixels (n, ph, pw).
    m, mask_n, n, ph, pw, group, k_glob = output_tile(M, Kg, PH, PW, BLOCK_M, BLOCK_N, GROUP_M)
    mask_m = m < M
    x_row = n.to(tl.int64) * stride_xn + group.to(tl.int64) * Cg * stride_xc
    w_col = k_glob.to(tl.int64) * stride_wk

    best = tl.full((BLOCK_M, BLOCK_N), float("-inf"), dtype=tl.float32)
    # The conv pixel under the pooling window's first tap, and where its input window starts.
    cp0 = ph * pool_stride_h - pool_pad_h
    cq0 = pw * pool_stride_w - pool_pad_w
    # The row schedule over a conv without padding (space-to-depth's): one reduction over every
    # filter row at once, (BLOCK_M, R_PAD * ROW_PAD) by (R_PAD * ROW_PAD, BLOCK_N). Its weight tile
    # is the same for all pooling taps, so it is loaded once, here, and each tap loads only its
    # input runs, from a start that moves by a scalar from tap to tap: (h0, w0) of the first tap's
    # window, and of the others, unclamped. A tap in the pool's padding reads a window outside the
    # conv's map, inside the margin of zeros that kernel_operands keeps for it. (With padding, the
    # masks of so wide a tile cost more registers than a thread has: conv_tile's loop over rows.)
    ALL_ROWS: tl.constexpr = FLAT_K and ROWS and not PADDED
    if ALL_ROWS:
        R_PAD: tl.constexpr = triton.next_power_of_2(R)
        w_rows = row_filters(w_ptr, w_col, mask_n, 0, stride_wr, R, ROW_PAD, R_PAD)
        h0 = cp0 * stride_h - pad_h
        w0 = cq0 * stride_w - pad_w
        start0 = x_row + h0.to(tl.int64) * stride_xh + w0.to(tl.int64) * stride_xw
    # A loop, not unrolled: nine copies of the conv's pipelined main loop made the stem the slowest
    # kernel to compile by far (24 s against 3 s for fp32 on an sm_90 target; compile_report.py).
    for t in range(POOL_R * POOL_S):
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if ALL_ROWS:
            dh = (t // POOL_S) * stride_h
            dw = (t % POOL_S) * stride_w
            a = row_runs(x_ptr, start0 + dh.to(tl.int64) * stride_xh + dw.to(tl.int64) * stride_xw, h0 + dh, w0 + dw,
                         0, Cg, H, W, dil_h, stride_xh, R, S, PADDED, ROW_PAD, R_PAD)
            acc = dot(acc, a, w_rows, DOT_FP32, INPUT_PRECISION)
            # Taps in the pool's padding count as -inf.
            cp = cp0 + t // POOL_S
            cq = cq0 + t % POOL_S
            acc = tl.where(((cp >= 0) & (cp < P) & (cq >= 0) & (cq < Q))[:, None], acc, float("-inf"))
        else:
            # The conv pixel under pooling tap t, clamped into the conv's map. A tap in the pool's
            # padding so lands on the window's nearest pixel inside the map, which the window holds
            # anyway (its padding is at most half of it, so every window holds pixels of the map):
            # counted twice, which a maximum ignores.
            cp = tl.minimum(tl.maximum(cp0 + t // POOL_S, 0), P - 1)
            cq = tl.minimum(tl.maximum(cq0 + t % POOL_S, 0), Q - 1)
            acc = conv_tile(acc, x_ptr, w_ptr, x_row, cp * stride_h - pad_h, cq * stride_w - pad_w, w_col, mask_n,
                            None, None, Cg, (H, W), (dil_h, dil_w), (stride_xc, stride_xh, stride_xw),
                            (stride_wc, stride_wr, stride_ws), R, S, PADDED, FLAT_K, C_PAD, C_DIVISOR % BLOCK_K == 0,
                            ROWS, ROW_PAD, FLAT_LOOP, DOT_FP32, INPUT_PRECISION, BLOCK_K)
        # NaN wins, as in torch's max pooling.
        best = tl.maximum(best, acc, propagate_nan=tl.PropagateNan.ALL)

    best = epilogue(best, b_ptr, k_glob, mask_n, None, APPLY_RELU)
    # y is dense NHWC: pooled pixel m's row starts at m * K.
    y_ptrs = y_ptr + (m.to(tl.int64) * stride_yq)[:, None] + (k_glob.to(tl.int64) * stride_yk)[None, :]
    tl.store(y_ptrs, best.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------

# Accumulator elements per thread that a config may give this kernel: it holds two tiles (the
# running maximum and the conv tile under one pooling tap), and spills registers at 64 each.
MAX_ACC_PER_THREAD = 32
# The same in fp32 with TF32 off: its dots run on the FMA units, with the row schedule's (BLOCK_M,
# 256) input runs in registers beside the tiles. Compiled for an H100, the candidates of 32 a
# thread (128x64 over 8 warps, 64x64 over 4) spilled 3-5 KB a thread on triton 3.8 (19-21 KB on
# 3.6); those of 16 (64x64 over 8 warps, 32x64 over 4), none on either.
IEEE_MAX_ACC_PER_THREAD = 16


def shared_bytes(weight, element_size, padded):
    """configs' shared_bytes(config) for this kernel over a `weight` packed for the row schedule of
    a conv without padding (`padded` False): there, each stage of the loop over pooling taps holds
    the (BLOCK_M, R_PAD * ROW_PAD) input runs, and the weight tile (R_PAD * ROW_PAD, BLOCK_N) stays
    for the whole loop; otherwise the GEMM's."""
    width = triton.next_power_of_2(weight.shape[2]) * row_pad(weight)

    def count(config):
        if padded or not config.get("ROWS"):
            return configs.gemm_shared_bytes(config, element_size)
        return (config["num_stages"] * config["BLOCK_M"] + config["BLOCK_N"]) * width * element_size

    return count


def _check_pool_args(conv_shape, pool_size, pool_stride, pool_padding):
    if len(pool_size) != 2 or len(pool_stride) != 2 or len(pool_padding) != 2:
        raise ValueError("conv2d_bias_act_maxpool: pool_size, pool_stride and pool_padding take 2 values")
    if min(pool_size) < 1 or min(pool_stride) < 1 or min(pool_padding) < 0:
        raise ValueError(
            f"conv2d_bias_act_maxpool: pool_size {tuple(pool_size)} and pool_stride {tuple(pool_stride)} "
            f"must be >= 1, pool_padding {tuple(pool_padding)} >= 0"
        )
    if any(2 * pad > k for pad, k in zip(pool_padding, pool_size)):
        raise ValueError(
            f"conv2d_bias_act_maxpool: pool_padding {tuple(pool_padding)} must be at most half of "
            f"pool_size {tuple(pool_size)}"
        )
    n, k, p, q = conv_shape
    ph, pw = output_size(p, q, *pool_size, pool_stride, [pool_padding[0]] * 2 + [pool_padding[1]] * 2, (1, 1))
    if ph < 1 or pw < 1:
        raise ValueError(
            f"conv2d_bias_act_maxpool: a {tuple(pool_size)} pool does not fit the conv's {p}x{q} output"
        )
    return n, k, ph, pw


def _plan(x, weight, bias, stride, padding, dilation, groups, relu, pool_size, pool_stride, pool_padding,
          backend_name, *, traceable=False, blocks=None):
    """Check the arguments once and return run(x) -> y for inputs laid out as x (see
    conv2d.plan_conv2d_bias_act). `blocks`: the pooled kernel alone, its conv as space_to_depth or
    not (None: as igemm.SPACE_TO_DEPTH says, and on a GPU the first call times the other ways too)."""
    conv_shape = check_conv_args(x, weight, bias, stride, padding, dilation, groups, None, None, None,
                                  op="conv2d_bias_act_maxpool")
    out_shape = _check_pool_args(conv_shape, pool_size, pool_stride, pool_padding)
    path = backend.choose(x, backend_name, cudnn=True)
    if path == "cudnn":
        # cuDNN fuses conv+bias+ReLU but not the pooling: its best is two kernels.
        def run_cudnn(x):
            y = cudnn_fused(x, weight, bias, stride, padding, dilation, groups, None, relu)
            return F.max_pool2d(y, pool_size, pool_stride, pool_padding).contiguous(memory_format=torch.channels_last)
        return run_cudnn
    if path == "reference":
        return reference_maxpool_plan(weight, bias, stride, padding, dilation, groups, relu, pool_size, pool_stride,
                                      pool_padding)
    n, _, ph, pw = out_shape
    p, q = conv_shape[2:]
    # Which is faster, the conv with its pooling or the conv kernel and then torch's max pooling (the
    # pooled kernel computes each conv pixel 2.25 times, where 3x3/2 windows overlap), and which
    # input layout the conv reads faster (igemm.space_to_depth), is the GPU's to say: way 0, one
    # kernel; 1, two (the conv's plan chooses its layout in turn); 2, one kernel over the other layout.
    ways = []
    if blocks is None and backend.on_gpu(x) and n * ph * pw:
        ways.append(_apart_plan(x, weight, bias, stride, padding, dilation, groups, relu, pool_size, pool_stride,
                                pool_padding, out_shape, backend_name, traceable))
        other = other_layout(x, weight, stride, dilation, groups)
        if other is not None:
            ways.append(_plan(x, weight, bias, stride, padding, dilation, groups, relu, pool_size, pool_stride,
                              pool_padding, backend_name, traceable=traceable, blocks=other))
    # (The row schedule's pooling taps in the pool's padding read conv windows outside the conv's
    # map, unmasked: kernel_operands keeps a margin for them.)
    to_layout, x, weight, groups, stride, padding, rows = kernel_operands(
        x, weight, stride, padding, dilation, groups, (p, q), margin=max(pool_padding), traceable=traceable,
        blocks=blocks)
    launch = conv_launch(
        "conv2d_bias_act_maxpool", _conv2d_bias_act_maxpool_kernel, x, weight, bias, out_shape, n * ph * pw,
        stride, padding, dilation, groups, relu, traceable=traceable, rows=rows,
        max_acc_per_thread=IEEE_MAX_ACC_PER_THREAD if ieee_fp32(x.dtype) else MAX_ACC_PER_THREAD,
        shared_bytes=shared_bytes(weight, x.element_size(), any(padding)),
        P=p, Q=q, PH=ph, PW=pw, POOL_R=pool_size[0], POOL_S=pool_size[1],
        pool_stride_h=pool_stride[0], pool_stride_w=pool_stride[1],
        pool_pad_h=pool_padding[0], pool_pad_w=pool_padding[1],
    )

    def launch_into(y, x):
        launch(to_layout(x), weight, bias, y)

    pooled = backend.output_plan(out_shape, x, launch_into)
    return backend.PlanChoice("conv2d_bias_act_maxpool:plan", launch.key, (pooled, *ways)) if ways else pooled


def _apart_plan(x, weight, bias, stride, padding, dilation, groups, relu, pool_size, pool_stride, pool_padding,
                out_shape, backend_name, traceable):
    """run(x) -> y: the conv as a conv2d_bias_act plan, then torch's max pooling of its output (as
    fuse(stem_maxpool=False) runs the stem)."""
    conv = conv2d._plan(x, weight, bias, stride, padding, dilation, groups, None, relu, None, [1, 1],
                        backend_name, traceable=traceable)

    def run_apart(x):
        y = conv(x, None)
        if precompile.session() is not None:  # listing kernels to compile: y was never computed
            return torch.empty(out_shape, dtype=y.dtype, device=y.device, memory_format=torch.channels_last)
        y = F.max_pool2d(y, pool_size, pool_stride, pool_padding)
        return y.contiguous(memory_format=torch.channels_last)

    return run_apart


# ----------------------------------------------------------------------------------------------
# Op registration
# ----------------------------------------------------------------------------------------------


@triton_op("fused_resnet::conv2d_bias_act_maxpool", mutates_args=())
def _conv2d_bias_act_maxpool_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    relu: bool,
    pool_size: list[int],
    pool_stride: list[int],
    pool_padding: list[int],
    backend_name: str,
) -> torch.Tensor:
    return _plan(x, weight, bias, stride, padding, dilation, groups, relu, pool_size, pool_stride, pool_padding,
                 backend_name, traceable=True)(x)


def conv2d_bias_act_maxpool(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
                            relu=False, pool_size=3, pool_stride=None, pool_padding=0):
    """F.max_pool2d(relu(F.conv2d(input, weight, bias, ...)), pool_size, pool_stride, pool_padding), one kernel.

    The conv takes F.conv2d's argument forms, as kernels.conv2d_bias_act does; the pool takes
    F.max_pool2d's (pool_stride defaults to pool_size; no dilation, no ceil_mode). The ReLU only if
    `relu`. 4-D input gives a channels_last output. The conv's output is never written to memory.
    """
    args = _normalize(input, weight, stride, padding, dilation, groups, pool_size, pool_stride, pool_padding)
    input, weight, bias = backend.autocast_operands(input, weight, bias)
    unbatched = input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
    out = torch.ops.fused_resnet.conv2d_bias_act_maxpool(input, weight, bias, *args[:3], groups, bool(relu), *args[3:],
                                                         backend.current_backend())
    return out.squeeze(0) if unbatched else out


def plan_conv2d_bias_act_maxpool(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
                                 relu=False, pool_size=3, pool_stride=None, pool_padding=0):
    """conv2d_bias_act_maxpool planned for 4-D inputs laid out as `input`: run(x) -> y (see
    kernels.plan_conv2d_bias_act)."""
    args = _normalize(input, weight, stride, padding, dilation, groups, pool_size, pool_stride, pool_padding)
    if input.dim() != 4:
        raise ValueError(f"plan_conv2d_bias_act_maxpool: input must be 4-D (N, C, H, W), got shape "
                         f"{tuple(input.shape)}")
    return _plan(input, weight, bias, *args[:3], groups, bool(relu), *args[3:], backend.current_backend())


def _normalize(input, weight, stride, padding, dilation, groups, pool_size, pool_stride, pool_padding):
    """The op's list arguments: stride, padding (4), dilation, pool_size, pool_stride, pool_padding."""
    stride, padding, dilation, _ = normalize_args(input, weight, stride, padding, dilation, groups,
                                                  op="conv2d_bias_act_maxpool")
    pool_size = pair("pool_size", pool_size)
    pool_stride = pool_size if pool_stride is None else pair("pool_stride", pool_stride)
    pool_padding = pair("pool_padding", pool_padding)
    return list(stride), padding, list(dilation), list(pool_size), list(pool_stride), list(pool_padding)


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------


def conv2d_bias_act_maxpool_reference(x, weight, bias, stride, padding, dilation, groups, relu,
                                      pool_size, pool_stride, pool_padding):
    """The same as torch ops: conv (+ bias + ReLU), then max pooling; the conv's output goes to memory."""
    return reference_maxpool_plan(weight, bias, stride, padding, dilation, groups, relu, pool_size, pool_stride,
                                  pool_padding)(x)


def reference_maxpool_plan(weight, bias, stride, padding, dilation, groups, relu, pool_size, pool_stride,
                           pool_padding):
    """conv2d_bias_act_maxpool_reference with everything but x bound: run(x) -> y."""
    conv = reference_plan(weight, bias, stride, padding, dilation, groups, relu)

    def run(x):
        y = F.max_pool2d(conv(x), pool_size, pool_stride, pool_padding)
        return y.contiguous(memory_format=torch.channels_last)

    return run
