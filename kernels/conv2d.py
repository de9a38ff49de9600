"""conv2d + bias (+ residual) (+ ReLU) as one implicit-GEMM Triton kernel.

The convolution is a GEMM whose rows are output pixels (N*P*Q), whose columns are output channels
(K / groups per group) and whose reduction runs over R*S*(C / groups). Nothing is unfolded in
memory ("implicit" GEMM): each program gathers its tile of the input on the fly from the NHWC
activations. The epilogue adds the bias, adds the residual and applies the ReLU to the fp32
accumulator, then writes the output once.

Order of this file: configs, @triton.jit kernel, launcher, op registration, reference.
"""

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op

from . import backend, configs
from ._checks import check_same_device, check_supported_dtype, pair

# ----------------------------------------------------------------------------------------------
# Configs (chosen per launch by kernels.configs: the shipped table, the disk cache, a few timed)
# ----------------------------------------------------------------------------------------------

# Below this many channels a group, the reduction is flattened over (r, s, c) so that tl.dot gets
# a usable K (the 3-channel 7x7 stem: 147 in one flat reduction instead of 49 reductions of 3).
FLAT_K_BELOW = 16

# The main loop under the interpreter (a config's FLAT_LOOP on a GPU): the tests run both.
INTERPRETER_FLAT_LOOP = 1


