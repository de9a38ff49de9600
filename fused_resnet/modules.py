"""Inference modules whose every conv runs as one fused kernel: conv + bias (+ shortcut) + ReLU.

Each module is built from its torchvision counterpart with BatchNorm folded in, and keeps
torchvision's attribute names (conv1, conv2, conv3, downsample) so that one reads like the other.
The folded weights are buffers, not parameters: these modules are for inference only, and refuse
training mode and gradients with an error rather than silently returning wrong gradients.
"""

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

import kernels

from .folding import fold_bn


class InferenceOnly(nn.Module):
    """Base for fused modules: always in eval mode, no gradients."""

    def __init__(self):
        super().__init__()
        self.training = False

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError(
                f"{type(self).__name__} is an inference module (BatchNorm is folded into its "
                "weights) and cannot be trained; train the torchvision model and fuse it again"
            )
        return super().train(False)


class FusedConv2d(InferenceOnly):
    """conv2d + bias (+ residual) (+ ReLU) as one kernel (kernels.conv2d_bias_act).

    forward(x, residual=None) = relu(conv2d(x, weight, bias) + residual); the add only when a
    residual is passed, the ReLU only if `relu`. The weight is kept channels_last, the layout the
    kernel reads, so no call permutes it.
    """

    def __init__(self, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, relu=False):
        super().__init__()
        if weight.dim() != 4:
            raise ValueError(f"FusedConv2d: weight must be 4-D (K, C // groups, R, S), got {tuple(weight.shape)}")
        self.out_channels, cg, kh, kw = weight.shape
        self.in_channels = cg * groups
        self.kernel_size = (kh, kw)
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
        self.relu = relu
        self.register_buffer("weight", weight.detach().contiguous(memory_format=torch.channels_last))
        self.register_buffer("bias", None if bias is None else bias.detach().contiguous())

    @classmethod
    def from_conv_bn(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, relu: bool = False, *, dtype=None):
        """The fused equivalent of relu(bn(conv(x))) in eval mode (bn and the ReLU optional)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"FusedConv2d.from_conv_bn: conv must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(
                f"FusedConv2d.from_conv_bn: padding_mode={conv.padding_mode!r} is not supported; expected 'zeros'"
            )
        if bn is not None:
            weight, bias = fold_bn(conv, bn, dtype=dtype)
        else:
            weight = conv.weight.detach().to(dtype or conv.weight.dtype)
            bias = None if conv.bias is None else conv.bias.detach().to(dtype or conv.bias.dtype)
        return cls(weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups, relu)

    def forward(self, x, residual=None):
        check_input(self, x, self.in_channels, self.weight)
        return kernels.conv2d_bias_act(
            x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
            residual=residual, relu=self.relu,
        )

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}")
        if self.dilation not in (1, (1, 1)):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        s += f", bias={self.bias is not None}, relu={self.relu}"
        return s


def check_input(module, x, channels, weight):
    """Errors that name the module and what it expected, before any kernel sees the input."""
    name = type(module).__name__
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor input, got {type(x).__name__}")
    if x.dim() not in (3, 4):
        raise ValueError(f"{name}: expected a 4-D (N, C, H, W) or 3-D (C, H, W) input, got shape {tuple(x.shape)}")
    if x.shape[-3] != channels:
        raise ValueError(f"{name}: expected an input with {channels} channels, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point input, got {x.dtype}")
    if x.dtype != weight.dtype:
        raise TypeError(
            f"{name}: input is {x.dtype} but the module's weights are {weight.dtype}; "
            f"cast the input with x.to({weight.dtype}) or the model with .to(dtype)"
        )
    if x.device != weight.device:
        raise ValueError(
            f"{name}: input is on {x.device} but the module's weights are on {weight.device}; "
            "move one of them"
        )
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError(
            f"{name} does not compute gradients (it is an inference module); run it under "
            "torch.no_grad() or torch.inference_mode(), or detach the input"
        )


def _downsample(block, dtype):
    """A torchvision downsample (Sequential(conv1x1, BatchNorm2d)) as one FusedConv2d."""
    ds = block.downsample
    if ds is None:
        return None
    if (isinstance(ds, nn.Sequential) and len(ds) == 2
            and isinstance(ds[0], nn.Conv2d) and isinstance(ds[1], nn.BatchNorm2d)):
        return FusedConv2d.from_conv_bn(ds[0], ds[1], relu=False, dtype=dtype)
    raise TypeError(
        f"{type(block).__name__}.downsample must be Sequential(Conv2d, BatchNorm2d) to be fused, got {ds}"
    )


def _check_block(block, expected):
    if not isinstance(block, expected):
        raise TypeError(f"expected a torchvision {expected.__name__}, got {type(block).__name__}")
    if not isinstance(block.relu, nn.ReLU):
        raise TypeError(f"{expected.__name__}.relu must be nn.ReLU to be fused, got {type(block.relu).__name__}")


class FusedBasicBlock(InferenceOnly):
    """torchvision's BasicBlock as two kernels: conv1+bias+ReLU, then conv2+bias+shortcut+ReLU."""

    expansion = 1

    def __init__(self, conv1, conv2, downsample=None):
        super().__init__()
        self.conv1 = conv1
        self.conv2 = conv2
        self.downsample = downsample

    @classmethod
    def from_torchvision(cls, block: BasicBlock, *, dtype=None):
        """Fold the block's BatchNorms and return its fused equivalent in eval mode."""
        _check_block(block, BasicBlock)
        return cls(
            FusedConv2d.from_conv_bn(block.conv1, block.bn1, relu=True, dtype=dtype),
            FusedConv2d.from_conv_bn(block.conv2, block.bn2, relu=True, dtype=dtype),
            _downsample(block, dtype),
        )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return self.conv2(self.conv1(x), residual=identity)


class FusedBottleneck(InferenceOnly):
    """torchvision's Bottleneck as three kernels; the last one adds the shortcut and applies ReLU."""

    expansion = 4

    def __init__(self, conv1, conv2, conv3, downsample=None):
        super().__init__()
        self.conv1 = conv1
        self.conv2 = conv2
        self.conv3 = conv3
        self.downsample = downsample

    @classmethod
    def from_torchvision(cls, block: Bottleneck, *, dtype=None):
        """Fold the block's BatchNorms and return its fused equivalent in eval mode."""
        _check_block(block, Bottleneck)
        return cls(
            FusedConv2d.from_conv_bn(block.conv1, block.bn1, relu=True, dtype=dtype),
            FusedConv2d.from_conv_bn(block.conv2, block.bn2, relu=True, dtype=dtype),
            FusedConv2d.from_conv_bn(block.conv3, block.bn3, relu=True, dtype=dtype),
            _downsample(block, dtype),
        )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return self.conv3(self.conv2(self.conv1(x)), residual=identity)
