"""Two 1x1 convs back to back as one Triton kernel: a Bottleneck's last conv (with its shortcut
add and ReLU) and the next block's first conv (with its ReLU).

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

It takes what fits one program: x's channels, z's and a projection's input's each at most
MAX_CHANNELS (the input tiles and z's accumulator are held across the loop; `chain_fits()`),
and a config within the register budget (configs.chain_candidates; wide fp32 chains have
none); on a GPU, enough rows for its programs to fill half the SMs (_too_few_programs). Elsewhere
the op runs the two convs one after the other. ResNet-50's chained blocks have 64-256 of each.

Order of this file: @triton.jit kernel, launcher, op registration, reference.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op

from . import backend, configs, igemm
from ._checks import check_same_device, check_supported_dtype, pair
from .igemm import dot, epilogue

# The most channels of x (y's reduction), of a projection shortcut's input (its second stretch) and
# of z (its accumulator's width) one program holds.
MAX_CHANNELS = 256

# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _chain_1x1_kernel(
    x_ptr,  # (M, C): dense NHWC rows, one an output pixel
    w_ptr,  # (K, C), row stride stride_wk: the first conv's weight
    b_ptr,  # (K,), or None (with a shortcut: both convs' biases summed)
    r_ptr,  # SHORTCUT: the shortcut's input (N, Cs, Hs, Ws), dense NHWC; else the residual (M, K), dense NHWC rows
    ws_ptr,  # SHORTCUT: the shortcut's weight (K, Cs), row stride stride_sk; else None
    y_ptr,  # (M, K): y, dense NHWC rows, written once
    v_ptr,  # (J, K), row stride stride_vj: the second conv's weight
    c_ptr,  # (J,), or None
    z_ptr,  # (M, J): z, dense NHWC rows
    M, C, K, J,
    P, Q, Cs, Hs, Ws,  # SHORTCUT: the output map, the shortcut input's channels and map
    shortcut_stride_h, shortcut_stride_w,
    stride_wk, stride_vj, stride_sk,
    SHORTCUT: tl.constexpr,  # y adds a projection shortcut, a 1x1 conv of r, computed here, not a residual
    DOT_FP32: tl.constexpr,  # upcast operands before tl.dot (the interpreter's bf16 dot is wrong)
    INPUT_PRECISION: tl.constexpr,  # "tf32" or "ieee" for fp32 operands
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # y's channels a chunk
    BLOCK_C: tl.constexpr,  # C rounded up to a power of two: the whole reduction of y at once
    BLOCK_S: tl.constexpr,  # SHORTCUT: Cs rounded up to a power of two
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
    # x's tile, loaded once: every chunk of y reduces over all of it.
    x = tl.load(x_ptr + rows[:, None] * C + offs_c[None, :], mask=mask_m[:, None] & mask_c[None, :], other=0.0)
    if SHORTCUT:
        # The shortcut's input under each output pixel (strided), loaded once as well: y's
        # reduction continues over it, as conv2d_bias_act's merged shortcut does.
        n = rows // (P * Q)
        p = (offs_m // Q) % P
        q = offs_m % Q
        offs_s = tl.arange(0, BLOCK_S)
        mask_s = offs_s < Cs
        s_rows = ((n * Hs + p * shortcut_stride_h) * Ws + q * shortcut_stride_w) * Cs
        xs = tl.load(r_ptr + s_rows[:, None] + offs_s[None, :], mask=mask_m[:, None] & mask_s[None, :], other=0.0)
    acc_z = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_N):
        cols = k0 + tl.arange(0, BLOCK_N)
        mask_n = cols < K
        w = tl.load(w_ptr + cols[None, :] * stride_wk + offs_c[:, None], mask=mask_c[:, None] & mask_n[None, :],
                    other=0.0)  # (BLOCK_C, BLOCK_N)
        acc = dot(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), x, w, DOT_FP32, INPUT_PRECISION)
        if SHORTCUT:
            ws = tl.load(ws_ptr + cols[None, :] * stride_sk + offs_s[:, None], mask=mask_s[:, None] & mask_n[None, :],
                         other=0.0)  # (BLOCK_S, BLOCK_N)
            acc = dot(acc, xs, ws, DOT_FP32, INPUT_PRECISION)
        mask_y = mask_m[:, None] & mask_n[None, :]
        acc = epilogue(acc, b_ptr, r_ptr, rows * K, 1, cols, mask_n, mask_y, not SHORTCUT, True)
        # Rounded as stored: the next conv reads exactly what the unchained one would read back.
        # (Columns past K are 0 after the epilogue, and their weights are masked to 0 below.)
        y = acc.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + rows[:, None] * K + cols[None, :], y, mask=mask_y)
        v = tl.load(v_ptr + offs_j[None, :] * stride_vj + cols[:, None], mask=mask_n[:, None] & mask_j[None, :],
                    other=0.0)  # (BLOCK_N, BLOCK_J)
        acc_z = dot(acc_z, y, v, DOT_FP32, INPUT_PRECISION)
    mask_z = mask_m[:, None] & mask_j[None, :]
    acc_z = epilogue(acc_z, c_ptr, None, rows, 1, offs_j, mask_j, mask_z, False, True)
    tl.store(z_ptr + rows[:, None] * J + offs_j[None, :], acc_z.to(z_ptr.dtype.element_ty), mask=mask_z)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


def chain_fits(channels: int, next_channels: int, shortcut_channels: int = 0) -> bool:
    """Whether a chain over x of `channels` (and a projection shortcut's input of
    `shortcut_channels`) into a z of `next_channels` fits one program."""
    return max(channels, next_channels, shortcut_channels) <= MAX_CHANNELS


def _as_matrix(weight):
    """A 1x1 conv weight (K, C, 1, 1) as its (K, C) matrix with unit column stride (a copy if needed)."""
    matrix = weight.reshape(weight.shape[0], weight.shape[1])
    return matrix if matrix.stride(1) == 1 else matrix.contiguous()


def _check_args(x, weight, bias, residual, next_weight, next_bias, shortcut_weight, shortcut_stride):
    """(y's shape, z's shape), after the first conv's checks (conv2d_bias_act's, residual or shortcut
    included) and the second's."""
    op = "chain_1x1"
    named = {"input": x, "weight": weight, "bias": bias, "residual": residual, "next_weight": next_weight,
             "next_bias": next_bias, "shortcut_weight": shortcut_weight}
    for name, t in named.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if residual is None:
        raise ValueError(f"{op}: the first conv takes a residual (or, with shortcut_weight, the shortcut's input)")
    check_supported_dtype(op, named)
    check_same_device(op, named)
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (1, 1):
        raise ValueError(f"{op}: weight must be a 1x1 conv weight (K, C, 1, 1), got {tuple(weight.shape)}")
    y_shape = igemm.check_conv_args(x, weight, bias, (1, 1), (0, 0, 0, 0), (1, 1), 1, residual, shortcut_weight,
                                    shortcut_stride, op=op)
    k = weight.shape[0]
    if next_weight.dim() != 4 or tuple(next_weight.shape[1:]) != (k, 1, 1):
        raise ValueError(f"{op}: next_weight must be a 1x1 conv weight (out_channels, {k}, 1, 1), "
                         f"got {tuple(next_weight.shape)}")
    if next_bias is not None and tuple(next_bias.shape) != (next_weight.shape[0],):
        raise ValueError(f"{op}: next_bias must have shape ({next_weight.shape[0]},), got {tuple(next_bias.shape)}")
    return y_shape, (y_shape[0], next_weight.shape[0], *y_shape[2:])


