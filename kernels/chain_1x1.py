"""1x1 convs back to back as one Triton kernel: a Bottleneck's last conv (with its shortcut add
and ReLU) and the next block's first conv (with its ReLU); optionally led by the block's 3x3 conv.

    y = relu(conv1x1(x, w) + b + residual)          the block's output, written once
    z = relu(conv1x1(y, w_next) + b_next)           the next block's first conv, from y in registers

The shortcut is the residual tensor itself or, as in conv2d_bias_act, a projection: a strided
1x1 conv of the block's input that continues y's reduction in the same kernel.

Unchained, the next block's first conv reads y back from memory, the largest tensor of its block
(256 channels at 56x56 in ResNet-50). Here each program owns BLOCK_M rows (output pixels) and all
of y's channels, in chunks of BLOCK_N: for each chunk it computes y's tile, adds bias and
residual, applies the ReLU, stores it, and multiplies the same tile, rounded to the output dtype
as the next conv would read it, straight into z's accumulator. It is the structure of attention
kernels (Q K^T, an elementwise step, times V): x's tile plays Q and stays put, w's and w_next's
chunks stream past. The sums are the same as the two convs' apart; y never returns from memory.

With a head (conv_chain_1x1), x itself is made in the kernel: x = relu(conv(h_in, w_head) +
b_head), the block's 3x3 conv, whose only reader is the 1x1 conv after it. The program computes
x's tile for its rows and all of x's channels with igemm's main loop (conv_tile), rounds it to
the dtype as a stored x would be, and goes on as above: x never goes to memory. Without a next
conv (NEXT off) the kernel ends at y.

It takes what fits one program: x's channels and z's each at most MAX_CHANNELS (x's tile and
z's accumulator are held across the loop; `chain_fits()`; a projection's input is held up to
MAX_CHANNELS and streamed past it),
and a config within the register budget (configs.chain_candidates; wide fp32 chains have
none); on a GPU, enough rows for its programs to fill half the SMs (_too_few_programs). Elsewhere
the op runs the convs one after the other. ResNet-50's chained blocks have 64-256 of each.

Order of this file: @triton.jit kernel, launcher, op registration, reference.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op

from . import backend, configs, igemm
from ._checks import check_same_device, check_supported_dtype, pair
from .igemm import conv_tile, dot, epilogue, residual_tile

# The most channels of x (y's reduction) and of z (its accumulator's width) one program holds; a
# projection shortcut's input (y's second stretch) is held up to as many, and streamed past them.
MAX_CHANNELS = 256

# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _chain_1x1_kernel(
    x_ptr,  # HEAD: the head conv's input (N, Ch, H, W), dense NHWC; else x (M, C), dense NHWC rows
    hw_ptr,  # HEAD: the head conv's weight (C, Ch, R, S), dense channels_last ((C, R, S, Ch) in memory); else None
    hb_ptr,  # HEAD: the head conv's bias (C,), or None
    w_ptr,  # (K, C), row stride stride_wk: the first 1x1 conv's weight
    b_ptr,  # (K,), or None (with a shortcut: both convs' biases summed)
    r_ptr,  # SHORTCUT: its input (N, C_sc, H_sc, W_sc), dense NHWC; else the residual (M, K), dense NHWC rows
    shortcut_w_ptr,  # SHORTCUT: the shortcut's weight (K, C_sc), row stride stride_swk; else None
    y_ptr,  # (M, K): y, dense NHWC rows, written once
    v_ptr,  # NEXT: (J, K), row stride stride_vj: the next 1x1 conv's weight; else None
    c_ptr,  # NEXT: (J,), or None
    z_ptr,  # NEXT: (M, J): z, dense NHWC rows; else None
    M, C, K, J,
    P, Q, C_sc, H_sc, W_sc,  # the output map; SHORTCUT: the shortcut input's channels and map
    Ch, H, W,  # HEAD: the head conv's input channels and map
    head_stride_h, head_stride_w, pad_h, pad_w, dil_h, dil_w,
    shortcut_stride_h, shortcut_stride_w,
    stride_wk, stride_vj, stride_swk,
    HEAD: tl.constexpr,  # x is computed here: relu(conv(head input, head weight) + head bias), rounded as stored
    R: tl.constexpr,  # HEAD: the head conv's filter size
    S: tl.constexpr,
    CH_DIVISOR: tl.constexpr,  # HEAD: a power of two dividing Ch: where BLOCK_K divides it, no channel mask
    NEXT: tl.constexpr,  # z is computed (else the chain ends at y)
    SHORTCUT: tl.constexpr,  # y adds a projection shortcut, a 1x1 conv of r, computed here, not a residual
    STREAM_S: tl.constexpr,  # SHORTCUT: its input is read again, BLOCK_S channels at a time, for each chunk of y
    DOT_FP32: tl.constexpr,  # upcast operands before tl.dot (the interpreter's bf16 dot is wrong)
    INPUT_PRECISION: tl.constexpr,  # "tf32" or "ieee" for fp32 operands
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # y's channels a chunk
    BLOCK_K: tl.constexpr,  # HEAD: the head conv's channels a step of its main loop
    BLOCK_C: tl.constexpr,  # C rounded up to a power of two: the whole reduction of y at once
    BLOCK_S: tl.constexpr,  # SHORTCUT: C_sc rounded up to a power of two (STREAM_S: the channels a step)
    BLOCK_J: tl.constexpr,  # J rounded up to a power of two: z's accumulator holds every channel
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows = offs_m.to(tl.int64)  # 64-bit: y alone may pass 2**31 elements
    offs_c = tl.arange(0, BLOCK_C)
    offs_j = tl.arange(0, BLOCK_J)
    mask_c = offs_c < C
    mask_j = offs_j < J
    if HEAD or SHORTCUT:
        # Each row's output pixel; rows past M wrap onto valid ones (the head's loads mask taps, not rows).
        wrapped = offs_m % M
        n = (wrapped // (P * Q)).to(tl.int64)
        p = (wrapped // Q) % P
        q = wrapped % Q
    if HEAD:
        # x's tile computed, not loaded: the head conv (the Bottleneck's 3x3) for these rows and all
        # of its C output channels, by igemm's main loop, then its bias and ReLU, rounded to the
        # dtype as the unchained conv would store it. It never goes to memory.
        acc_x = conv_tile(tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32), x_ptr, hw_ptr, n * (H * W * Ch),
                          p * head_stride_h - pad_h, q * head_stride_w - pad_w, offs_c.to(tl.int64) * (R * S * Ch),
                          mask_c, None, None, Ch, (H, W), (dil_h, dil_w), (1, W * Ch, Ch), (1, S * Ch, Ch),
                          R, S, True, False, 1, CH_DIVISOR % BLOCK_K == 0, False, 1, True, DOT_FP32,
                          INPUT_PRECISION, BLOCK_K)
        acc_x = epilogue(acc_x, hb_ptr, offs_c, mask_c, None, True)
        x = acc_x.to(y_ptr.dtype.element_ty)
    else:
        # x's tile, loaded once: every chunk of y reduces over all of it.
        x = tl.load(x_ptr + rows[:, None] * C + offs_c[None, :], mask=mask_m[:, None] & mask_c[None, :], other=0.0)
    if SHORTCUT:
        # The shortcut's input under each output pixel (strided), loaded once as well: y's
        # reduction continues over it, as conv2d_bias_act's merged shortcut does. Past MAX_CHANNELS
        # (STREAM_S) it is not held but read again for each chunk of y, from L2 after the first.
        s_rows = ((n * H_sc + p * shortcut_stride_h) * W_sc + q * shortcut_stride_w) * C_sc
        if not STREAM_S:
            offs_s = tl.arange(0, BLOCK_S)
            mask_s = offs_s < C_sc
            xs = tl.load(r_ptr + s_rows[:, None] + offs_s[None, :], mask=mask_m[:, None] & mask_s[None, :],
                         other=0.0)
    if NEXT:
        acc_z = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_N):
        cols = k0 + tl.arange(0, BLOCK_N)
        mask_n = cols < K
        w = tl.load(w_ptr + cols[None, :] * stride_wk + offs_c[:, None], mask=mask_c[:, None] & mask_n[None, :],
                    other=0.0)  # (BLOCK_C, BLOCK_N)
        acc = dot(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), x, w, DOT_FP32, INPUT_PRECISION)
        if SHORTCUT and STREAM_S:
            for s0 in range(0, C_sc, BLOCK_S):
                offs_s = s0 + tl.arange(0, BLOCK_S)
                mask_s = offs_s < C_sc
                xs = tl.load(r_ptr + s_rows[:, None] + offs_s[None, :], mask=mask_m[:, None] & mask_s[None, :],
                             other=0.0)
                ws = tl.load(shortcut_w_ptr + cols[None, :] * stride_swk + offs_s[:, None],
                             mask=mask_s[:, None] & mask_n[None, :], other=0.0)  # (BLOCK_S, BLOCK_N)
                acc = dot(acc, xs, ws, DOT_FP32, INPUT_PRECISION)
        elif SHORTCUT:
            ws = tl.load(shortcut_w_ptr + cols[None, :] * stride_swk + offs_s[:, None],
                         mask=mask_s[:, None] & mask_n[None, :], other=0.0)  # (BLOCK_S, BLOCK_N)
            acc = dot(acc, xs, ws, DOT_FP32, INPUT_PRECISION)
        mask_y = mask_m[:, None] & mask_n[None, :]
        if SHORTCUT:
            res = None
        else:
            res = residual_tile(r_ptr, rows * K, 1, cols, mask_y)
        acc = epilogue(acc, b_ptr, cols, mask_n, res, True)
        # Rounded as stored: the next conv reads exactly what the unchained one would read back.
        # (Columns past K are 0 after the epilogue, and their weights are masked to 0 below.)
        y = acc.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + rows[:, None] * K + cols[None, :], y, mask=mask_y)
        if NEXT:
            v = tl.load(v_ptr + offs_j[None, :] * stride_vj + cols[:, None], mask=mask_n[:, None] & mask_j[None, :],
                        other=0.0)  # (BLOCK_N, BLOCK_J)
            acc_z = dot(acc_z, y, v, DOT_FP32, INPUT_PRECISION)
    if NEXT:
        mask_z = mask_m[:, None] & mask_j[None, :]
        acc_z = epilogue(acc_z, c_ptr, offs_j, mask_j, None, True)
        tl.store(z_ptr + rows[:, None] * J + offs_j[None, :], acc_z.to(z_ptr.dtype.element_ty), mask=mask_z)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


def chain_fits(channels: int, next_channels: int, shortcut_channels: int = 0) -> bool:
    """Whether a chain over x of `channels` into a z of `next_channels` fits one program (a
    projection shortcut's input of any `shortcut_channels` does: past MAX_CHANNELS it is streamed)."""
    return max(channels, next_channels) <= MAX_CHANNELS


def _as_matrix(weight):
    """A 1x1 conv weight (K, C, 1, 1) as its (K, C) matrix with unit column stride (a copy if needed)."""
    matrix = weight.reshape(weight.shape[0], weight.shape[1])
    return matrix if matrix.stride(1) == 1 else matrix.contiguous()


def _check_args(x, weight, bias, residual, next_weight, next_bias, shortcut_weight, shortcut_stride, head,
                op="chain_1x1"):
    """(y's shape, z's shape or None), after the head conv's checks (conv2d_bias_act's), the first 1x1
    conv's (its residual or shortcut included) and the next one's."""
    named = {"input": x, "weight": weight, "bias": bias, "residual": residual, "next_weight": next_weight,
             "next_bias": next_bias, "shortcut_weight": shortcut_weight}
    if head is not None:
        named.update(head_weight=head.weight, head_bias=head.bias)
    for name, t in named.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if residual is None:
        raise ValueError(f"{op}: the 1x1 conv takes a residual (or, with shortcut_weight, the shortcut's input)")
    check_supported_dtype(op, named)
    check_same_device(op, named)
    if head is not None:
        h_shape = igemm.check_conv_args(x, head.weight, head.bias, head.stride, head.padding, head.dilation, 1, None,
                                        None, (1, 1), op=op)
        # The 1x1 conv's input is the head's output, which is never made: a stand-in of its shape.
        x = torch.empty(1, dtype=x.dtype, device=x.device).as_strided(h_shape, (0, 0, 0, 0))
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (1, 1):
        raise ValueError(f"{op}: weight must be a 1x1 conv weight (K, C, 1, 1), got {tuple(weight.shape)}")
    y_shape = igemm.check_conv_args(x, weight, bias, (1, 1), (0, 0, 0, 0), (1, 1), 1, residual, shortcut_weight,
                                    shortcut_stride, op=op)
    if next_weight is None:
        if next_bias is not None:
            raise ValueError(f"{op}: next_bias without next_weight")
        return y_shape, None
    k = weight.shape[0]
    if next_weight.dim() != 4 or tuple(next_weight.shape[1:]) != (k, 1, 1):
        raise ValueError(f"{op}: next_weight must be a 1x1 conv weight (out_channels, {k}, 1, 1), "
                         f"got {tuple(next_weight.shape)}")
    if next_bias is not None and tuple(next_bias.shape) != (next_weight.shape[0],):
        raise ValueError(f"{op}: next_bias must have shape ({next_weight.shape[0]},), got {tuple(next_bias.shape)}")
    return y_shape, (y_shape[0], next_weight.shape[0], *y_shape[2:])


class Head(NamedTuple):
    """The conv that makes a chain's x (a Bottleneck's 3x3), with its bias and ReLU: one group, its
    stride, padding (top, bottom, left, right) and dilation as pairs."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: tuple
    padding: tuple
    dilation: tuple


def plan_chain_1x1(x, weight, bias, residual, next_weight, next_bias=None, *, shortcut_weight=None,
                   shortcut_stride=1, backend_name=None, traceable=False):
    """Check the arguments once and return run(x, residual) -> (y, z) for operands laid out as
    these (under the backend in force, or `backend_name`). The plan holds the weights and biases."""
    return _plan(x, None, weight, bias, residual, next_weight, next_bias, pair("shortcut_stride", shortcut_stride),
                 shortcut_weight, backend_name, traceable)


def plan_conv_chain_1x1(x, head_weight, head_bias, weight, bias, residual, next_weight=None, next_bias=None, *,
                        stride=1, padding=0, dilation=1, shortcut_weight=None, shortcut_stride=1, backend_name=None,
                        traceable=False):
    """plan_chain_1x1 with a head: x is the head conv's input. run(x, residual) -> (y, z), z None
    without a next conv."""
    stride, padding, dilation, shortcut_stride = igemm.normalize_args(x, head_weight, stride, padding, dilation, 1,
                                                                      shortcut_stride, op="conv_chain_1x1")
    head = Head(head_weight, head_bias, stride, padding, dilation)
    return _plan(x, head, weight, bias, residual, next_weight, next_bias, shortcut_stride, shortcut_weight,
                 backend_name, traceable)


def _plan(x, head, weight, bias, residual, next_weight, next_bias, shortcut_stride, shortcut_weight, backend_name,
          traceable):
    op = "chain_1x1" if head is None else "conv_chain_1x1"
    y_shape, z_shape = _check_args(x, weight, bias, residual, next_weight, next_bias, shortcut_weight,
                                   shortcut_stride, head, op)
    path = backend.choose(x, backend_name, cudnn=True)
    c, k = weight.shape[1], weight.shape[0]
    j = 0 if next_weight is None else next_weight.shape[0]
    cs = 0 if shortcut_weight is None else shortcut_weight.shape[1]
    ch = 0 if head is None else x.shape[1]
    block_c, block_j = (max(16, triton.next_power_of_2(v)) for v in (c, j))
    interpret = not backend.on_gpu(x)
    stream_s = cs > MAX_CHANNELS
    # The shortcut input's tile: all of it, or (streamed) a step of the channels its loop takes.
    block_s = (configs.chain_block_k(cs, x.element_size(), interpret) if stream_s
               else max(16, triton.next_power_of_2(cs))) if cs else 0
    candidates = configs.chain_candidates(block_c, k, block_j if j else 0, x.element_size(),
                                          igemm.launch_shared_memory(x), ieee=igemm.ieee_fp32(x.dtype),
                                          block_s=block_s, head_channels=ch)
    n, _, p, q = y_shape
    m = n * p * q
    m_hint = backend.hint(m)  # (a dynamic batch: decided for the traced size; the kernel takes m itself)
    if (path != "triton" or not chain_fits(c, j, cs) or not candidates
            or _too_few_programs(x, m_hint, candidates)):
        return _apart_plan(x, head, weight, bias, residual, next_weight, next_bias, shortcut_weight,
                           shortcut_stride, backend_name, traceable)
    if m_hint >= 2**31:
        raise ValueError(f"{op}: {m} output rows; at most 2**31 - 1 are supported")
    w2 = _as_matrix(weight)
    v2 = None if next_weight is None else _as_matrix(next_weight)
    ws2 = None if shortcut_weight is None else _as_matrix(shortcut_weight)
    hs, ws = residual.shape[2:] if cs else (1, 1)
    if head is None:  # the head's arguments at values the kernel does not read (HEAD off): a 1x1 conv's
        hh = hw = r = s = 1
        head_stride, padding, dilation = (1, 1), (0, 0, 0, 0), (1, 1)
    else:
        (hh, hw), (r, s) = x.shape[2:], head.weight.shape[2:]
        head_stride, padding, dilation = head.stride, head.padding, head.dilation
        igemm.check_window(op, backend.channels_last_strides(x.shape)[1:], ch, (r, s), dilation)
        # The head's weight as the kernel reads it: (C, R, S, Ch) in memory.
        head_w = head.weight.contiguous(memory_format=torch.channels_last)
    args = dict(
        M=m, C=c, K=k, J=j, P=p, Q=q, C_sc=cs, H_sc=hs, W_sc=ws, Ch=ch, H=hh, W=hw,
        head_stride_h=head_stride[0], head_stride_w=head_stride[1], pad_h=padding[0], pad_w=padding[2],
        dil_h=dilation[0], dil_w=dilation[1],
        shortcut_stride_h=shortcut_stride[0], shortcut_stride_w=shortcut_stride[1],
        stride_wk=w2.stride(0), stride_vj=0 if v2 is None else v2.stride(0),
        stride_swk=0 if ws2 is None else ws2.stride(0),
        HEAD=head is not None, R=r, S=s, CH_DIVISOR=igemm.channel_divisor(ch) if ch else 1,
        NEXT=next_weight is not None,
        SHORTCUT=bool(cs), STREAM_S=stream_s,
        DOT_FP32=interpret,
        INPUT_PRECISION="tf32" if x.dtype == torch.float32 and not interpret and backend.tf32_allowed() else "ieee",
        BLOCK_C=block_c, BLOCK_S=max(block_s, 16), BLOCK_J=block_j,
    )

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]),)

    if interpret:
        config = configs.interpreted({"BLOCK_M": min(64, max(16, triton.next_power_of_2(m))),
                                      "BLOCK_N": min(64, max(16, triton.next_power_of_2(k))),
                                      "BLOCK_K": configs.chain_block_k(ch, x.element_size(), interpreter=True)})
        launch = backend.KernelLaunch(_chain_1x1_kernel, grid, args, on_cuda=False, traceable=traceable,
                                      config=config)
    else:
        sizes = {name: backend.hint(v) for name, v in args.items()
                 if not name.startswith("stride_") and name != "DOT_FP32"}
        launch = backend.KernelLaunch(
            _chain_1x1_kernel, grid, args, on_cuda=x.is_cuda, traceable=traceable, op=op,
            key=configs.shape_key(bias=bias is not None, next_bias=next_bias is not None,
                                  head_bias=head is not None and head.bias is not None, **sizes),
            candidates=candidates)
    # The kernel reads its operands as dense NHWC rows: others are copied so at each call.
    dense = backend.channels_last_strides
    head_operands = (None, None) if head is None else (head_w, head.bias)

    def run(x, residual):
        if x.stride() != dense(x.shape):
            x = x.contiguous(memory_format=torch.channels_last)
        if residual.stride() != dense(residual.shape):
            residual = residual.contiguous(memory_format=torch.channels_last)
        y = backend.empty(y_shape, dense(y_shape), x.dtype, x.device)
        z = None if z_shape is None else backend.empty(z_shape, dense(z_shape), x.dtype, x.device)
        if m > 0:
            launch(x, *head_operands, w2, bias, residual, ws2, y, v2, next_bias, z)
        return y, z

    if interpret:
        return run
    # Whether one kernel beats the convs apart is the GPU's to say, layer by layer: one program
    # holds all of y's channels (and with a head, the 3x3's tile is as wide as its output). Plan 0:
    # one kernel; 1: the first conv apart, the rest as a chain of its own (which chooses in turn);
    # 2, with a head and a next conv: the head's kernel ending at y (which chooses in turn), then
    # the next conv apart (z's accumulator no longer takes registers from the head's tile).
    plans = [run, _apart_plan(x, head, weight, bias, residual, next_weight, next_bias, shortcut_weight,
                              shortcut_stride, backend_name, traceable)]
    if head is not None and next_weight is not None:
        to_y = _plan(x, head, weight, bias, residual, None, None, shortcut_stride, shortcut_weight, backend_name,
                     traceable)
        plans.append(_then_next(lambda x, residual: to_y(x, residual)[0], next_weight, next_bias, backend_name,
                                traceable))
    return backend.PlanChoice(f"{op}:plan", launch.key, plans)


def _too_few_programs(x, m, candidates):
    """On a GPU, whether a chain over m rows would keep fewer than half the SMs busy even at its
    candidates' smallest tiles: a chain program owns all of y's channels, so a small batch (a 14x14
    map at batch 1: 196 rows) makes a handful, where the two convs apart tile y's channels too.
    (Not under the interpreter, where there are no SMs to fill and the tests' maps are small.)"""
    if not backend.on_gpu(x):
        return False
    return 2 * triton.cdiv(m, min(config["BLOCK_M"] for config in candidates)) < igemm.launch_multiprocessors(x)


def _apart_plan(x, head, weight, bias, residual, next_weight, next_bias, shortcut_weight, shortcut_stride,
                backend_name, traceable):
    """The chain as conv2d_bias_act plans, one after the other (cuDNN, the reference, or a chain
    that does not fit one program): run(x, residual) -> (y, z). With a head, the head conv runs
    first and the rest is planned as a chain of its own (which may fit where the whole did not)."""
    from . import conv2d
    from .conv2d import plan_conv2d_bias_act

    later = {}  # planned at the first call, for the tensors it makes

    if head is not None:
        first = conv2d._plan(x, head.weight, head.bias, list(head.stride), list(head.padding), list(head.dilation), 1,
                             None, True, None, [1, 1], backend_name or backend.current_backend(), traceable=traceable)

        def run_head_apart(x, residual):
            h = first(x)
            if "plan" not in later:
                if next_weight is None:
                    last = plan_conv2d_bias_act(h, weight, bias, residual=residual, relu=True,
                                                shortcut_weight=shortcut_weight, shortcut_stride=shortcut_stride,
                                                backend_name=backend_name, traceable=traceable)
                    later["plan"] = lambda h, residual: (last(h, residual), None)
                else:
                    later["plan"] = _plan(h, None, weight, bias, residual, next_weight, next_bias, shortcut_stride,
                                          shortcut_weight, backend_name, traceable)
            return later["plan"](h, residual)

        return run_head_apart

    first = plan_conv2d_bias_act(x, weight, bias, residual=residual, relu=True, shortcut_weight=shortcut_weight,
                                 shortcut_stride=shortcut_stride, backend_name=backend_name, traceable=traceable)
    return _then_next(first, next_weight, next_bias, backend_name, traceable)


def _then_next(to_y, next_weight, next_bias, backend_name, traceable):
    """run(x, residual) -> (y, z): y = to_y(x, residual), then the next conv of y as a conv2d_bias_act
    plan of its own (planned at the first call, for the y it makes)."""
    from .conv2d import plan_conv2d_bias_act

    later = {}

    def run_then_next(x, residual):
        y = to_y(x, residual)
        if "plan" not in later:
            later["plan"] = plan_conv2d_bias_act(y, next_weight, next_bias, relu=True, backend_name=backend_name,
                                                 traceable=traceable)
        return y, later["plan"](y, None)

    return run_then_next


# ----------------------------------------------------------------------------------------------
# Op registration
# ----------------------------------------------------------------------------------------------


@triton_op("fused_resnet::chain_1x1", mutates_args=())
def _chain_1x1_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
                  next_weight: torch.Tensor, next_bias: torch.Tensor | None, shortcut_weight: torch.Tensor | None,
                  shortcut_stride: list[int], backend_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    return plan_chain_1x1(x, weight, bias, residual, next_weight, next_bias, shortcut_weight=shortcut_weight,
                          shortcut_stride=shortcut_stride, backend_name=backend_name, traceable=True)(x, residual)


@triton_op("fused_resnet::conv_chain_1x1", mutates_args=())
def _conv_chain_1x1_op(x: torch.Tensor, head_weight: torch.Tensor, head_bias: torch.Tensor | None,
                       stride: list[int], padding: list[int], dilation: list[int], weight: torch.Tensor,
                       bias: torch.Tensor | None, residual: torch.Tensor, next_weight: torch.Tensor | None,
                       next_bias: torch.Tensor | None, shortcut_weight: torch.Tensor | None,
                       shortcut_stride: list[int], backend_name: str) -> list[torch.Tensor]:
    head = Head(head_weight, head_bias, tuple(stride), tuple(padding), tuple(dilation))
    y, z = _plan(x, head, weight, bias, residual, next_weight, next_bias, tuple(shortcut_stride), shortcut_weight,
                 backend_name, True)(x, residual)
    return [y] if z is None else [y, z]


def chain_1x1(input, weight, bias, residual, next_weight, next_bias=None, *, shortcut_weight=None, shortcut_stride=1):
    """(y, z) with y = relu(conv2d(input, weight, bias) + residual) and z = relu(conv2d(y, next_weight,
    next_bias)), both 1x1 convs of stride 1, in one kernel that never reads y back from memory.

    input (N, C, H, W), weight (K, C, 1, 1), residual (N, K, H, W), next_weight (J, K, 1, 1); any
    memory format; y and z come channels_last. With `shortcut_weight` (K, C_sc, 1, 1), the residual
    is a projection shortcut's input (N, C_sc, H_sc, W_sc) and what y adds is conv2d(residual,
    shortcut_weight, stride=shortcut_stride), computed in the same kernel, as conv2d_bias_act does
    (fold its bias into `bias`). Where the chain does not fit one program (chain_fits(),
    configs.chain_candidates), and on the cuDNN and reference backends, the two convs run one
    after the other (the same result).
    """
    input, weight, bias, residual, next_weight, next_bias, shortcut_weight = backend.autocast_operands(
        input, weight, bias, residual, next_weight, next_bias, shortcut_weight)
    return torch.ops.fused_resnet.chain_1x1(input, weight, bias, residual, next_weight, next_bias, shortcut_weight,
                                            list(pair("shortcut_stride", shortcut_stride)), backend.current_backend())


def conv_chain_1x1(input, head_weight, head_bias, weight, bias, residual, next_weight=None, next_bias=None, *,
                   stride=1, padding=0, dilation=1, shortcut_weight=None, shortcut_stride=1):
    """chain_1x1 whose x is made in the same kernel by a head conv: h = relu(conv2d(input,
    head_weight, head_bias, stride, padding, dilation)) (one group; a Bottleneck's 3x3), then y =
    relu(conv2d(h, weight, bias) + residual) and, with next_weight, z = relu(conv2d(y, next_weight,
    next_bias)). h never goes to memory: each program computes its rows of h for all of h's
    channels, rounded to the dtype as a stored h would be. Returns y, or (y, z) with next_weight.
    padding as F.conv2d takes it (an int, a pair, or "same"/"valid"); the rest as chain_1x1. Where
    it does not fit one program, the head runs as a conv of its own and the rest as chain_1x1.
    """
    stride, padding, dilation, shortcut_stride = igemm.normalize_args(input, head_weight, stride, padding, dilation, 1,
                                                                      shortcut_stride, op="conv_chain_1x1")
    input, head_weight, head_bias, weight, bias, residual, next_weight, next_bias, shortcut_weight = (
        backend.autocast_operands(input, head_weight, head_bias, weight, bias, residual, next_weight, next_bias,
                                  shortcut_weight))
    out = torch.ops.fused_resnet.conv_chain_1x1(input, head_weight, head_bias, list(stride), list(padding),
                                                list(dilation), weight, bias, residual, next_weight, next_bias,
                                                shortcut_weight, list(shortcut_stride), backend.current_backend())
    return out[0] if next_weight is None else (out[0], out[1])


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------


def chain_1x1_reference(x, weight, bias, residual, next_weight, next_bias=None, shortcut_weight=None,
                        shortcut_stride=1):
    """The same as plain torch ops: conv, (shortcut conv,) add, ReLU, then conv, ReLU."""
    if shortcut_weight is not None:
        residual = F.conv2d(residual, shortcut_weight, None, shortcut_stride)
    y = F.conv2d(x, weight, bias).add_(residual).relu_()
    return y, F.conv2d(y, next_weight, next_bias).relu_()


def conv_chain_1x1_reference(x, head_weight, head_bias, weight, bias, residual, next_weight=None, next_bias=None,
                             stride=1, padding=0, dilation=1, shortcut_weight=None, shortcut_stride=1):
    """The same as plain torch ops: the head conv and its ReLU, then chain_1x1_reference (or, without
    a next conv, its y alone)."""
    h = F.conv2d(x, head_weight, head_bias, stride, padding, dilation).relu_()
    if next_weight is None:
        if shortcut_weight is not None:
            residual = F.conv2d(residual, shortcut_weight, None, shortcut_stride)
        return F.conv2d(h, weight, bias).add_(residual).relu_()
    return chain_1x1_reference(h, weight, bias, residual, next_weight, next_bias, shortcut_weight, shortcut_stride)
