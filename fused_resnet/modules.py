"""Inference modules whose every conv runs as one fused kernel: conv + bias (+ shortcut) + ReLU.

Each module is built from its torchvision counterpart with BatchNorm folded in, and keeps
torchvision's attribute names (conv1, conv2, conv3, downsample) so that one reads like the other.
The deeper fusions are switches on the blocks and on fuse(): a projection shortcut merged into the
block's last GEMM (the block's `downsample` is then None and its last conv holds the shortcut's
weight), conv + max pooling for the stem (FusedConv2dMaxPool), the head's average pooling +
fc (FusedAvgPoolLinear), a block's last conv with the next block's first (FusedChain1x1, in a
FusedStage), and a Bottleneck's 3x3 conv inside its last conv's kernel (FusedConvChain1x1).
The folded weights are buffers, not parameters: these modules are for inference only, and refuse
training mode and gradients with an error rather than silently returning wrong gradients.
"""

import functools
import os
import time
import weakref

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from torchvision.models.resnet import BasicBlock, Bottleneck

from . import kernels
from .folding import fold_bn
from .kernels import precompile
from .kernels.backend import AUTOCAST_DEVICES

# Plans a fused layer keeps, one per input signature; past this the oldest goes (a server that
# sees many batch sizes keeps its recent ones).
MAX_PLANS = 32


class InferenceOnly(nn.Module):
    """Base for fused modules: always in eval mode, no gradients.

    `batched_only`: refuse 3-D (unbatched) input; fuse() sets it on a network's first layer.
    """

    batched_only = False

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


class PlannedLayer(InferenceOnly):
    """A fused layer that runs one kernels op, planned once per input signature.

    In eager mode a call looks up the plan for its input's signature (shape, strides, dtype,
    device, and the residual's; the kernels backend, torch.autocast and, for float32, the TF32
    settings in force) and runs it: the checks, argument normalization, backend choice and launch
    arguments were all done when that plan was built, on the first call with that signature.
    Under tracing (torch.compile, torch.export, fake tensors, TorchScript tracing), for the
    addressless tensors of torch.func.functionalize and for unbatched input, the layer calls the
    registered torch op instead, so a traced graph holds one op per layer. Plans hold the
    layer's weights, some of them as a copy laid out for the kernel: moving or casting the layer
    (`.to()`, `.half()`), assigning a buffer or loading a state dict drops them (a buffer changed
    in place otherwise does not); copies and pickles start without any.
    """

    op_name = ""  # the registered op the layer runs, as the profiler names it
    dots = ("conv",)  # whose TF32 setting its fp32 dots follow (kernels.backend.tf32_allowed)
    # How many times any fused layer has dropped its plans (moved, cast, given new weights): a
    # CUDA graph replays the launches of the plans it was captured with, so CUDAGraphModule
    # captures again when this has moved.
    plans_dropped = 0

    def __init__(self):
        super().__init__()
        self._plans = {}
        self._cast = {}  # {dtype: the buffers cast to it}, for torch.autocast

    def _drop_plans(self):
        self.__dict__["_plans"] = {}
        self.__dict__["_cast"] = {}
        PlannedLayer.plans_dropped += 1

    def _autocast(self, x, device_type=None):
        """The dtype this layer computes in on x under torch.autocast (kernels.backend.autocast_dtype),
        or None: autocast off, or float64 weights or input, which it leaves as they are."""
        if self.weight.dtype == torch.float64:
            return None
        return kernels.backend.autocast_dtype(x, device_type)

    def _planned(self, x, residual=None):
        """The plan for this input, or None where the registered op must run (which, under
        torch.autocast, casts as the plan does)."""
        if (type(x) is not torch.Tensor or x.dim() != 4 or torch.compiler.is_compiling() or torch.jit.is_tracing()
                or torch._is_functional_tensor(x)):
            check_input(self, x, self.in_channels, self.weight, self._autocast(x))
            return None
        device = x.device
        kind = device.type
        # (Autocast is asked about first: off, as it mostly is, that is all this call costs.)
        autocast = self._autocast(x, kind) if kind in AUTOCAST_DEVICES and torch.is_autocast_enabled(kind) else None
        target = precompile.target_gpu()
        key = (x.shape, x.stride(), x.dtype, device, autocast, kernels.current_backend(), target,
               None if residual is None else (residual.shape, residual.stride(), residual.dtype, residual.device),
               # (Compiled kernels bind their dots' precision; interpreted ones and torch's ops do not.)
               kernels.backend.precision_key(x.dtype if autocast is None else autocast, self.dots)
               if kind == "cuda" or target is not None else None)
        plan = self._plans.get(key)
        if plan is None:
            check_input(self, x, self.in_channels, self.weight, autocast)
            plan = self._build_plan(x, residual, self._buffers) if autocast is None else \
                self._autocast_plan(autocast, x, residual)
            if len(self._plans) >= MAX_PLANS:
                del self._plans[next(iter(self._plans))]
            self._plans[key] = plan
        elif x.requires_grad and torch.is_grad_enabled():
            check_input(self, x, self.in_channels, self.weight, autocast)  # raises: no gradients here
        if torch.autograd.profiler._is_profiler_enabled:
            # Under the profiler a plan's launch shows under the op's name, as the op's would.
            return functools.partial(_recorded, self.op_name, plan)
        return plan

    def _build_plan(self, x, residual, buffers):
        """The kernels op's plan for this input, with this layer's tensors as `buffers` holds them
        ({name: tensor}: the layer's own, or cast for autocast)."""
        raise NotImplementedError

    def _autocast_plan(self, dtype, x, residual):
        """The plan that computes in `dtype` as torch.autocast asks: on the buffers cast once (kept
        until the plans go), and on the operands cast at each call where they are not in it."""
        buffers = self._cast.get(dtype)
        if buffers is None:
            buffers = self._cast[dtype] = dict(zip(self._buffers, kernels.backend.autocast_cast(
                dtype, *self._buffers.values())))
        plan = self._build_plan(*kernels.backend.autocast_cast(dtype, x, residual), buffers)
        if x.dtype == dtype and (residual is None or residual.dtype == dtype):
            return plan
        return functools.partial(_cast_operands, dtype, plan)

    def _apply(self, fn, *args, **kwargs):
        self._drop_plans()  # .to(), .cuda(), .half() give the buffers new tensors
        return super()._apply(fn, *args, **kwargs)

    def __setattr__(self, name, value):
        if name in self.__dict__.get("_buffers", ()):
            self._drop_plans()
        super().__setattr__(name, value)

    def _load_from_state_dict(self, *args, **kwargs):
        # load_state_dict copies into the buffers in place, which plans holding them see, but some
        # plans hold a copy laid out for the kernel (the stem's filter rows or 2x2 blocks, a grouped
        # conv's groups bundled into one), which they would not.
        self._drop_plans()
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_plans"], state["_cast"] = {}, {}  # plans hold closures over this object's tensors
        return state


