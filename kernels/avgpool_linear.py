"""Global average pooling + linear layer as one Triton kernel: a ResNet's head.

Unfused, the pool reads the last feature map (7x7x2048 per image in ResNet-50) and writes the
pooled vector, then the fc reads it back. Here each program owns a tile of images x classes and,
for each block of channels, averages the feature map in fp32, rounds the mean to the input's dtype
(as the unfused pool's output is), and multiplies it into the accumulator with tl.dot. Programs
that share images are ordered to run together, so the repeated reads of a feature map come from L2.

The pooling is a loop of loads and adds with no MMA to hide memory behind: a program waits for its
loads once an iteration. So an iteration reads BLOCK_HW pixels (unrolled), not one; and the tiles
are few images (the fewer, the fewer additions a program) by many classes (the more, the fewer
programs that read each image's maps again): configs.head_candidates. A small batch makes few
such tiles: there the channel blocks may be split among SPLIT_K programs a tile, whose partial
products the last of them sums (igemm.split_sum), as the convs do.

Order of this file: @triton.jit kernel, launcher, op registration, reference.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op

from . import backend, configs, igemm
from ._checks import check_same_device, check_supported_dtype
from .igemm import dot, split_range, split_scratch, split_sum, tile_ids

# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _avgpool_linear_kernel(
    x_ptr,  # (N, C, H, W), any strides; channels_last keeps C contiguous
    w_ptr,  # (J, C)
    b_ptr,  # (J,), or None
    y_ptr,  # (N, J)
    partial_ptr,  # SPLIT_K > 1: fp32 scratch for the partial tiles (igemm.split_sum); else None
    count_ptr,  # SPLIT_K > 1: int32 arrival counts, one a tile, zero (and left zero); else None
    N, C, HW, J,
    stride_xn, stride_xc, stride_xhw,  # stride_xhw: of a pixel, the map's (h, w) as one index h * W + w
    stride_wj, stride_wc,
    stride_yn, stride_yj,
    DOT_FP32: tl.constexpr,  # upcast operands before tl.dot (the interpreter's bf16 dot is wrong)
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_HW: tl.constexpr,  # pixels a round of the pooling reads at once
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,  # config: programs that share a tile, each over a stretch of the channel blocks
):
    pid_m, pid_n = tile_ids(N, J, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < N
    mask_n = offs_n < J
    x_img = offs_m.to(tl.int64) * stride_xn
    w_col = offs_n.to(tl.int64) * stride_wj
    inv_hw = 1.0 / HW

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SPLIT_K == 1:
        first = 0
        last = C
    else:  # this program's stretch of the channel blocks
        first, last, _, _ = split_range(tl.cdiv(C, BLOCK_K), 0, SPLIT_K)
        first *= BLOCK_K
        last *= BLOCK_K
    for c0 in range(first, last, BLOCK_K):
        c = c0 + offs_k
        mask_c = c < C
        mask_a = mask_m[:, None] & mask_c[None, :]
        a_ptrs = x_ptr + x_img[:, None] + (c.to(tl.int64) * stride_xc)[None, :]
        # A round reads BLOCK_HW pixels, unrolled, so that all their loads are in flight before the
        # first is summed; a loop over single pixels would wait for memory once per pixel.
        pooled = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for hw0 in range(0, HW, BLOCK_HW):
            for i in tl.static_range(BLOCK_HW):
                hw = hw0 + i
                pooled += tl.load(a_ptrs + hw * stride_xhw, mask=mask_a & (hw < HW), other=0.0).to(tl.float32)
        # Round the mean to the input dtype, as the unfused pool stores it, and use the dtype's dot.
        a = (pooled * inv_hw).to(x_ptr.dtype.element_ty)
        b = tl.load(w_ptr + w_col[None, :] + (c * stride_wc)[:, None], mask=mask_c[:, None] & mask_n[None, :],
                    other=0.0)
        acc = dot(acc, a, b, DOT_FP32, INPUT_PRECISION)

    if SPLIT_K > 1:
        acc, last_split = split_sum(acc, partial_ptr, count_ptr, SPLIT_K, BLOCK_M, BLOCK_N)
        mask_m = mask_m & last_split  # the other splits write nothing
    if b_ptr is not None:
        bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_yn + offs_n[None, :] * stride_yj
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


def _check_args(x, weight, bias):
    named = {"input": x, "weight": weight, "bias": bias}
    check_supported_dtype("avgpool_linear", named)
    check_same_device("avgpool_linear", named)
    if x.dim() != 4:
        raise ValueError(f"avgpool_linear: input must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"avgpool_linear: weight must be (out_features, {x.shape[1]}) for an input with {x.shape[1]} "
            f"channels, got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"avgpool_linear: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if x.shape[2] * x.shape[3] == 0 and x.shape[0] > 0:
        raise ValueError(f"avgpool_linear: cannot average an empty {tuple(x.shape[2:])} map")


def plan_avgpool_linear(x, weight, bias=None, *, backend_name=None, traceable=False):
    """Check the arguments once and return run(x) -> y for inputs laid out as x (under the backend
    in force, or `backend_name`)."""
    _check_args(x, weight, bias)
    if backend.choose(x, backend_name) == "reference":
        return lambda x: avgpool_linear_reference(x, weight, bias)
    n, c, h, w = x.shape
    j = weight.shape[0]
    # The kernel walks each map as one row of h * w pixels: a map whose rows are not evenly spaced
    # (a strided or transposed view) is copied to channels_last at each call.
    to_layout, strides = _as_pixel_rows(x)
    interpret = not backend.on_gpu(x)
    tf32 = x.dtype == torch.float32 and not interpret and backend.tf32_allowed("matmul")
    args = dict(
        N=n, C=c, HW=h * w, J=j,
        stride_xn=strides[0], stride_xc=strides[1], stride_xhw=strides[2],
        stride_wj=weight.stride(0), stride_wc=weight.stride(1),
        stride_yn=j, stride_yj=1,
        DOT_FP32=interpret,
        INPUT_PRECISION="tf32" if tf32 else "ieee",
    )

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]) * triton.cdiv(j, meta["BLOCK_N"]), 1, meta.get("SPLIT_K", 1))

    sms = igemm.launch_multiprocessors(x)
    # (Dynamic shapes: configs are the traced sizes'; the kernel takes the sizes themselves.)
    images, pixels = backend.hint(n), backend.hint(h * w)
    launch = backend.KernelLaunch(_avgpool_linear_kernel, grid, {**args, "SPLIT_K": 1}, on_cuda=x.is_cuda,
                                  traceable=traceable, op="avgpool_linear",
                                  config=configs.interpreted({**configs.head_interpreter(images, j, c, pixels),
                                                              "SPLIT_K": igemm.INTERPRETER_SPLIT_K})
                                  if interpret else None,
                                  key=configs.shape_key(M=images, C=c, HW=pixels, J=j, prec=args["INPUT_PRECISION"],
                                                        bias=bias is not None),
                                  candidates=configs.head_candidates(images, j, c, pixels, x.element_size(), sms=sms),
                                  scratch=split_scratch(grid))

    def launch_into(y, x):
        launch(to_layout(x), weight, bias, y)

    return backend.output_plan((n, j), x, launch_into)


def _as_pixel_rows(x):
    """(to_layout, (stride of an image, of a channel, of a pixel)) for reading x's maps as rows of
    H * W pixels: x as it is where pixel (h, w) lies at (h * W + w) pixel strides, else a
    channels_last copy."""
    _, c, h, w = x.shape
    if w == 1:
        return (lambda t: t), (x.stride(0), x.stride(1), x.stride(2))
    if h == 1 or x.stride(2) == w * x.stride(3):
        return (lambda t: t), (x.stride(0), x.stride(1), x.stride(3))
    return (lambda t: t.contiguous(memory_format=torch.channels_last)), (c * h * w, 1, c)


# ----------------------------------------------------------------------------------------------
# Op registration
# ----------------------------------------------------------------------------------------------


@triton_op("fused_resnet::avgpool_linear", mutates_args=())
def _avgpool_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       backend_name: str) -> torch.Tensor:
    return plan_avgpool_linear(x, weight, bias, backend_name=backend_name, traceable=True)(x)


def avgpool_linear(input, weight, bias=None):
    """F.linear(input.mean((2, 3)), weight, bias) in one kernel: (N, C, H, W) -> (N, out_features).

    The mean is taken in fp32 and rounded to the input's dtype before the product, as
    torch's own pool would store it; the product accumulates in fp32.
    """
    if not isinstance(input, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("avgpool_linear: input and weight must be tensors")
    input, weight, bias = backend.autocast_operands(input, weight, bias)
    return torch.ops.fused_resnet.avgpool_linear(input, weight, bias, backend.current_backend())


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------


def avgpool_linear_reference(x, weight, bias):
    """The same as torch ops: adaptive average pooling to 1x1, flatten, linear."""
    return F.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1), weight, bias)
