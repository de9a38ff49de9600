"""conv2d + bias (+ residual, or a projection shortcut) (+ ReLU) as one implicit-GEMM Triton kernel.

Built on the implicit-GEMM core of igemm.py: each program computes a tile of conv(x, w) in fp32,
and the epilogue adds the bias, the residual (or, for a projection shortcut, nothing: the
shortcut's 1x1 conv ran as a second stretch of the same reduction) and applies the ReLU before
the output is written once.

Order of this file: @triton.jit kernel, launcher, op registration, reference.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op

from . import backend
from .igemm import (
    box_schedule,
    box_tile,
    check_conv_args,
    check_window,
    conv_launch,
    conv_tile,
    dense_1x1,
    dense_tile,
    epilogue,
    kernel_operands,
    normalize_args,
    other_layout,
    output_box,
    output_tile,
    residual_tile,
    split_range,
    split_sum,
    tile_ids,
    window_too_wide,
)

# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------

# What the epilogue adds to the conv: nothing, a residual tensor of the output's shape, or a
# projection shortcut (a 1x1 conv of another tensor, computed inside this GEMM).
EPILOGUES = ("none", "residual", "shortcut")


@triton.jit
def output_descriptor(ptr, M, Kg, P, Q, stride_yn, stride_yp, stride_yq, BOX_W: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """A tensor descriptor over y's layout at ptr (y, or a residual laid out as y): for box tiles the
    4-D [N, P, Q, K] with (1, BLOCK_M // BOX_W, BOX_W, BLOCK_N) blocks, else the matrix [M, K]."""
    if BOX_W > 0:
        desc = tl.make_tensor_descriptor(ptr, shape=[M // (P * Q), P, Q, Kg],
                                         strides=[stride_yn, stride_yp, stride_yq, 1],
                                         block_shape=[1, BLOCK_M // BOX_W, BOX_W, BLOCK_N])
    else:
        desc = tl.make_tensor_descriptor(ptr, shape=[M, Kg], strides=[stride_yq, 1], block_shape=[BLOCK_M, BLOCK_N])
    return desc


@triton.jit
def _conv2d_bias_act_kernel(
    x_ptr,  # (N, C, H, W), any strides; channels_last keeps C contiguous
    w_ptr,  # (K, C // groups, R, S), any strides; channels_last is (K, R, S, C) in memory
    b_ptr,  # (K,), or None
    r_ptr,  # EPILOGUE "residual": (N, K, P, Q), dense channels_last as y; "shortcut": the shortcut's input
    #         (N, C_sc, H_sc, W_sc), any strides; else None
    shortcut_w_ptr,  # EPILOGUE "shortcut": the shortcut's weight (K, C_sc, 1, 1); else None
    y_ptr,  # (N, K, P, Q), dense channels_last (the [N*P*Q, K] matrix), written once
    partial_ptr,  # SPLIT_K > 1: fp32 scratch for the partial tiles (split_sum); else None
    count_ptr,  # SPLIT_K > 1: int32 arrival counts, one an output tile, zero (and left zero); else None
    M,  # N * P * Q: GEMM rows
    Kg,  # K // groups: GEMM columns per group
    Cg,  # C // groups: channels reduced per (r, s)
    C_sc,  # the shortcut's input channels: the second stretch of the reduction
    H, W, P, Q,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    shortcut_stride_h, shortcut_stride_w,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wk, stride_wc, stride_wr, stride_ws,
    stride_rn, stride_rk, stride_rp, stride_rq,
    stride_swk, stride_swc,
    stride_yn, stride_yk, stride_yp, stride_yq,
    R: tl.constexpr,
    S: tl.constexpr,
    PADDED: tl.constexpr,  # some taps fall outside the input: mask them
    FLAT_K: tl.constexpr,  # one reduction over (r, s, c) instead of one per (r, s)
    C_PAD: tl.constexpr,  # FLAT_K: the channels rounded up to a power of two
    C_DIVISOR: tl.constexpr,  # a power of two dividing Cg and C_sc: where BLOCK_K divides it, no channel mask
    ROWS: tl.constexpr,  # config, few-channel convs over dense NHWC rows: the row schedule
    ROW_PAD: tl.constexpr,
    EPILOGUE: tl.constexpr,  # "none", "residual" or "shortcut" (EPILOGUES)
    APPLY_RELU: tl.constexpr,
    DOT_FP32: tl.constexpr,  # upcast operands before tl.dot (the interpreter's bf16 dot is wrong)
    INPUT_PRECISION: tl.constexpr,  # "tf32" or "ieee" for fp32 operands
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    FLAT_LOOP: tl.constexpr,  # config: one pipelined loop over (tap, channel block)
    USE_TMA: tl.constexpr,  # config, dense 1x1 convs only: x, w and y through tensor descriptors
    BOX_W: tl.constexpr,  # config, box_schedule convs only: > 0 for box tiles (BLOCK_M // BOX_W x BOX_W pixels)
    BOX_STRIDE: tl.constexpr,  # box_schedule convs: their stride (1 or 2); else 1
    SPLIT_K: tl.constexpr,  # config, gathered FLAT_LOOP tiles only: programs that share an output tile
):
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    even_c: tl.constexpr = C_DIVISOR % BLOCK_K == 0  # whole channel blocks only (conv_tile's EVEN_C)
    # The reduction: the main loop's trips, then the shortcut's channel blocks (C_sc is 0 without
    # one). A split-K program (SPLIT_K > 1, gathered tiles) runs a stretch of it, and split_sum
    # adds the splits' tiles up.
    if SPLIT_K == 1:
        first, last, sc_first, sc_last = None, None, None, None  # (all of each)
    else:
        first, last, sc_first, sc_last = split_range(R * S * tl.cdiv(Cg, BLOCK_K), tl.cdiv(C_sc, BLOCK_K), SPLIT_K)
    tl.static_assert(SPLIT_K == 1 or (FLAT_LOOP and not FLAT_K and BOX_W == 0 and not USE_TMA),
                     "split-K runs the gathered FLAT_LOOP schedule only")
    if BOX_W > 0:
        # Box tiles: every tap's input is a box of the output box's shape, read through a descriptor.
        mask_m, mask_n, n, p, q, k_glob, p0, q0, k0 = output_box(M, Kg, P, Q, BLOCK_M // BOX_W, BOX_W, BLOCK_N,
                                                                  GROUP_M)
        m = (n * P + p) * Q + q  # each row's output pixel (masked where the box passes the map)
        acc = box_tile(acc, x_ptr, w_ptr, n, p0 * BOX_STRIDE - pad_h, q0 * BOX_STRIDE - pad_w, k0,
                       (M // (P * Q), H, W), Cg, Kg, (dil_h, dil_w), (stride_xn, stride_xh, stride_xw), stride_wk,
                       R, S, BOX_STRIDE, even_c, DOT_FP32, INPUT_PRECISION, BLOCK_M // BOX_W, BOX_W, BLOCK_N, BLOCK_K)
    else:
        m, mask_n, n, p, q, group, k_glob = output_tile(M, Kg, P, Q, BLOCK_M, BLOCK_N, GROUP_M)
        mask_m = m < M
        if USE_TMA:
            # A dense 1x1 stride-1 conv: the NHWC activations are the matrix [M, C], one row a pixel.
            pid_m, pid_n = tile_ids(M, Kg, BLOCK_M, BLOCK_N, GROUP_M)
            acc = dense_tile(acc, x_ptr, w_ptr, M, Kg, Cg, stride_xw, stride_wk, pid_m, pid_n, DOT_FP32,
                             INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        else:
            # 64-bit row offsets: one tensor may pass 2**31 elements even when M does not.
            x_row = n.to(tl.int64) * stride_xn + group.to(tl.int64) * Cg * stride_xc
            acc = conv_tile(acc, x_ptr, w_ptr, x_row, p * stride_h - pad_h, q * stride_w - pad_w,
                            k_glob.to(tl.int64) * stride_wk, mask_n, first, last, Cg, (H, W), (dil_h, dil_w),
                            (stride_xc, stride_xh, stride_xw), (stride_wc, stride_wr, stride_ws),
                            R, S, PADDED, FLAT_K, C_PAD, even_c, ROWS, ROW_PAD, FLAT_LOOP, DOT_FP32, INPUT_PRECISION,
                            BLOCK_K)
    if EPILOGUE == "shortcut":
        # A projection shortcut relu(W x + W_sc x_sc + b) is one GEMM over the concatenated
        # reduction [x ; x_sc]: its 1x1 strided conv continues the same accumulator, so its output
        # is never written to memory. Its bias is already summed into b_ptr.
        acc = conv_tile(acc, r_ptr, shortcut_w_ptr, n.to(tl.int64) * stride_rn, p * shortcut_stride_h,
                        q * shortcut_stride_w, k_glob.to(tl.int64) * stride_swk, mask_n, sc_first, sc_last,
                        C_sc, (0, 0), (1, 1), (stride_rk, stride_rp, stride_rq), (stride_swc, 0, 0),
                        1, 1, False, False, 1, even_c, False, 1, FLAT_LOOP, DOT_FP32, INPUT_PRECISION, BLOCK_K)

    if SPLIT_K > 1:
        acc, last_split = split_sum(acc, partial_ptr, count_ptr, SPLIT_K, BLOCK_M, BLOCK_N)
        mask_m = mask_m & last_split  # the other splits read nothing more and write nothing
    mask_y = mask_m[:, None] & mask_n[None, :]
    # y, and a residual, are dense NHWC: output pixel m's row starts at m * K (no division by P or Q
    # in the epilogue's layout). Where y is written through a descriptor, the residual is read
    # through one of the same shape: its tile lands in shared memory, without a 64-bit address an
    # element held beside the accumulator.
    y_rows = m.to(tl.int64) * stride_yq
    descriptors: tl.constexpr = BOX_W > 0 or USE_TMA == 1
    if descriptors:
        # (Made before the epilogue: compiled for an H100, the kernels then hold fewer registers.)
        y_desc = output_descriptor(y_ptr, M, Kg, P, Q, stride_yn, stride_yp, stride_yq, BOX_W, BLOCK_M, BLOCK_N)
    if BOX_W > 0:
        y_at = [n, p0, q0, k0]  # the output tile's place in output_descriptor's view
    elif USE_TMA:
        y_at = [pid_m * BLOCK_M, pid_n * BLOCK_N]
    if EPILOGUE != "residual":
        res = None
    elif descriptors:
        r_desc = output_descriptor(r_ptr, M, Kg, P, Q, stride_yn, stride_yp, stride_yq, BOX_W, BLOCK_M, BLOCK_N)
        res = r_desc.load(y_at).reshape(BLOCK_M, BLOCK_N)
    else:
        res = residual_tile(r_ptr, y_rows, stride_yk, k_glob, mask_y)
    acc = epilogue(acc, b_ptr, k_glob, mask_n, res, APPLY_RELU)
    if descriptors:
        # The tile stored whole, clipped to the map (boxes) or at M (the dense 1x1's [M, K] matrix).
        y_desc.store(y_at, acc.to(y_ptr.dtype.element_ty).reshape(y_desc.block_shape))
    else:
        y_ptrs = y_ptr + y_rows[:, None] + (k_glob.to(tl.int64) * stride_yk)[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_y)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


def _plan(x, weight, bias, stride, padding, dilation, groups, residual, relu, shortcut_weight, shortcut_stride,
          backend_name, *, traceable=False, blocks=None):
    """Check the arguments once and return run(x, residual) -> y for operands laid out as these.

    The plan holds weight, bias and shortcut_weight; x and residual (their shapes, strides, dtype
    and device as given here) come with each call. With `traceable`, kernels launch through
    wrap_triton (inside the registered op). `blocks`: whether a conv that space_to_depth fits runs
    so (None: igemm.SPACE_TO_DEPTH says, and on a GPU the first call times the other layout too)."""
    out_shape = check_conv_args(x, weight, bias, stride, padding, dilation, groups, residual,
                                shortcut_weight, shortcut_stride)
    path = backend.choose(x, backend_name, cudnn=True)
    if path == "reference":
        return reference_plan(weight, bias, stride, padding, dilation, groups, relu, shortcut_weight, shortcut_stride)
    if path == "cudnn":
        def run_cudnn(x, residual=None):
            return cudnn_fused(x, weight, bias, stride, padding, dilation, groups, residual, relu, shortcut_weight,
                               shortcut_stride)
        return run_cudnn
    n, _, p, q = out_shape
    # The stem's conv: which input layout its kernel reads faster, the pixels as they are or their
    # 2x2 blocks (space_to_depth), is the GPU's to say. Way 0 is igemm.SPACE_TO_DEPTH's.
    other = None if blocks is not None or not n * p * q else other_layout(x, weight, stride, dilation, groups)
    other_way = None if other is None else _plan(
        x, weight, bias, stride, padding, dilation, groups, residual, relu, shortcut_weight, shortcut_stride,
        backend_name, traceable=traceable, blocks=other)
    kind = "none" if residual is None else ("residual" if shortcut_weight is None else "shortcut")
    # (Space-to-depth changes x, not what the epilogue reads: it applies with any kind.)
    to_layout, x, weight, groups, stride, padding, rows = kernel_operands(
        x, weight, stride, padding, dilation, groups, (p, q), traceable=traceable, blocks=blocks)
    c_sc = shortcut_weight.shape[1] if kind == "shortcut" else 0
    # The kernel reads a residual as it writes the output, by dense NHWC rows: a residual of
    # other strides is copied so at each call. A shortcut's input is read as it is, unless its
    # 1x1 windows span too much for the main loop's 32-bit offsets (window_too_wide). (r_strides are
    # the shortcut input's, as the kernel sees it.)
    dense_residual = residual is not None and residual.is_contiguous(memory_format=torch.channels_last)
    copy_residual = not dense_residual and (
        kind == "residual" or (kind == "shortcut" and window_too_wide(residual.stride()[1:], c_sc)))
    r_strides = (0, 0, 0, 0)
    if kind == "shortcut":
        r_strides = backend.channels_last_strides(residual.shape) if copy_residual else residual.stride()
        check_window("conv2d_bias_act", r_strides[1:], c_sc)
    sw_strides = shortcut_weight.stride() if kind == "shortcut" else (0, 0, 0, 0)
    dense = dense_1x1(x, weight, stride, padding, dilation, groups)
    boxes = not rows and box_schedule(x, weight, stride, groups)  # box tiles read the weight as (K, R, S, C)
    launch = conv_launch(
        "conv2d_bias_act", _conv2d_bias_act_kernel, x, weight, bias, out_shape, n * p * q,
        stride, padding, dilation, groups, relu, extra_reduction=c_sc, traceable=traceable, dense=dense,
        boxes=boxes, rows=rows, split=True,
        C_sc=c_sc, P=p, Q=q, shortcut_stride_h=shortcut_stride[0], shortcut_stride_w=shortcut_stride[1],
        stride_rn=r_strides[0], stride_rk=r_strides[1], stride_rp=r_strides[2], stride_rq=r_strides[3],
        stride_swk=sw_strides[0], stride_swc=sw_strides[1],
        EPILOGUE=kind, BOX_STRIDE=stride[0] if boxes else 1,
    )

    def launch_into(y, x, residual=None):
        x = to_layout(x)
        if copy_residual:
            residual = residual.contiguous(memory_format=torch.channels_last)
        if (dense or boxes) and not backend.aligned(x):
            x = x.clone(memory_format=torch.channels_last)  # descriptors need 16-byte aligned rows
        if (dense or boxes) and kind == "residual" and not backend.aligned(residual):
            residual = residual.clone(memory_format=torch.channels_last)  # so does the residual's
        launch(x, weight, bias, residual, shortcut_weight, y)

    plan = backend.output_plan(out_shape, x, launch_into)
    return plan if other_way is None else backend.PlanChoice("conv2d_bias_act:plan", launch.key, (plan, other_way))


# ----------------------------------------------------------------------------------------------
# Op registration
# ----------------------------------------------------------------------------------------------


@triton_op("fused_resnet::conv2d_bias_act", mutates_args=())
def _conv2d_bias_act_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    residual: torch.Tensor | None,
    relu: bool,
    shortcut_weight: torch.Tensor | None,
    shortcut_stride: list[int],
    backend_name: str,
) -> torch.Tensor:
    plan = _plan(x, weight, bias, stride, padding, dilation, groups, residual, relu, shortcut_weight, shortcut_stride,
                 backend_name, traceable=True)
    return plan(x, residual)


def conv2d_bias_act(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
                    residual=None, relu=False, shortcut_weight=None, shortcut_stride=1):
    """relu(F.conv2d(input, weight, bias, stride, padding, dilation, groups) + residual), one kernel.

    Takes every argument form F.conv2d takes (unbatched 3-D input, int or pair stride/padding/
    dilation, padding 'same' or 'valid', any groups) and any memory format. The add happens only
    if `residual` is given, the ReLU only if `relu`. 4-D input gives a channels_last output.

    With `shortcut_weight` (K, C_sc, 1, 1), the residual is a projection shortcut's input: what
    is added is F.conv2d(residual, shortcut_weight, stride=shortcut_stride), computed in the same
    GEMM as the main conv (groups=1), so the shortcut's output never reaches memory. Fold the
    shortcut's bias into `bias`.

    The backend (Triton, reference, cuDNN) follows kernels.backend. Under torch.autocast the operands
    are cast as F.conv2d's would be (kernels.backend.autocast_operands).
    """
    stride, padding, dilation, shortcut_stride = normalize_args(input, weight, stride, padding, dilation, groups,
                                                                shortcut_stride)
    input, weight, bias, residual, shortcut_weight = backend.autocast_operands(input, weight, bias, residual,
                                                                               shortcut_weight)
    unbatched = input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
        if residual is not None:
            if residual.dim() != 3:
                raise ValueError(
                    f"conv2d_bias_act: residual for unbatched input must be 3-D, got shape {tuple(residual.shape)}"
                )
            residual = residual.unsqueeze(0)
    elif input.dim() != 4:
        raise ValueError(
            f"conv2d_bias_act: input must be 3-D (C, H, W) or 4-D (N, C, H, W), got shape {tuple(input.shape)}"
        )
    out = torch.ops.fused_resnet.conv2d_bias_act(
        input, weight, bias, list(stride), padding, list(dilation), groups, residual, bool(relu),
        shortcut_weight, list(shortcut_stride), backend.current_backend(),
    )
    return out.squeeze(0) if unbatched else out


def plan_conv2d_bias_act(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
                         residual=None, relu=False, shortcut_weight=None, shortcut_stride=1, backend_name=None,
                         traceable=False):
    """conv2d_bias_act planned for 4-D operands laid out as `input` and `residual`: run(x, residual) -> y.

    Every check and everything that follows from the operands' shapes, strides, dtype and device
    and from the backend in force (or `backend_name`) is done here, once; the plan runs the same
    computation as conv2d_bias_act on further tensors of that signature without checking them again
    (in eager mode, outside tracing: the plan launches kernels directly, not through the registered
    op; inside another registered op, pass `traceable`).
    """
    stride, padding, dilation, shortcut_stride = normalize_args(input, weight, stride, padding, dilation, groups,
                                                                shortcut_stride)
    if input.dim() != 4:
        raise ValueError(f"plan_conv2d_bias_act: input must be 4-D (N, C, H, W), got shape {tuple(input.shape)}")
    return _plan(input, weight, bias, list(stride), padding, list(dilation), groups, residual, bool(relu),
                 shortcut_weight, list(shortcut_stride),
                 backend.current_backend() if backend_name is None else backend_name, traceable=traceable)


def cudnn_fused(x, weight, bias, stride, padding, dilation, groups, residual, relu,
                 shortcut_weight=None, shortcut_stride=(1, 1)):
    if shortcut_weight is not None:
        residual = F.conv2d(residual, shortcut_weight, None, shortcut_stride)
    symmetric = padding[0] == padding[1] and padding[2] == padding[3]
    if not (relu and symmetric and x.dtype != torch.float64):
        return conv2d_bias_act_reference(x, weight, bias, stride, padding, dilation, groups, residual, relu)
    x = x.contiguous(memory_format=torch.channels_last)
    weight = weight.contiguous(memory_format=torch.channels_last)
    pad = [padding[0], padding[2]]
    if residual is None:
        return torch.cudnn_convolution_relu(x, weight, bias, stride, pad, dilation, groups)
    residual = residual.contiguous(memory_format=torch.channels_last)
    return torch.cudnn_convolution_add_relu(x, weight, residual, 1.0, bias, stride, pad, dilation, groups)


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------


def conv2d_bias_act_reference(x, weight, bias, stride, padding, dilation, groups, residual, relu,
                              shortcut_weight=None, shortcut_stride=(1, 1)):
    """The same computation as plain torch ops: conv, (shortcut conv,) add, ReLU, each its own kernel."""
    return reference_plan(weight, bias, stride, padding, dilation, groups, relu, shortcut_weight,
                          shortcut_stride)(x, residual)


def reference_plan(weight, bias, stride, padding, dilation, groups, relu, shortcut_weight=None,
                   shortcut_stride=(1, 1)):
    """conv2d_bias_act_reference with everything but x and residual bound: run(x, residual) -> y."""
    top, bottom, left, right = padding
    symmetric = top == bottom and left == right
    stride, dilation, shortcut_stride = tuple(stride), tuple(dilation), tuple(shortcut_stride)

    def run(x, residual=None):
        if shortcut_weight is not None:
            residual = F.conv2d(residual, shortcut_weight, None, shortcut_stride)
        if symmetric:
            y = F.conv2d(x, weight, bias, stride, (top, left), dilation, groups)
        else:
            y = F.conv2d(F.pad(x, (left, right, top, bottom)), weight, bias, stride, 0, dilation, groups)
        # In place: y is a fresh tensor, and on a CPU the extra allocations cost more than the adds.
        if residual is not None:
            y.add_(residual)
        if relu:
            y.relu_()
        return y.contiguous(memory_format=torch.channels_last)

    return run