def _cast_operands(dtype, plan, *operands):
    return plan(*kernels.backend.autocast_cast(dtype, *operands))


def warmup(model: nn.Module, example, *, progress=None, workers=None) -> float:
    """Build every launch plan `model` needs for inputs like `example` before the first real call:
    on a GPU that compiles each kernel and picks its config (from the shipped table or the disk
    cache, else by timing a few), under the interpreter it interprets each once. Returns the
    seconds it took.

    On a GPU the kernels are compiled first, all at once, in `workers` processes (default: one a
    CPU core, at most 16; 1 compiles here, one after another): a forward inside
    kernels.precompile.compile_only lists them, and the real forward that follows finds each in
    Triton's cache.

    `example` is an input tensor, or its shape (N, C, H, W), drawn at random in the model's dtype
    and on its device. `progress(message)` hears of each kernel compiled and each fused layer as
    it is planned.
    """
    if not isinstance(example, torch.Tensor):
        reference = next((t for t in model.buffers() if t.is_floating_point()), None)
        if reference is None:
            raise ValueError("warmup: the model has no floating-point buffers; pass an example tensor")
        example = torch.randn(tuple(example), dtype=reference.dtype, device=reference.device)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, PlannedLayer)]
    if not layers:
        raise TypeError(f"warmup: {type(model).__name__} holds no fused layers; fuse it first")
    if example.dim() == 4:
        example = example.contiguous(memory_format=torch.channels_last)
    start = time.perf_counter()
    if _compiles_ahead(example):
        _compile_ahead(model, example, workers, progress)
        for hook in model._forward_pre_hooks.values():  # fuse's CompileAhead: done for inputs like this
            if isinstance(hook, CompileAhead):
                hook.seen.add(_input_key(example))
    done = []

    def report(module, args):
        done.append(module)
        if progress is not None:
            name = next(n for n, m in layers if m is module)
            progress(f"warm-up: layer {len(done)}/{len(layers)} {name or type(module).__name__}")

    hooks = [m.register_forward_pre_hook(report) for _, m in layers]
    try:
        with torch.no_grad():
            model(example)
        if example.is_cuda:
            torch.cuda.synchronize(example.device)
    finally:
        for hook in hooks:
            hook.remove()
    return time.perf_counter() - start


def _compile_ahead(model, example, workers, progress):
    """Compile in parallel every kernel the model's forward on `example` will compile."""
    with torch.no_grad(), precompile.compile_only() as listed:
        model(example)
    # Those in Triton's cache already (a later process, say) need no worker: starting one costs
    # seconds (a Python that imports torch), more than a warm first forward takes in all.
    jobs = [job for job in listed if not precompile.compiled(job)]
    if progress is not None and len(jobs) < len(listed):
        progress(f"warm-up: {len(listed) - len(jobs)} of {len(listed)} kernels in Triton's cache already")
    if not jobs:
        return
    if workers is None:
        workers = min(16, os.cpu_count() or 1, len(jobs))
    if progress is not None:
        progress(f"warm-up: compiling {len(jobs)} kernels in {workers} process(es)")
    precompile.compile_jobs(jobs, workers=workers, progress=progress)