@functools.cache
def _max_shared_memory(device_index):
    props = triton.runtime.driver.active.utils.get_device_properties(device_index)
    return props["max_shared_mem"]


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------


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
    columns are output channels of group program_id(1): (mask_m, mask_n, n, p, q, group, channel)."""
    group = tl.program_id(1)
    pid_m, pid_n = tile_ids(M, Kg, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows past M wrap onto valid pixels, so unpadded loads need no row mask; the store masks them.
    rows = offs_m % M
    q = rows % Q
    p = (rows // Q) % P
    n = rows // (P * Q)
    return offs_m < M, offs_n < Kg, n, p, q, group, group * Kg + offs_n


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
    Cg, H, W, dil_h, dil_w,
    stride_xc, stride_xh, stride_xw,
    stride_wc, stride_wr, stride_ws,
    R: tl.constexpr,
    S: tl.constexpr,
    PADDED: tl.constexpr,
    FLAT_K: tl.constexpr,
    C_PAD: tl.constexpr,  # FLAT_K: Cg rounded up to a power of two, so (r, s, c) decodes with shifts
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
    FLAT_LOOP  one loop over (tap, channel block) pairs: every iteration is alike, so the compiler
               software-pipelines the loads of the next taps behind the current dot.
    otherwise  a loop over channel blocks inside an unrolled loop over the R*S taps.
    """
    offs_k = tl.arange(0, BLOCK_K)
    if FLAT_K:
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
            if DOT_FP32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    elif FLAT_LOOP:
        k_blocks = tl.cdiv(Cg, BLOCK_K)
        for i in range(0, R * S * k_blocks):
            rs = i // k_blocks
            c = (i % k_blocks) * BLOCK_K + offs_k
            ih = h0 + (rs // S) * dil_h
            iw = w0 + (rs % S) * dil_w
            mask_c = c < Cg
            a_ptrs = x_ptr + (x_row + ih.to(tl.int64) * stride_xh + iw.to(tl.int64) * stride_xw)[:, None] \
                + (c * stride_xc)[None, :]
            if PADDED:
                inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                a = tl.load(a_ptrs, mask=inside[:, None] & mask_c[None, :], other=0.0)
            else:
                a = tl.load(a_ptrs, mask=mask_c[None, :], other=0.0)
            b_ptrs = w_ptr + (w_col + (rs // S) * stride_wr + (rs % S) * stride_ws)[None, :] \
                + (c * stride_wc)[:, None]
            b = tl.load(b_ptrs, mask=mask_c[:, None] & mask_n[None, :], other=0.0)
            if DOT_FP32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
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
                mask_c = c < Cg
                a_ptrs = x_ptr + a_row[:, None] + (c * stride_xc)[None, :]
                if PADDED:
                    a = tl.load(a_ptrs, mask=inside[:, None] & mask_c[None, :], other=0.0)
                else:
                    a = tl.load(a_ptrs, mask=mask_c[None, :], other=0.0)
                b_ptrs = w_ptr + b_tap[None, :] + (c * stride_wc)[:, None]
                b = tl.load(b_ptrs, mask=mask_c[:, None] & mask_n[None, :], other=0.0)
                if DOT_FP32:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _conv2d_bias_act_kernel(
    x_ptr,  # (N, C, H, W), any strides; channels_last keeps C contiguous
    w_ptr,  # (K, C // groups, R, S), any strides; channels_last is (K, R, S, C) in memory
    b_ptr,  # (K,), read only if HAS_BIAS
    r_ptr,  # (N, K, P, Q) residual, or (N, Cs, Hs, Ws) shortcut input if HAS_SHORTCUT
    ws_ptr,  # (K, Cs, 1, 1) shortcut weight, read only if HAS_SHORTCUT
    y_ptr,  # (N, K, P, Q), written once
    M,  # N * P * Q: GEMM rows
    Kg,  # K // groups: GEMM columns per group
    Cg,  # C // groups: channels reduced per (r, s)
    Cs,  # shortcut input channels: the second segment of the reduction
    H, W, P, Q,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sc_stride_h, sc_stride_w,  # the shortcut conv's stride
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wk, stride_wc, stride_wr, stride_ws,
    stride_rn, stride_rk, stride_rp, stride_rq,
    stride_wsk, stride_wsc,
    stride_yn, stride_yk, stride_yp, stride_yq,
    R: tl.constexpr,
    S: tl.constexpr,
    PADDED: tl.constexpr,  # some taps fall outside the input: mask them
    FLAT_K: tl.constexpr,  # one reduction over (r, s, c) instead of one per (r, s)
    C_PAD: tl.constexpr,  # FLAT_K: the channels rounded up to a power of two
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_SHORTCUT: tl.constexpr,  # the residual passes through a 1x1 conv inside this GEMM
    APPLY_RELU: tl.constexpr,
    DOT_FP32: tl.constexpr,  # upcast operands before tl.dot (the interpreter's bf16 dot is wrong)
    INPUT_PRECISION: tl.constexpr,  # "tf32" or "ieee" for fp32 operands
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    FLAT_LOOP: tl.constexpr,  # config: one pipelined loop over (tap, channel block)
):
    mask_m, mask_n, n, p, q, group, k_glob = output_tile(M, Kg, P, Q, BLOCK_M, BLOCK_N, GROUP_M)
    # 64-bit row offsets: one tensor may pass 2**31 elements even when M does not.
    x_row = n.to(tl.int64) * stride_xn + group.to(tl.int64) * Cg * stride_xc
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = conv_tile(acc, x_ptr, w_ptr, x_row, p * stride_h - pad_h, q * stride_w - pad_w,
                    k_glob.to(tl.int64) * stride_wk, mask_n, Cg, H, W, dil_h, dil_w,
                    stride_xc, stride_xh, stride_xw, stride_wc, stride_wr, stride_ws,
                    R, S, PADDED, FLAT_K, C_PAD, FLAT_LOOP, DOT_FP32, INPUT_PRECISION, BLOCK_K)
    if HAS_SHORTCUT:
        # A projection shortcut relu(W x + Wd x_s + b) is one GEMM over the concatenated reduction
        # [x ; x_s]: its 1x1 strided conv continues the same accumulator, so its output is never
        # written to memory. Its bias is already summed into b_ptr.
        acc = conv_tile(acc, r_ptr, ws_ptr, n.to(tl.int64) * stride_rn, p * sc_stride_h, q * sc_stride_w,
                        k_glob.to(tl.int64) * stride_wsk, mask_n, Cs, 0, 0, 1, 1,
                        stride_rk, stride_rp, stride_rq, stride_wsc, 0, 0,
                        1, 1, False, False, 1, FLAT_LOOP, DOT_FP32, INPUT_PRECISION, BLOCK_K)

    # Epilogue on the fp32 accumulator, then one store in the output dtype.
    mask_y = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        bias = tl.load(b_ptr + k_glob, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        r_row = n.to(tl.int64) * stride_rn + p.to(tl.int64) * stride_rp + q.to(tl.int64) * stride_rq
        res = tl.load(r_ptr + r_row[:, None] + (k_glob.to(tl.int64) * stride_rk)[None, :],
                      mask=mask_y, other=0.0)
        acc += res.to(tl.float32)
    if APPLY_RELU:
        # Not tl.maximum: it may turn NaN into 0, and torch.relu keeps NaN.
        acc = tl.where(acc < 0.0, 0.0, acc)
    y_row = n.to(tl.int64) * stride_yn + p.to(tl.int64) * stride_yp + q.to(tl.int64) * stride_yq
    y_ptrs = y_ptr + y_row[:, None] + (k_glob.to(tl.int64) * stride_yk)[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_y)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


def output_size(h, w, r, s, stride, padding, dilation):
    """(P, Q) of a conv over an (h, w) map; padding is (top, bottom, left, right)."""
    p = (h + padding[0] + padding[1] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    q = (w + padding[2] + padding[3] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    return p, q


def _check_conv_args(x, weight, bias, stride, padding, dilation, groups, residual, shortcut_weight, shortcut_stride,
                     op="conv2d_bias_act"):
    if x.dim() != 4:
        raise ValueError(f"{op}: input must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(
            f"{op}: weight must be 4-D (K, C // groups, R, S), got shape {tuple(weight.shape)}"
        )
    named = {"input": x, "weight": weight, "bias": bias, "residual": residual, "residual_weight": shortcut_weight}
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
        _check_shortcut(residual, shortcut_weight, shortcut_stride, groups, out_shape)
    elif residual is not None and tuple(residual.shape) != out_shape:
        raise ValueError(
            f"{op}: residual must have the output's shape {out_shape}, got {tuple(residual.shape)}"
        )
    return out_shape


def _check_shortcut(residual, weight, stride, groups, out_shape):
    n, k, p, q = out_shape
    if residual is None:
        raise ValueError("conv2d_bias_act: residual_weight needs a residual (the shortcut conv's input)")
    if groups != 1:
        raise ValueError(f"conv2d_bias_act: residual_weight needs groups=1 for the main conv, got groups={groups}")
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (1, 1) or weight.shape[0] != k:
        raise ValueError(
            f"conv2d_bias_act: residual_weight must be a 1x1 conv weight ({k}, C, 1, 1), got {tuple(weight.shape)}"
        )
    if len(stride) != 2 or min(stride) < 1:
        raise ValueError(f"conv2d_bias_act: residual_stride must be 2 values >= 1, got {tuple(stride)}")
    if residual.dim() != 4 or residual.shape[0] != n or residual.shape[1] != weight.shape[1]:
        raise ValueError(
            f"conv2d_bias_act: residual must be ({n}, {weight.shape[1]}, H, W) for residual_weight "
            f"{tuple(weight.shape)}, got {tuple(residual.shape)}"
        )
    projected = output_size(residual.shape[2], residual.shape[3], 1, 1, stride, (0, 0, 0, 0), (1, 1))
    if projected != (p, q):
        raise ValueError(
            f"conv2d_bias_act: the shortcut conv maps the {tuple(residual.shape[2:])} residual to {projected} "
            f"with stride {tuple(stride)}, but the output is {(p, q)}"
        )


def _tf32_allowed():
    return bool(torch.backends.cudnn.allow_tf32)


def conv_launch(name, kernel, x, weight, bias, out_shape, m, stride, padding, dilation, groups, relu, *,
                extra_reduction=0, traceable=False, **extra):
    """A KernelLaunch of a kernel built on conv_tile over M = m output rows into a channels_last
    output of `out_shape`, for inputs laid out as `x`: called as launch(x, weight, bias, *pointers, y).

    Binds the conv's own arguments (sizes, strides, padding, epilogue flags) and the kernel's
    `extra` keyword arguments.
    """
    if m >= 2**31:
        raise ValueError(f"{name}: {m} output rows; at most 2**31 - 1 are supported")
    interpret = backend.interpreting() and not x.is_cuda
    k, cg, r, s = weight.shape
    kg = k // groups
    flat_k = cg < FLAT_K_BELOW
    y_strides = backend.channels_last_strides(out_shape)
    args = dict(
        M=m, Kg=kg, Cg=cg, H=x.shape[2], W=x.shape[3],
        stride_h=stride[0], stride_w=stride[1], pad_h=padding[0], pad_w=padding[2],
        dil_h=dilation[0], dil_w=dilation[1],
        stride_xn=x.stride(0), stride_xc=x.stride(1), stride_xh=x.stride(2), stride_xw=x.stride(3),
        stride_wk=weight.stride(0), stride_wc=weight.stride(1),
        stride_wr=weight.stride(2), stride_ws=weight.stride(3),
        stride_yn=y_strides[0], stride_yk=y_strides[1], stride_yp=y_strides[2], stride_yq=y_strides[3],
        R=r, S=s,
        PADDED=any(v != 0 for v in padding),
        FLAT_K=flat_k,
        C_PAD=triton.next_power_of_2(cg) if flat_k else 1,
        HAS_BIAS=bias is not None,
        APPLY_RELU=relu,
        DOT_FP32=interpret,
        INPUT_PRECISION="tf32" if x.dtype == torch.float32 and x.is_cuda and _tf32_allowed() else "ieee",
        **extra,
    )

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(kg, meta["BLOCK_N"]), groups)

    reduction = max(cg * r * s if flat_k else cg, extra_reduction)
    if interpret:
        config = {**configs.interpreter(m, kg, reduction), "FLAT_LOOP": INTERPRETER_FLAT_LOOP}
        return backend.KernelLaunch(kernel, grid, args, on_cuda=False, traceable=traceable, config=config)
    # The key: every size and flag of the launch (the batch only through M, bucketed), no strides.
    sizes = {k: v for k, v in args.items() if not k.startswith("stride_") and k != "DOT_FP32"}
    smem = _max_shared_memory(x.device.index or 0) if x.is_cuda else 228 * 1024
    return backend.KernelLaunch(kernel, grid, args, on_cuda=x.is_cuda, traceable=traceable, op=name,
                                key=configs.shape_key(groups=groups, **sizes),
                                candidates=configs.candidates(m, kg, reduction, x.element_size(), smem,
                                                              extra={"FLAT_LOOP": 1}))


def gather_layout(x):
    """How the kernel reads x: as it is, or (a CUDA tensor whose channels are strided) copied to
    channels_last once per call, since gathering along a strided channel axis is uncoalesced.
    Returns (to_layout, x as the kernel sees it)."""
    if x.stride(1) != 1 and x.is_cuda:
        def to_layout(t):
            return t.contiguous(memory_format=torch.channels_last)
    else:
        def to_layout(t):
            return t
    return to_layout, to_layout(x)


def _plan(x, weight, bias, stride, padding, dilation, groups, residual, relu, residual_weight, residual_stride,
          backend_name, *, traceable=False):
    """Check the arguments once and return run(x, residual) -> y for operands laid out as these.

    The plan holds weight, bias and residual_weight; x and residual (their shapes, strides, dtype
    and device as given here) come with each call. With `traceable`, kernels launch through
    wrap_triton (inside the registered op)."""
    out_shape = _check_conv_args(x, weight, bias, stride, padding, dilation, groups, residual,
                                 residual_weight, residual_stride)
    path = backend.choose(x, backend_name, cudnn=True)
    if path == "reference":
        return reference_plan(weight, bias, stride, padding, dilation, groups, relu, residual_weight,
                              residual_stride)
    if path == "cudnn":
        def run_cudnn(x, residual=None):
            return _cudnn_fused(x, weight, bias, stride, padding, dilation, groups, residual, relu, residual_weight,
                                residual_stride)
        return run_cudnn
    to_layout, x = gather_layout(x)
    n, _, p, q = out_shape
    shortcut = residual_weight is not None
    cs = residual_weight.shape[1] if shortcut else 0
    r_strides = residual.stride() if residual is not None else (0, 0, 0, 0)
    ws_strides = residual_weight.stride() if shortcut else (0, 0, 0, 0)
    launch = conv_launch(
        "conv2d_bias_act", _conv2d_bias_act_kernel, x, weight, bias, out_shape, n * p * q,
        stride, padding, dilation, groups, relu, extra_reduction=cs, traceable=traceable,
        Cs=cs, P=p, Q=q, sc_stride_h=residual_stride[0], sc_stride_w=residual_stride[1],
        stride_rn=r_strides[0], stride_rk=r_strides[1], stride_rp=r_strides[2], stride_rq=r_strides[3],
        stride_wsk=ws_strides[0], stride_wsc=ws_strides[1],
        HAS_RESIDUAL=residual is not None and not shortcut,
        HAS_SHORTCUT=shortcut,
    )

    def launch_into(y, x, residual=None):
        # Operands the kernel does not read still need a tensor of the right device: y stands in.
        launch(to_layout(x), weight, y if bias is None else bias, y if residual is None else residual,
               residual_weight if shortcut else y, y)

    return backend.output_plan(out_shape, x, launch_into)


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
    residual_weight: torch.Tensor | None,
    residual_stride: list[int],
    backend_name: str,
) -> torch.Tensor:
    plan = _plan(x, weight, bias, stride, padding, dilation, groups, residual, relu, residual_weight, residual_stride,
                 backend_name, traceable=True)
    return plan(x, residual)


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


def conv2d_bias_act(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
                    residual=None, relu=False, residual_weight=None, residual_stride=1):
    """relu(F.conv2d(input, weight, bias, stride, padding, dilation, groups) + residual), one kernel.

    Takes every argument form F.conv2d takes (unbatched 3-D input, int or pair stride/padding/
    dilation, padding 'same' or 'valid', any groups) and any memory format. The add happens only
    if `residual` is given, the ReLU only if `relu`. 4-D input gives a channels_last output.

    With `residual_weight` (K, Cs, 1, 1), the residual is a projection shortcut's input: what is
    added is F.conv2d(residual, residual_weight, stride=residual_stride), computed in the same
    GEMM as the main conv (groups=1), so the shortcut's output never reaches memory. Fold the
    shortcut's bias into `bias`.

    The backend (Triton, reference, cuDNN) follows kernels.backend.
    """
    stride, padding, dilation, residual_stride = normalize_args(input, weight, stride, padding, dilation, groups,
                                                                residual_stride)
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
        residual_weight, list(residual_stride), backend.current_backend(),
    )
    return out.squeeze(0) if unbatched else out


def plan_conv2d_bias_act(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
                         residual=None, relu=False, residual_weight=None, residual_stride=1):
    """conv2d_bias_act planned for 4-D operands laid out as `input` and `residual`: run(x, residual) -> y.

    Every check and everything that follows from the operands' shapes, strides, dtype and device
    and from the backend in force is done here, once; the plan runs the same computation as
    conv2d_bias_act on further tensors of that signature without checking them again (in eager
    mode, outside tracing: the plan launches kernels directly, not through the registered op).
    """
    stride, padding, dilation, residual_stride = normalize_args(input, weight, stride, padding, dilation, groups,
                                                                residual_stride)
    if input.dim() != 4:
        raise ValueError(f"plan_conv2d_bias_act: input must be 4-D (N, C, H, W), got shape {tuple(input.shape)}")
    return _plan(input, weight, bias, list(stride), padding, list(dilation), groups, residual, bool(relu),
                 residual_weight, list(residual_stride), backend.current_backend())


def normalize_args(input, weight, stride, padding, dilation, groups, residual_stride=1, op="conv2d_bias_act"):
    """F.conv2d's argument forms as (stride, padding (top, bottom, left, right), dilation, residual_stride)."""
    if not isinstance(input, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"{op}: input and weight must be tensors")
    if not isinstance(groups, int) or isinstance(groups, bool):
        raise TypeError(f"{op}: groups must be an int, got {groups!r}")
    stride = pair("stride", stride)
    dilation = pair("dilation", dilation)
    residual_stride = pair("residual_stride", residual_stride)
    return stride, normalize_padding(padding, weight.shape, dilation, stride), dilation, residual_stride


def _cudnn_fused(x, weight, bias, stride, padding, dilation, groups, residual, relu,
                 residual_weight=None, residual_stride=(1, 1)):
    if residual_weight is not None:
        residual = F.conv2d(residual, residual_weight, None, residual_stride)
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
                              residual_weight=None, residual_stride=(1, 1)):
    """The same computation as plain torch ops: conv, (shortcut conv,) add, ReLU, each its own kernel."""
    return reference_plan(weight, bias, stride, padding, dilation, groups, relu, residual_weight,
                          residual_stride)(x, residual)


def reference_plan(weight, bias, stride, padding, dilation, groups, relu, residual_weight=None,
                   residual_stride=(1, 1)):
    """conv2d_bias_act_reference with everything but x and residual bound: run(x, residual) -> y."""
    top, bottom, left, right = padding
    symmetric = top == bottom and left == right
    stride, dilation, residual_stride = tuple(stride), tuple(dilation), tuple(residual_stride)

    def run(x, residual=None):
        if residual_weight is not None:
            residual = F.conv2d(residual, residual_weight, None, residual_stride)
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