def plan_chain_1x1(x, weight, bias, residual, next_weight, next_bias=None, *, shortcut_weight=None,
                   shortcut_stride=1, backend_name=None, traceable=False):
    """Check the arguments once and return run(x, residual) -> (y, z) for operands laid out as
    these (under the backend in force, or `backend_name`). The plan holds the weights and biases."""
    shortcut_stride = pair("shortcut_stride", shortcut_stride)
    y_shape, z_shape = _check_args(x, weight, bias, residual, next_weight, next_bias, shortcut_weight,
                                   shortcut_stride)
    path = backend.choose(x, backend_name, cudnn=True)
    c, k, j = weight.shape[1], weight.shape[0], next_weight.shape[0]
    cs = 0 if shortcut_weight is None else shortcut_weight.shape[1]
    block_c, block_j = (max(16, triton.next_power_of_2(v)) for v in (c, j))
    block_s = max(16, triton.next_power_of_2(cs)) if cs else 0
    candidates = configs.chain_candidates(block_c, k, block_j, x.element_size(), igemm.launch_shared_memory(x),
                                          ieee=igemm.ieee_fp32(x.dtype), block_s=block_s)
    n, _, p, q = y_shape
    m = n * p * q
    if path != "triton" or not chain_fits(c, j, cs) or not candidates or _too_few_programs(x, m, candidates):
        return _apart_plan(x, weight, bias, residual, next_weight, next_bias, shortcut_weight, shortcut_stride,
                           backend_name, traceable)
    if m >= 2**31:
        raise ValueError(f"chain_1x1: {m} output rows; at most 2**31 - 1 are supported")
    interpret = not backend.on_gpu(x)
    w2, v2 = _as_matrix(weight), _as_matrix(next_weight)
    ws2 = None if shortcut_weight is None else _as_matrix(shortcut_weight)
    hs, ws = residual.shape[2:] if cs else (1, 1)
    args = dict(
        M=m, C=c, K=k, J=j, P=p, Q=q, Cs=cs, Hs=hs, Ws=ws,
        shortcut_stride_h=shortcut_stride[0], shortcut_stride_w=shortcut_stride[1],
        stride_wk=w2.stride(0), stride_vj=v2.stride(0), stride_sk=0 if ws2 is None else ws2.stride(0),
        SHORTCUT=bool(cs),
        DOT_FP32=interpret,
        INPUT_PRECISION="tf32" if x.dtype == torch.float32 and not interpret and igemm.tf32_allowed() else "ieee",
        BLOCK_C=block_c, BLOCK_S=max(block_s, 16), BLOCK_J=block_j,
    )

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]),)

    if interpret:
        config = {"BLOCK_M": min(64, max(16, triton.next_power_of_2(m))),
                  "BLOCK_N": min(64, max(16, triton.next_power_of_2(k)))}
        launch = backend.KernelLaunch(_chain_1x1_kernel, grid, args, on_cuda=False, traceable=traceable,
                                      config=config)
    else:
        sizes = {name: v for name, v in args.items() if not name.startswith("stride_") and name != "DOT_FP32"}
        launch = backend.KernelLaunch(
            _chain_1x1_kernel, grid, args, on_cuda=x.is_cuda, traceable=traceable, op="chain_1x1",
            key=configs.shape_key(bias=bias is not None, next_bias=next_bias is not None, **sizes),
            candidates=candidates)
    # The kernel reads its operands as dense NHWC rows: others are copied so at each call.
    dense = backend.channels_last_strides

    def run(x, residual):
        if x.stride() != dense(x.shape):
            x = x.contiguous(memory_format=torch.channels_last)
        if residual.stride() != dense(residual.shape):
            residual = residual.contiguous(memory_format=torch.channels_last)
        y = torch.empty(y_shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
        z = torch.empty(z_shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
        if m > 0:
            launch(x, w2, bias, residual, ws2, y, v2, next_bias, z)
        return y, z

    return run


def _too_few_programs(x, m, candidates):
    """On a GPU, whether a chain over m rows would keep fewer than half the SMs busy even at its
    candidates' smallest tiles: a chain program owns all of y's channels, so a small batch (a 14x14
    map at batch 1: 196 rows) makes a handful, where the two convs apart tile y's channels too.
    (Not under the interpreter, where there are no SMs to fill and the tests' maps are small.)"""
    if not backend.on_gpu(x):
        return False
    return 2 * triton.cdiv(m, min(config["BLOCK_M"] for config in candidates)) < igemm.launch_multiprocessors(x)


def _apart_plan(x, weight, bias, residual, next_weight, next_bias, shortcut_weight, shortcut_stride, backend_name,
                traceable):
    """The chain as two conv2d_bias_act plans, one after the other (cuDNN, the reference, or a chain
    that does not fit one program): run(x, residual) -> (y, z)."""
    from .conv2d import plan_conv2d_bias_act

    first = plan_conv2d_bias_act(x, weight, bias, residual=residual, relu=True, shortcut_weight=shortcut_weight,
                                 shortcut_stride=shortcut_stride, backend_name=backend_name, traceable=traceable)
    second = {}  # planned at the first call, for the y it makes

    def run_apart(x, residual):
        y = first(x, residual)
        if "plan" not in second:
            second["plan"] = plan_conv2d_bias_act(y, next_weight, next_bias, relu=True, backend_name=backend_name,
                                                  traceable=traceable)
        return y, second["plan"](y, None)

    return run_apart


# ----------------------------------------------------------------------------------------------
# Op registration
# ----------------------------------------------------------------------------------------------


@triton_op("fused_resnet::chain_1x1", mutates_args=())
def _chain_1x1_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
                  next_weight: torch.Tensor, next_bias: torch.Tensor | None, shortcut_weight: torch.Tensor | None,
                  shortcut_stride: list[int], backend_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    return plan_chain_1x1(x, weight, bias, residual, next_weight, next_bias, shortcut_weight=shortcut_weight,
                          shortcut_stride=shortcut_stride, backend_name=backend_name, traceable=True)(x, residual)


def chain_1x1(input, weight, bias, residual, next_weight, next_bias=None, *, shortcut_weight=None, shortcut_stride=1):
    """(y, z) with y = relu(conv2d(input, weight, bias) + residual) and z = relu(conv2d(y, next_weight,
    next_bias)), both 1x1 convs of stride 1, in one kernel that never reads y back from memory.

    input (N, C, H, W), weight (K, C, 1, 1), residual (N, K, H, W), next_weight (J, K, 1, 1); any
    memory format; y and z come channels_last. With `shortcut_weight` (K, Cs, 1, 1), the residual
    is a projection shortcut's input (N, Cs, Hs, Ws) and what y adds is conv2d(residual,
    shortcut_weight, stride=shortcut_stride), computed in the same kernel, as conv2d_bias_act does
    (fold its bias into `bias`). Where the chain does not fit one program (chain_fits(),
    configs.chain_candidates), and on the cuDNN and reference backends, the two convs run one
    after the other (the same result).
    """
    return torch.ops.fused_resnet.chain_1x1(input, weight, bias, residual, next_weight, next_bias, shortcut_weight,
                                            list(pair("shortcut_stride", shortcut_stride)), backend.current_backend())


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