class CompileAhead:
    """The forward pre-hook that `fuse` puts on a fused network, so that even a plain first call
    compiles its kernels in parallel: the first call with each new input (shape, dtype, device)
    on a GPU, with the Triton kernels in force, first lists and compiles every kernel that forward
    will launch, all at once, as warmup does, instead of one after another as each layer meets
    its own. Tracing, graph capture and the listing forward itself pass through; warmup marks
    its input as done."""

    def __init__(self):
        self.seen = set()

    def __reduce__(self):  # a copy, or a network unpickled in a new process, has compiled nothing yet
        return CompileAhead, ()

    def __call__(self, model, args):
        if torch.compiler.is_compiling() or not args or not _compiles_ahead(args[0]):
            return
        key = _input_key(args[0])
        if key not in self.seen:
            self.seen.add(key)
            _compile_ahead(model, args[0], None, None)


def _compiles_ahead(x):
    """Whether a forward on x compiles kernels that can be compiled ahead, all at once: real CUDA
    tensors, the Triton kernels in force, and neither graph capture nor a listing under way."""
    return (isinstance(x, torch.Tensor) and x.is_cuda and not is_fake(x)
            and kernels.current_backend() in ("auto", "triton") and precompile.session() is None
            and not torch.cuda.is_current_stream_capturing())


def _input_key(x):
    # (A layout of its own compiles no kernel of its own; autocast and the TF32 settings may.)
    return tuple(x.shape), x.dtype, x.device, kernels.backend.call_settings(x)


def _recorded(name, plan, *operands):
    with torch.profiler.record_function(name):
        return plan(*operands)


class FusedConv2d(PlannedLayer):
    """conv2d + bias (+ residual) (+ ReLU) as one kernel (kernels.conv2d_bias_act).

    forward(x, residual=None) = relu(conv2d(x, weight, bias) + residual); the add only when a
    residual is passed, the ReLU only if `relu`. With a `shortcut_weight` (K, C_sc, 1, 1), the
    residual is a projection shortcut's input and what is added is conv2d(residual,
    shortcut_weight, stride=shortcut_stride), computed in the same GEMM; `bias` then holds both
    convs' biases. The weights are kept channels_last, the layout the kernel reads, so no call
    permutes them.
    """

    op_name = "fused_resnet::conv2d_bias_act"

    def __init__(self, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, relu=False,
                 shortcut_weight=None, shortcut_stride=1):
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
        self.shortcut_stride = shortcut_stride
        self.register_buffer(
            "shortcut_weight",
            None if shortcut_weight is None else shortcut_weight.detach().contiguous(memory_format=torch.channels_last),
        )

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
        plan = self._planned(x, residual)
        if plan is not None:
            return plan(x, residual)
        return kernels.conv2d_bias_act(
            x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
            residual=residual, relu=self.relu,
            shortcut_weight=self.shortcut_weight, shortcut_stride=self.shortcut_stride,
        )

    def _build_plan(self, x, residual, buffers):
        return kernels.plan_conv2d_bias_act(
            x, buffers["weight"], buffers["bias"], self.stride, self.padding, self.dilation, self.groups,
            residual=residual, relu=self.relu,
            shortcut_weight=buffers["shortcut_weight"], shortcut_stride=self.shortcut_stride,
        )

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}")
        if self.dilation not in (1, (1, 1)):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        s += f", bias={self.bias is not None}, relu={self.relu}"
        if self.shortcut_weight is not None:
            s += (f", shortcut=1x1 conv {self.shortcut_weight.shape[1]}->{self.out_channels} "
                  f"stride={self.shortcut_stride}")
        return s


class FusedConv2dMaxPool(FusedConv2d):
    """conv2d + bias (+ ReLU) + max pooling as one kernel (kernels.conv2d_bias_act_maxpool).

    A ResNet stem (conv1, bn1, relu, maxpool): the conv's output, the largest map of the network,
    is never written to memory.
    """

    op_name = "fused_resnet::conv2d_bias_act_maxpool"

    def __init__(self, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, relu=False, *,
                 pool_size, pool_stride, pool_padding):
        super().__init__(weight, bias, stride, padding, dilation, groups, relu)
        self.pool_size = pool_size
        self.pool_stride = pool_stride
        self.pool_padding = pool_padding

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, pool: nn.MaxPool2d, relu: bool = True, *,
                     dtype=None):
        """The fused equivalent of pool(relu(bn(conv(x)))) in eval mode (bn and the ReLU optional)."""
        if not isinstance(pool, nn.MaxPool2d):
            raise TypeError(f"FusedConv2dMaxPool: pool must be an nn.MaxPool2d, got {type(pool).__name__}")
        if pool.dilation not in (1, (1, 1)) or pool.ceil_mode or pool.return_indices:
            raise ValueError(
                f"FusedConv2dMaxPool: only max pooling with dilation=1, ceil_mode=False and no indices is "
                f"supported, got {pool}"
            )
        fused = FusedConv2d.from_conv_bn(conv, bn, relu, dtype=dtype)
        return cls(fused.weight, fused.bias, fused.stride, fused.padding, fused.dilation, fused.groups, relu,
                   pool_size=pool.kernel_size, pool_stride=pool.stride, pool_padding=pool.padding)

    def forward(self, x, residual=None):
        if residual is not None:
            raise ValueError("FusedConv2dMaxPool takes no residual")
        plan = self._planned(x)
        if plan is not None:
            return plan(x)
        return kernels.conv2d_bias_act_maxpool(x, **self._op_args())

    def _build_plan(self, x, residual, buffers):
        return kernels.plan_conv2d_bias_act_maxpool(x, **self._op_args(buffers))

    def _op_args(self, buffers=None):
        buffers = self._buffers if buffers is None else buffers
        return dict(weight=buffers["weight"], bias=buffers["bias"], stride=self.stride, padding=self.padding,
                    dilation=self.dilation, groups=self.groups, relu=self.relu, pool_size=self.pool_size,
                    pool_stride=self.pool_stride, pool_padding=self.pool_padding)

    def extra_repr(self):
        return (f"{super().extra_repr()}, maxpool(kernel_size={self.pool_size}, stride={self.pool_stride}, "
                f"padding={self.pool_padding})")


class FusedAvgPoolLinear(PlannedLayer):
    """Global average pooling + linear as one kernel (kernels.avgpool_linear): (N, C, H, W) -> (N, J).

    A ResNet head (avgpool, flatten, fc): the pooled vector never goes to memory.
    """

    op_name = "fused_resnet::avgpool_linear"
    dots = ("matmul",)  # as nn.Linear's

    def __init__(self, weight, bias=None):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"FusedAvgPoolLinear: weight must be 2-D (out_features, in_features), got "
                             f"{tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.detach().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().contiguous())

    @property
    def in_channels(self):
        """The channels of the feature map the head pools: the fc's in_features."""
        return self.in_features

    @classmethod
    def from_linear(cls, fc: nn.Linear, *, dtype=None):
        """The fused equivalent of fc(torch.flatten(adaptive_avg_pool2d(x, 1), 1))."""
        if not isinstance(fc, nn.Linear):
            raise TypeError(f"FusedAvgPoolLinear.from_linear: fc must be an nn.Linear, got {type(fc).__name__}")
        weight = fc.weight.detach().to(dtype or fc.weight.dtype)
        bias = None if fc.bias is None else fc.bias.detach().to(dtype or fc.bias.dtype)
        return cls(weight, bias)

    def forward(self, x):
        if isinstance(x, torch.Tensor) and x.dim() != 4:
            raise ValueError(f"FusedAvgPoolLinear: expected a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}")
        plan = self._planned(x)
        if plan is not None:
            return plan(x)
        return kernels.avgpool_linear(x, self.weight, self.bias)

    def _build_plan(self, x, residual, buffers):
        return kernels.plan_avgpool_linear(x, buffers["weight"], buffers["bias"])

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class FusedChain1x1(PlannedLayer):
    """A Bottleneck's last conv and the next block's first as one kernel (kernels.chain_1x1).

    forward(x, residual) -> (y, z): y = relu(conv1x1(x, weight) + bias + residual), the block's
    output, and z = relu(conv1x1(y, next_weight) + next_bias), the next block's first conv, which
    then does not read y back from memory. With a `shortcut_weight`, the residual is a merged
    projection shortcut's input, as for FusedConv2d. It takes the place of the block's conv3 in a
    FusedStage (fuse(chain_blocks=True)); the next block keeps its own conv1 for when it runs alone.
    Built by `from_convs`, the chain and that conv1 hold the same weight tensors, moved or cast too.
    """

    op_name = "fused_resnet::chain_1x1"
    next_optional = False  # (FusedConvChain1x1 may end at y)

    def __init__(self, weight, bias, next_weight, next_bias, shortcut_weight=None, shortcut_stride=1):
        super().__init__()
        name = type(self).__name__
        if next_weight is None and not self.next_optional:
            raise ValueError(f"{name}: next_weight is required")
        for what, w in (("weight", weight), ("next_weight", next_weight)):
            if w is not None and (w.dim() != 4 or tuple(w.shape[2:]) != (1, 1)):
                raise ValueError(f"{name}: {what} must be a 1x1 conv weight, got {tuple(w.shape)}")
        if next_weight is not None and next_weight.shape[1] != weight.shape[0]:
            raise ValueError(f"{name}: next_weight takes {next_weight.shape[1]} channels, but weight gives "
                             f"{weight.shape[0]}")
        self.in_channels, self.out_channels = weight.shape[1], weight.shape[0]
        self.next_channels = None if next_weight is None else next_weight.shape[0]
        # Weights channels_last, as FusedConv2d keeps them (the layout the convs read when they run apart).
        for name, t in (("weight", weight), ("bias", bias), ("next_weight", next_weight), ("next_bias", next_bias),
                        ("shortcut_weight", shortcut_weight)):
            layout = torch.channels_last if t is not None and t.dim() == 4 else torch.contiguous_format
            self.register_buffer(name, None if t is None else t.detach().contiguous(memory_format=layout))
        self.shortcut_stride = shortcut_stride
        # (conv, ((its buffer, this layer's), ...)): convs elsewhere in the network that hold the same weights
        self._shared_with = ()

    @classmethod
    def from_convs(cls, last: FusedConv2d, next_first: FusedConv2d):
        """The chain of a block's last conv (with the shortcut in its epilogue: the identity, or a merged
        projection) and the next block's first, both plain 1x1 convs with a ReLU."""
        _check_chained(cls, last, next_first)
        chain = cls(last.weight, last.bias, next_first.weight, next_first.bias, last.shortcut_weight,
                    last.shortcut_stride)
        chain._share_with(next_first, "next_")
        return chain

    def _share_with(self, conv, prefix):
        """Record that `conv` holds this layer's `{prefix}weight` and `{prefix}bias` as its own."""
        self._shared_with += ((conv, (("weight", f"{prefix}weight"), ("bias", f"{prefix}bias"))),)

    def _apply(self, fn, *args, **kwargs):
        # .to(), .half() and the like give each module's buffers new tensors, and would leave this
        # layer and the convs it shares weights with a copy each: hand them this layer's. (A conv
        # converted after this layer, in the next stage, meets a tensor already converted: .to() and
        # its kin return it as it is.)
        out = super()._apply(fn, *args, **kwargs)
        for conv, names in self._shared_with:
            for theirs, ours in names:
                setattr(conv, theirs, getattr(self, ours))
        return out

    def forward(self, x, residual, *, next_conv=True):
        """(y, z); with `next_conv=False`, (y, None): a traced stage whose z nobody takes (FusedStage)
        has the chain stop at y, through the registered ops."""
        if isinstance(x, torch.Tensor) and x.dim() == 3:  # unbatched, as a block run alone may be
            y, z = self.forward(x.unsqueeze(0), residual.unsqueeze(0), next_conv=next_conv)
            return y.squeeze(0), None if z is None else z.squeeze(0)
        if not next_conv:
            return self._run_op(x, residual, next_conv=False)
        plan = self._planned(x, residual)
        if plan is not None:
            return plan(x, residual)
        return self._run_op(x, residual)

    def _run_op(self, x, residual, next_conv=True):
        """(y, z) from the registered op: the path under tracing. Without the next conv, y alone is
        the last conv's, shortcut and all."""
        if not next_conv:
            return kernels.conv2d_bias_act(x, self.weight, self.bias, residual=residual, relu=True,
                                           shortcut_weight=self.shortcut_weight,
                                           shortcut_stride=self.shortcut_stride), None
        return kernels.chain_1x1(x, self.weight, self.bias, residual, self.next_weight, self.next_bias,
                                 shortcut_weight=self.shortcut_weight, shortcut_stride=self.shortcut_stride)

    def _build_plan(self, x, residual, buffers):
        return kernels.plan_chain_1x1(x, buffers["weight"], buffers["bias"], residual, buffers["next_weight"],
                                      buffers["next_bias"], shortcut_weight=buffers["shortcut_weight"],
                                      shortcut_stride=self.shortcut_stride)

    def extra_repr(self):
        added = "residual" if self.shortcut_weight is None else \
            f"1x1 conv {self.shortcut_weight.shape[1]}->{self.out_channels} stride={self.shortcut_stride}"
        return (f"{self.in_channels} -> {self.out_channels} (+ {added}) -> {self.next_channels}, 1x1 convs, "
                f"bias={self.bias is not None}, relu=True")


class FusedConvChain1x1(FusedChain1x1):
    """A Bottleneck's 3x3 conv, its last conv and, optionally, the next block's first, as one kernel
    (kernels.conv_chain_1x1).

    forward(x, residual) -> (y, z): h = relu(conv(x, head_weight) + head_bias), the 3x3 conv's
    output, never leaves the kernel; y and z are FusedChain1x1's, computed from h (z is None
    without a next conv). It takes the place of the block's conv3 (fuse(chain_3x3=True)); the block
    keeps its conv2, which no longer runs, and the next block its conv1, for when it runs alone;
    built by `from_convs`, the chain shares their weight tensors.
    """

    op_name = "fused_resnet::conv_chain_1x1"
    next_optional = True

    def __init__(self, head_weight, head_bias, weight, bias, next_weight=None, next_bias=None, shortcut_weight=None,
                 shortcut_stride=1, *, stride=1, padding=0, dilation=1):
        super().__init__(weight, bias, next_weight, next_bias, shortcut_weight, shortcut_stride)
        if head_weight.dim() != 4 or head_weight.shape[0] != weight.shape[1]:
            raise ValueError(f"FusedConvChain1x1: head_weight must be a conv weight ({weight.shape[1]}, C, R, S), "
                             f"got {tuple(head_weight.shape)}")
        self.head_channels = self.in_channels  # the 1x1's input: the head's output
        self.in_channels = head_weight.shape[1]
        self.kernel_size = tuple(head_weight.shape[2:])
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.register_buffer("head_weight", head_weight.detach().contiguous(memory_format=torch.channels_last))
        self.register_buffer("head_bias", None if head_bias is None else head_bias.detach().contiguous())

    @classmethod
    def from_convs(cls, head: FusedConv2d, last: FusedConv2d, next_first: FusedConv2d | None = None):
        """The chain of a block's 3x3 conv (one group, with its ReLU), its last conv and, if given, the
        next block's first."""
        if head.groups != 1 or not head.relu or head.shortcut_weight is not None:
            raise ValueError(f"FusedConvChain1x1: head must be a conv of one group with a ReLU, "
                             f"got {head.extra_repr()}")
        _check_chained(cls, last, next_first)
        chain = cls(head.weight, head.bias, last.weight, last.bias,
                    None if next_first is None else next_first.weight, None if next_first is None else next_first.bias,
                    last.shortcut_weight, last.shortcut_stride,
                    stride=head.stride, padding=head.padding, dilation=head.dilation)
        chain._share_with(head, "head_")
        if next_first is not None:
            chain._share_with(next_first, "next_")
        return chain

    def _run_op(self, x, residual, next_conv=True):
        next_conv = next_conv and self.next_weight is not None
        out = kernels.conv_chain_1x1(x, self.head_weight, self.head_bias, self.weight, self.bias, residual,
                                     self.next_weight if next_conv else None, self.next_bias if next_conv else None,
                                     stride=self.stride, padding=self.padding, dilation=self.dilation,
                                     shortcut_weight=self.shortcut_weight, shortcut_stride=self.shortcut_stride)
        return out if next_conv else (out, None)

    def _build_plan(self, x, residual, buffers):
        return kernels.plan_conv_chain_1x1(x, buffers["head_weight"], buffers["head_bias"], buffers["weight"],
                                           buffers["bias"], residual, buffers["next_weight"], buffers["next_bias"],
                                           stride=self.stride, padding=self.padding, dilation=self.dilation,
                                           shortcut_weight=buffers["shortcut_weight"],
                                           shortcut_stride=self.shortcut_stride)

    def extra_repr(self):
        head = (f"{self.in_channels} -> {self.head_channels}, {self.kernel_size[0]}x{self.kernel_size[1]} conv, "
                f"stride={self.stride}, padding={self.padding}")
        if self.dilation not in (1, (1, 1)):
            head += f", dilation={self.dilation}"
        return f"{head}; then {super().extra_repr()}"


def _check_chained(cls, last, next_first):
    """A chain's 1x1 convs: plain 1x1 convs of stride 1 with a ReLU; the next one without a shortcut."""
    for name, conv in (("last", last), ("next_first", next_first)):
        if conv is None:
            continue
        plain = (conv.kernel_size == (1, 1) and _pair(conv.stride) == (1, 1) and _pair(conv.padding) == (0, 0)
                 and _pair(conv.dilation) == (1, 1) and conv.groups == 1 and conv.relu)
        if not plain or (conv is next_first and conv.shortcut_weight is not None):
            raise ValueError(f"{cls.__name__}: {name} must be a 1x1 conv of stride 1 with a ReLU"
                             f"{'' if conv is last else ' and no merged shortcut'}, got {conv.extra_repr()}")


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def check_input(module, x, channels, weight, autocast=None):
    """Errors that name the module and what it expected, before any kernel sees the input.
    `autocast`: the dtype torch.autocast has input and weights computed in (None: as they are)."""
    name = type(module).__name__
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor input, got {type(x).__name__}")
    if module.batched_only and x.dim() != 4:
        hint = "; add the batch dimension with x.unsqueeze(0)" if x.dim() == 3 else ""
        raise ValueError(f"{name} (the network's first layer): expected a batched 4-D (N, C, H, W) input, got shape "
                         f"{tuple(x.shape)}{hint}")
    if x.dim() not in (3, 4):
        raise ValueError(f"{name}: expected a 4-D (N, C, H, W) or 3-D (C, H, W) input, got shape {tuple(x.shape)}")
    if x.shape[-3] != channels:
        raise ValueError(f"{name}: expected an input with {channels} channels, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point input, got {x.dtype}")
    if x.dtype != weight.dtype and autocast is None:
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


def _downsample_parts(block):
    """(conv, bn) of a torchvision downsample (Sequential(conv1x1, BatchNorm2d)), or None."""
    ds = block.downsample
    if ds is None:
        return None
    if (isinstance(ds, nn.Sequential) and len(ds) == 2
            and isinstance(ds[0], nn.Conv2d) and isinstance(ds[1], nn.BatchNorm2d)):
        return ds[0], ds[1]
    raise TypeError(
        f"{type(block).__name__}.downsample must be Sequential(Conv2d, BatchNorm2d) to be fused, got {ds}"
    )


def _can_merge(conv, shortcut_conv):
    """A shortcut joins the last conv's GEMM when it is a plain 1x1 conv and the last conv is ungrouped."""
    return (conv.groups == 1 and shortcut_conv.groups == 1 and shortcut_conv.kernel_size == (1, 1)
            and shortcut_conv.padding == (0, 0) and shortcut_conv.padding_mode == "zeros")


def _last_conv_and_downsample(block, conv, bn, dtype, residual_epilogue, merge_downsample):
    """The block's last conv, which takes the shortcut, and the downsample left for it (or None).

    relu(bn(conv(h)) + bn_d(conv_d(x))) folds to relu(W h + W_d x + (b + b_d)): with
    `merge_downsample`, one conv holds W, W_d as its shortcut weight and the summed bias, folded
    in float64 and cast once.
    """
    if merge_downsample and not residual_epilogue:
        raise ValueError("merge_downsample=True needs residual_epilogue=True: the merged shortcut is added in the "
                         "epilogue; pass merge_downsample=False too")
    parts = _downsample_parts(block)
    if parts is not None and merge_downsample and _can_merge(conv, parts[0]):
        weight, bias = fold_bn(conv, bn, dtype=torch.float64)
        shortcut_weight, shortcut_bias = fold_bn(*parts, dtype=torch.float64)
        target = dtype or conv.weight.dtype
        last = FusedConv2d(weight.to(target), (bias + shortcut_bias).to(target), conv.stride, conv.padding,
                           conv.dilation, conv.groups, relu=True,
                           shortcut_weight=shortcut_weight.to(target), shortcut_stride=parts[0].stride)
        return last, None
    last = FusedConv2d.from_conv_bn(conv, bn, relu=residual_epilogue, dtype=dtype)
    downsample = None if parts is None else FusedConv2d.from_conv_bn(*parts, relu=False, dtype=dtype)
    return last, downsample


class _FusedBlock(InferenceOnly):
    """What both fused blocks share: the shortcut, added in the last conv's epilogue or by add_relu."""

    def __init__(self, downsample, residual_epilogue):
        super().__init__()
        self.downsample = downsample
        self.residual_epilogue = residual_epilogue

    def _finish(self, last_conv, h, x):
        # With a merged downsample, last_conv holds the shortcut weight and takes x itself.
        identity = x if self.downsample is None else self.downsample(x)
        if self.residual_epilogue:
            return last_conv(h, residual=identity)
        return kernels.add_relu(last_conv(h), identity)

    def extra_repr(self):
        return "" if self.residual_epilogue else "residual_epilogue=False"


def _check_block(block, expected):
    if not isinstance(block, expected):
        raise TypeError(f"expected a torchvision {expected.__name__}, got {type(block).__name__}")
    if not isinstance(block.relu, nn.ReLU):
        raise TypeError(f"{expected.__name__}.relu must be nn.ReLU to be fused, got {type(block.relu).__name__}")


class FusedBasicBlock(_FusedBlock):
    """torchvision's BasicBlock as two kernels: conv1+bias+ReLU, then conv2+bias+shortcut+ReLU.

    With `merge_downsample` a projection shortcut runs inside conv2's GEMM; with
    `residual_epilogue=False` the add and ReLU run as a separate add_relu kernel (for measuring
    what the epilogue saves).
    """

    expansion = 1

    def __init__(self, conv1, conv2, downsample=None, *, residual_epilogue=True):
        super().__init__(downsample, residual_epilogue)
        self.conv1 = conv1
        self.conv2 = conv2

    @classmethod
    def from_torchvision(cls, block: BasicBlock, *, dtype=None, residual_epilogue=True, merge_downsample=True):
        """Fold the block's BatchNorms and return its fused equivalent in eval mode."""
        _check_block(block, BasicBlock)
        conv2, downsample = _last_conv_and_downsample(block, block.conv2, block.bn2, dtype, residual_epilogue,
                                                      merge_downsample)
        conv1 = FusedConv2d.from_conv_bn(block.conv1, block.bn1, relu=True, dtype=dtype)
        return cls(conv1, conv2, downsample, residual_epilogue=residual_epilogue)

    def forward(self, x):
        return self._finish(self.conv2, self.conv1(x), x)


class FusedBottleneck(_FusedBlock):
    """torchvision's Bottleneck as three kernels; the last one adds the shortcut and applies ReLU.

    Switches as for FusedBasicBlock; a merged projection shortcut runs inside conv3's GEMM.
    """

    expansion = 4

    def __init__(self, conv1, conv2, conv3, downsample=None, *, residual_epilogue=True):
        super().__init__(downsample, residual_epilogue)
        self.conv1 = conv1
        self.conv2 = conv2
        self.conv3 = conv3

    @classmethod
    def from_torchvision(cls, block: Bottleneck, *, dtype=None, residual_epilogue=True, merge_downsample=True):
        """Fold the block's BatchNorms and return its fused equivalent in eval mode."""
        _check_block(block, Bottleneck)
        conv3, downsample = _last_conv_and_downsample(block, block.conv3, block.bn3, dtype, residual_epilogue,
                                                      merge_downsample)
        return cls(
            FusedConv2d.from_conv_bn(block.conv1, block.bn1, relu=True, dtype=dtype),
            FusedConv2d.from_conv_bn(block.conv2, block.bn2, relu=True, dtype=dtype),
            conv3,
            downsample,
            residual_epilogue=residual_epilogue,
        )

    def forward(self, x):
        return self.forward_chained(x)[0]

    def forward_chained(self, x, first=None, *, next_conv=True):
        """(y, z): the block's output y, and z, the next block's first conv of y where this block's
        conv3 is a FusedChain1x1 that computes it (else None). `first`: this block's own first conv
        of x, where the block before computed it. `next_conv=False`: no z, where nobody takes it."""
        h = self.conv1(x) if first is None else first
        if isinstance(self.conv3, FusedConvChain1x1):  # conv2 runs inside it
            return self.conv3(h, x, next_conv=next_conv)
        h = self.conv2(h)
        if isinstance(self.conv3, FusedChain1x1):
            return self.conv3(h, x, next_conv=next_conv)
        return self._finish(self.conv3, h, x), None


def can_chain(block, next_block) -> bool:
    """Whether a torchvision Bottleneck and the block after it can run as a FusedStage chains them
    (with fuse's default merge_downsample): the block's shortcut is the identity or a projection
    merged into its last conv, its last conv and the next block's first are plain 1x1 convs, and
    their channels fit one program (kernels.chain_fits)."""
    if not (isinstance(block, Bottleneck) and isinstance(next_block, Bottleneck)):
        return False
    first = next_block.conv1
    return (_last_chains(block) and _plain_1x1(first)
            and kernels.chain_fits(block.conv3.in_channels, first.out_channels, _shortcut_channels(block)))


def can_chain_3x3(block) -> bool:
    """Whether a torchvision Bottleneck's 3x3 conv can run inside its last conv's kernel
    (fuse(chain_3x3=True), with the default merge_downsample): its shortcut is the identity or a
    merged projection, its last conv a plain 1x1, its 3x3 conv of one group, and the 3x3's output
    channels fit one program (kernels.chain_fits)."""
    if not isinstance(block, Bottleneck):
        return False
    head = block.conv2
    return (_last_chains(block) and head.groups == 1 and head.padding_mode == "zeros"
            and not isinstance(head.padding, str)
            and kernels.chain_fits(block.conv3.in_channels, 0, _shortcut_channels(block)))


def _plain_1x1(conv):
    return (conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


def _last_chains(block):
    """A Bottleneck's last conv can lead a chain: a plain 1x1, with the identity or a mergeable shortcut."""
    parts = _downsample_parts(block)
    return _plain_1x1(block.conv3) and (parts is None or _can_merge(block.conv3, parts[0]))


def _shortcut_channels(block):
    parts = _downsample_parts(block)
    return 0 if parts is None else parts[0].in_channels


class StageHandoff:
    """What a FusedStage hands the stage after it when its last block chains across the two
    (fuse(chain_blocks=True)): z, the next stage's first conv of this stage's output y, computed by
    this stage's last kernel.

    The next stage takes z only for that same y, unmodified: the same tensor object and, outside
    inference mode, the same version counter (inference tensors have none: an in-place change to
    y between the two stages there goes unseen). Any other input runs the next stage's own first
    conv, as does a traced call (torch.compile, torch.jit.trace), where nothing is handed over (and
    the stage before computes no z). z is taken once, and the handoff lets go of it then."""

    def __init__(self):
        self._held = None  # (weak reference to y, y's version or None, z)

    def give(self, y, z):
        self._held = (weakref.ref(y), None if y.is_inference() else y._version, z)

    def take(self, x):
        held, self._held = self._held, None
        if held is None:
            return None
        ref, version, z = held
        if ref() is not x or (version is not None and (x.is_inference() or x._version != version)):
            return None
        return z

    def __getstate__(self):  # a copy or an unpickled network holds nothing yet
        return {"_held": None}


def _tracing():
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


class FusedStage(nn.Sequential):
    """A stage of fused blocks (torchvision's layer1..layer4) that hands each block's chained
    output on: where a block's conv3 is a FusedChain1x1, it also computes the next block's first
    conv, and the next block starts from that. Where the stage's last block chains with the next
    stage's first, the two stages share a StageHandoff (`hands_on`, `takes_over`). Indexing and
    names stay nn.Sequential's."""

    hands_on = None  # StageHandoff to the stage after this one, or None
    takes_over = None  # StageHandoff from the stage before this one, or None

    def forward(self, x):
        tracing = _tracing()
        # the next block's first conv of x, where the block before (or the stage before) computed it
        first = self.takes_over.take(x) if self.takes_over is not None and not tracing else None
        for i, block in enumerate(self):
            if isinstance(block, FusedBottleneck):
                # Traced, nothing is handed to the next stage: the last block's chain stops at its output.
                last_alone = tracing and self.hands_on is not None and i == len(self) - 1
                x, first = block.forward_chained(x, first, next_conv=not last_alone)
            else:
                x, first = block(x), None
        if first is not None and self.hands_on is not None and not tracing:
            self.hands_on.give(x, first)
        return x

    @classmethod
    def chained(cls, blocks, originals, *, chain_blocks=True, chain_3x3=False, following=None):
        """The fused `blocks` as a stage in which, judged on the torchvision `originals` they came from
        (a projection shortcut merged into the block's last conv): with `chain_blocks`, each block that
        can_chain with the next computes the next one's first conv; with `chain_3x3`, each block that
        can_chain_3x3 runs its 3x3 conv inside its last conv's kernel (FusedConvChain1x1).
        `following`: (the stage that runs after this one, the torchvision block its first block came
        from), for chain_blocks to chain this stage's last block with it through a StageHandoff."""
        stage = cls(*blocks)
        nexts = list(zip(blocks[1:], originals[1:]))
        if following is not None and len(following[0]):
            nexts.append((following[0][0], following[1]))
        for i, block in enumerate(blocks):
            if not (isinstance(block, FusedBottleneck) and block.residual_epilogue and block.downsample is None):
                continue
            after, after_original = nexts[i] if i < len(nexts) else (None, None)
            next_first = None
            if chain_blocks and isinstance(after, FusedBottleneck) and can_chain(originals[i], after_original):
                next_first = after.conv1
                if i == len(blocks) - 1:  # across the two stages
                    stage.hands_on = following[0].takes_over = StageHandoff()
            if chain_3x3 and can_chain_3x3(originals[i]):
                block.conv3 = FusedConvChain1x1.from_convs(block.conv2, block.conv3, next_first)
            elif next_first is not None:
                block.conv3 = FusedChain1x1.from_convs(block.conv3, next_first)
        return stage
