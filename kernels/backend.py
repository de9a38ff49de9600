"""Which implementation a kernels op runs: the Triton kernel, cuDNN, or plain torch ops.

The environment decides by default ("auto"): CUDA tensors run the compiled Triton kernel; CPU
tensors run the Triton kernel under the Triton interpreter when TRITON_INTERPRET=1 was set before
triton was imported, and the reference (plain torch ops) otherwise. `use_backend` overrides that
for a scope, so that one test, benchmark or command can pick a path without touching the
environment:

    with kernels.use_backend("reference"):   # unfused torch ops, for a baseline or a fast CPU run
        y = model(x)
"""

import contextlib
import contextvars
import functools
import math
import os
import threading
import warnings

import torch
import triton
import triton.testing
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton
from triton.compiler.errors import CompileTimeAssertionFailure
from triton.runtime.errors import OutOfResources, PTXASError

from . import configs, precompile

BACKENDS = ("auto", "triton", "reference", "cudnn")

# The backend in force, per thread, as torch keeps its grad mode and autocast. torch.compile reads
# it while tracing and guards on it, so a compiled model called under another backend recompiles.
# (A ContextVar would follow asyncio tasks too, but Dynamo in torch 2.11 cannot trace one: a
# fullgraph compile of a fused model failed at every op.)
_backend = threading.local()

# The Triton interpreter patches triton.language while a kernel runs, so two threads interpreting
# at once break each other; compiled launches need no lock.
_interpreter_lock = threading.Lock()


def interpreting() -> bool:
    """True when triton.jit kernels run under the Triton interpreter (TRITON_INTERPRET=1)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _release(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


@functools.cache
def check_interpreter() -> None:
    """Raise a clear error where this Triton's interpreter cannot run the kernels.

    Triton 3.6's interpreter keeps a kernel's scalars as one-element arrays and takes their value
    with int(array) wherever they bound a loop; NumPy 2.4 refuses that (its deprecation of
    converting arrays with ndim > 0 expired), so every conv would fail deep inside the interpreter
    with "only 0-dimensional arrays can be converted" (triton-lang/triton#9171, fixed after 3.6).
    """
    import numpy

    if _release(triton.__version__) < (3, 7) and _release(numpy.__version__) >= (2, 4):
        raise RuntimeError(
            f"the Triton interpreter of triton {triton.__version__} cannot run these kernels with numpy "
            f"{numpy.__version__}: install numpy<2.4, or a newer triton"
        )


# The interpreter's builder methods that take a mask, and its place among their arguments.
_MASKED_OPS = {"create_masked_load": 1, "create_masked_store": 2, "create_atomic_rmw": 3}


def bool_masks() -> None:
    """Make every mask an interpreted load, store or atomic gets bool, as the compiled kernel's are.

    Triton's interpreter gives a comparison the dtype of its operands: a scalar `i < n` over int32
    values is an int32 handle that holds a bool, and a block mask anded with it (`mask & (i < n)`)
    comes out as int32 ones and zeros. Triton 3.6 to 3.8 load and store through such a mask; 3.9's
    native load, store and atomics refuse it ("mask has unsupported dtype"). A bool copy selects the
    same lanes on every release. Installed on the interpreted launches' way in, again after
    anything (bounds_checked) restores the builder's methods; a no-op once in place."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    for name, at in _MASKED_OPS.items():
        method = getattr(builder, name)
        if getattr(method, "bool_masks", False):
            continue

        def as_bool(self, *args, _method=method, _at=at, **kwargs):
            mask = args[_at] if len(args) > _at else None
            # (A tensor descriptor's mask comes as a bare bool array, on triton 3.8 say.)
            if isinstance(mask, interpreter.TensorHandle) and mask.data.dtype != bool:
                mask = interpreter.TensorHandle(mask.data.astype(bool), triton.language.int1)
                args = (*args[:_at], mask, *args[_at + 1:])
            return _method(self, *args, **kwargs)

        as_bool.bool_masks = True
        setattr(builder, name, as_bool)


class OutOfBounds(RuntimeError):
    """An interpreted kernel touched memory outside the tensors its launch was given (bounds_checked)."""


# Inside bounds_checked(): (kernel name, [(first byte, end byte)] of each tensor argument's storage)
# of the interpreted launch running. (Interpreted launches run one at a time: _interpreter_lock.)
_bounds = None
_bounds_checking = False  # inside bounds_checked(): a nested one adds nothing


def _extent(t: torch.Tensor):
    """The bytes of a tensor's storage, as (first, end): the memory it was allocated, which a view
    (a packed weight's, say) may read beyond its own elements without a fault."""
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


def _tensors(arg):
    if isinstance(arg, torch.Tensor):
        yield arg
    elif isinstance(arg, (tuple, list)):
        for item in arg:
            yield from _tensors(item)
    elif hasattr(arg, "base") and isinstance(arg.base, torch.Tensor):  # a host TensorDescriptor
        yield arg.base


def _check_bounds(ptrs, mask):
    """Raise OutOfBounds where an address `mask` selects (all, for None) lies outside the storage of
    every tensor argument of the launch running."""
    import numpy

    if _bounds is None:
        return
    if mask is not None:
        # (A descriptor's mask comes as a bare array; as integers, a mask would index elements 0 and 1.)
        mask = numpy.broadcast_to((mask if isinstance(mask, numpy.ndarray) else mask.data).astype(bool),
                                  ptrs.data.shape)
    addresses = ptrs.data if mask is None else ptrs.data[mask]
    if not addresses.size:
        return
    name, extents = _bounds
    size = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
    inside = numpy.zeros(addresses.shape, dtype=bool)
    for first, end in extents:
        inside |= (addresses >= first) & (addresses + size <= end)
    if not inside.all():
        outside = addresses[~inside]
        first = int(outside.min())
        nearest = min(extents, key=lambda e: min(abs(first - e[0]), abs(first - e[1])))
        raise OutOfBounds(f"{name}: {outside.size} of {addresses.size} addresses outside its tensors, the "
                          f"first {first - nearest[0]:+d} bytes from the start of a tensor's storage of "
                          f"{nearest[1] - nearest[0]} bytes")


@contextlib.contextmanager
def bounds_checked():
    """Under the Triton interpreter, every load, store and atomic of each kernel launched inside
    must fall within the memory of the tensors its launch was given (their storages); one that does
    not raises OutOfBounds naming the kernel. On a GPU such an access is an illegal address, a
    fault that ends the process, or reads or overwrites a neighbour's memory; here it shows where
    it happens. (Masked-off lanes are not accesses.) Inside another, it checks nothing twice."""
    global _bounds, _bounds_checking
    if _bounds_checking:
        yield
        return
    from triton.runtime import interpreter

    builder, executor = interpreter.InterpreterBuilder, interpreter.GridExecutor
    saved = {name: getattr(builder, name) for name in
             ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas")}
    init_args = executor._init_args_hst

    def init_args_checked(self, args_dev, kwargs):
        global _bounds
        args, kwargs_hst = init_args(self, args_dev, kwargs)
        tensors = [t for arg in (*args, *kwargs_hst.values()) for t in _tensors(arg) if t.numel()]
        _bounds = (self.fn.__name__, [_extent(t) for t in tensors])
        return args, kwargs_hst

    def load(self, ptrs, mask, *rest, **kwargs):
        _check_bounds(ptrs, mask)
        return saved["create_masked_load"](self, ptrs, mask, *rest, **kwargs)

    def store(self, ptrs, value, mask, *rest, **kwargs):
        _check_bounds(ptrs, mask)
        return saved["create_masked_store"](self, ptrs, value, mask, *rest, **kwargs)

    def atomic_rmw(self, op, ptr, val, mask, *rest, **kwargs):
        _check_bounds(ptr, mask)
        return saved["create_atomic_rmw"](self, op, ptr, val, mask, *rest, **kwargs)

    def atomic_cas(self, ptr, *rest, **kwargs):
        _check_bounds(ptr, None)
        return saved["create_atomic_cas"](self, ptr, *rest, **kwargs)

    previous = _bounds
    executor._init_args_hst = init_args_checked
    builder.create_masked_load, builder.create_masked_store = load, store
    builder.create_atomic_rmw, builder.create_atomic_cas = atomic_rmw, atomic_cas
    _bounds_checking = True
    try:
        yield
    finally:
        executor._init_args_hst = init_args
        for name, fn in saved.items():
            setattr(builder, name, fn)
        _bounds, _bounds_checking = previous, False


@contextlib.contextmanager
def use_backend(name: str):
    """Run every kernels op inside the `with` block on backend `name` (in this thread, as torch.no_grad).

    "auto": the default described in this module's docstring. "triton": the Triton kernel, which
    on CPU tensors needs the interpreter. "reference": plain torch ops (conv, add, ReLU as separate
    kernels). "cudnn": cuDNN's fused conv+bias(+add)+ReLU on CUDA where it applies, else the
    reference.
    """
    if name not in BACKENDS:
        raise ValueError(f"kernels.use_backend: unknown backend {name!r}; expected one of {BACKENDS}")
    previous = current_backend()
    _backend.name = name
    try:
        yield
    finally:
        _backend.name = previous


def current_backend() -> str:
    """The backend chosen by the innermost `use_backend`, or "auto"."""
    return getattr(_backend, "name", "auto")


def resolve(tensor: torch.Tensor, name: str | None = None) -> str:
    """The concrete backend ("triton", "reference" or "cudnn") for an op on `tensor` under backend
    `name` (default: the one in force)."""
    name = current_backend() if name is None else name
    if name not in BACKENDS:
        raise ValueError(f"kernels: unknown backend {name!r}; expected one of {BACKENDS}")
    on_cuda = tensor.device.type == "cuda"
    if not on_cuda and name in ("auto", "triton") and precompile.target_gpu() is not None:
        return "triton"  # planned for the GPU that precompile.compile_only names
    if not on_cuda and name in ("auto", "triton") and is_fake(tensor):
        # An interpreted kernel runs eagerly and cannot enter a traced graph (torch.compile,
        # torch.export, fake-tensor shape checks on CPU): trace the reference instead.
        return "reference"
    if name == "auto":
        return "triton" if on_cuda or interpreting() else "reference"
    if name == "triton" and not on_cuda and not interpreting():
        raise RuntimeError(
            "kernels backend 'triton' on a CPU tensor needs the Triton interpreter: set "
            "TRITON_INTERPRET=1 before triton is imported, or move the tensors to CUDA"
        )
    if name == "cudnn" and not on_cuda:
        return "reference"
    return name


# ----------------------------------------------------------------------------------------------
# Launch plans: what every op shares
# ----------------------------------------------------------------------------------------------
#
# Every op is planned, then run: `plan_<op>(operands, settings)` checks the arguments, picks the
# path and binds everything that follows from the operands' signature (shapes, strides, dtype,
# device, backend); the plan it returns is called with the tensors alone. The registered torch op
# builds a plan and runs it once per call; the fused modules keep their plans per input signature
# and call them directly in eager mode, so a known signature costs a dictionary lookup and the
# launch.
#
# The backend reaches a registered op as an argument, read from the context by the op's Python
# wrapper: torch.compile traces the wrapper, sees the read and guards on it, so switching backends
# around a compiled model recompiles it rather than running the backend it was traced with.


def choose(x: torch.Tensor, name: str | None = None, *, cudnn: bool = False) -> str:
    """The path of an op on `x` under backend `name` (default: the one in force): "triton",
    "reference" or "cudnn" (ops with a cuDNN form only).

    float64 never runs the kernel: it accumulates in fp32, and a float64 caller asked for more."""
    path = resolve(x, name)
    if path == "triton" and x.dtype == torch.float64:
        return "reference"
    if path == "cudnn" and not cudnn:
        return "reference"
    return path


def output_plan(out_shape, like: torch.Tensor, launch, *, channels_last: bool = True):
    """A plan that allocates the output (channels_last for 4-D) and launches the kernel into it:
    run(*operands) -> y, with launch(y, *operands). An empty output launches nothing."""
    dtype, device = like.dtype, like.device
    strides = channels_last_strides(out_shape) if channels_last and len(out_shape) == 4 else None
    if math.prod(out_shape) == 0:
        return lambda *operands: empty(out_shape, strides, dtype, device)

    def run(*operands):
        y = empty(out_shape, strides, dtype, device)
        launch(y, *operands)
        return y

    return run


def empty(shape, strides, dtype, device) -> torch.Tensor:
    """An uninitialized tensor of `shape` and `strides` (None: contiguous), for a kernel to write.
    A channels_last output is made with its strides, not torch.empty's memory_format: in a graph
    that Inductor compiles, the latter comes out as a buffer of other strides that is then copied
    into one of these, which writes every element once more (NaN, as Inductor fills what no one
    wrote) before the kernel writes it."""
    if strides is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.empty_strided(shape, strides, dtype=dtype, device=device)


# Where PyTorch's fp32 settings for an op live, most specific first: torch's newer fp32_precision API
# (the op's own, its backend's, the generic one; "none" passes the question up, and "none"
# throughout means IEEE), and the legacy flag for a torch without that API.
_FP32_PRECISION = {
    "conv": (("cudnn", "conv"), ("cudnn",), ()),
    "matmul": (("cuda", "matmul"), ("cudnn",), ()),  # (cudnn's fp32_precision is the CUDA backend's)
}
_LEGACY_TF32 = {"conv": ("cudnn",), "matmul": ("cuda", "matmul")}


def tf32_allowed(op="conv"):
    """Whether fp32 dots of `op` may take TF32 as PyTorch's own would: "conv" as its cuDNN convs (what
    the convs here follow), "matmul" as its matmuls (the head's linear). Read from torch's
    fp32_precision settings where it has them: the legacy torch.backends.cudnn.allow_tf32 raises
    once those have set convs and RNNs apart."""
    for path in _FP32_PRECISION[op]:
        settings = functools.reduce(lambda place, name: getattr(place, name, None), path, torch.backends)
        precision = getattr(settings, "fp32_precision", None)
        if precision is None:  # a torch without the newer API
            return bool(functools.reduce(getattr, _LEGACY_TF32[op], torch.backends).allow_tf32)
        if precision != "none":
            return precision == "tf32"
    return False


def precision_key(dtype, ops=("conv", "matmul")):
    """What of PyTorch's settings a compiled plan for operands of `dtype` binds besides the operands:
    for float32, whether the dots of `ops` may take TF32 (tf32_allowed); None for other dtypes."""
    return tuple(tf32_allowed(op) for op in ops) if dtype == torch.float32 else None


# torch.autocast runs a conv or linear in its lower precision on floating-point tensors other than
# float64, and leaves elementwise ops (an add, a ReLU, pooling) in their inputs' dtype. The ops that
# hold a conv or a linear (all but add_relu) do as F.conv2d does under it: their Python wrappers
# cast the operands, and the fused modules keep their weights cast once for each such dtype.
AUTOCAST_DEVICES = ("cuda", "cpu")


def autocast_dtype(x: torch.Tensor, device_type: str | None = None):
    """The dtype in which torch.autocast would run a conv on `x` (float16 or bfloat16, as the autocast
    in force for its device type says), or None where autocast is off there or leaves x as it is
    (float64, integers). `device_type`: x.device.type, where the caller has it."""
    if not isinstance(x, torch.Tensor):
        return None  # (the op's own checks say what it expected)
    kind = x.device.type if device_type is None else device_type
    if kind not in AUTOCAST_DEVICES or not torch.is_autocast_enabled(kind):
        return None
    if not x.is_floating_point() or x.dtype == torch.float64:
        return None
    return torch.get_autocast_dtype(kind)


def call_settings(x: torch.Tensor):
    """The torch settings besides the backend that a call on x computes under and a compiled plan
    binds: (autocast_dtype(x), the precision_key of the dtype it computes in)."""
    autocast = autocast_dtype(x)
    return autocast, precision_key(x.dtype if autocast is None else autocast)


def autocast_cast(dtype, *tensors):
    """`tensors` as autocast hands them to a conv computed in `dtype` (None: as they are): each
    floating-point tensor other than float64 in `dtype`, the rest (None too) unchanged."""
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in tensors)


def autocast_operands(x, *tensors):
    """(x, *tensors) as torch.autocast hands them to a conv on x (autocast_dtype, autocast_cast): an
    op's Python wrapper casts its operands so, as F.conv2d's are."""
    return autocast_cast(autocast_dtype(x), x, *tensors)


def hint(size) -> int:
    """`size` as an int. A symbolic size (torch.compile's dynamic shapes, a torch.export Dim) gives
    the value the trace was made with, read without a guard, so the traced graph stays general in
    it: the kernels take their sizes as arguments and mask their edges, so what a launch decides
    from the hint (its config, the key it is looked up under) holds for every size the graph runs."""
    if not isinstance(size, torch.SymInt):
        return size
    value = size.node.hint
    if value is None:
        raise ValueError(f"kernels: the size {size} depends on data (an unbacked symbol); the fused kernels "
                         f"need sizes that are known when the graph is traced")
    return value


def aligned(t: torch.Tensor) -> bool:
    """Whether t's data starts at a multiple of 16 bytes (what tensor descriptors need). A traced
    tensor (fake) has no address: there its offset into its storage decides, as PyTorch's and
    Inductor's allocators start each storage at such a multiple."""
    if is_fake(t):
        return hint(t.storage_offset()) * t.element_size() % 16 == 0
    return t.data_ptr() % 16 == 0


def on_gpu(x: torch.Tensor) -> bool:
    """Whether a Triton launch on `x` is compiled for a GPU (x on CUDA, or CPU tensors inside
    precompile.compile_only(gpu=...)) rather than interpreted."""
    return x.is_cuda or precompile.target_gpu() is not None


def channels_last_strides(shape):
    """The strides of a dense channels_last (N, C, H, W) tensor of `shape`."""
    n, c, h, w = shape
    return (c * h * w, 1, w * c, c)


# Whether compiled launches with a known signature go straight to the compiled kernel
# (KernelLaunch._direct); tests and benchmarks switch it off to compare the two.
DIRECT_LAUNCH = True


class KernelLaunch:
    """One Triton kernel with its scalar arguments bound: called with the tensor arguments alone.

    `args` are the kernel's keyword arguments (sizes, strides, flags), `grid(meta)` its launch
    grid. The config (tile sizes, warps, stages) is `config` when the caller knows it (the
    interpreter's tiles, an elementwise block); on a GPU it is chosen at the first launch, by
    kernels.configs: the shipped table or the disk cache for (GPU, `op`, dtype, `key`), else the
    fastest of `candidates` timed on the first call's own tensors (stored for later processes),
    or under tracing, where nothing can be timed, the first candidate. From then on every launch
    uses it. With `traceable`, launches go through wrap_triton, as they must inside a registered
    op that torch.compile traces. `scratch(config)`, if given, says what a launch with that config
    takes after the call's own tensors: a function of the first tensor that returns them (working
    memory such as split-K's partial tiles, on that tensor's device; None for those it does not
    use). With `descriptors` (some config reads through in-kernel tensor descriptors), each launch
    first makes sure Triton has an allocator in the launching context (ensure_allocator). A
    launch whose tensors are on another GPU than the current one runs with theirs made current,
    as Triton launches on the current GPU.

    A compiled launch through `kernel[grid](...)` costs Triton's per-call work: it binds and
    specializes every one of the kernel's (about 50) arguments, hashes a cache key and looks the
    kernel up. For a plan, all but the tensors are fixed, so after the first launch the plan
    calls the compiled kernel itself with the same arguments (Triton's `compiled[grid](*args)`,
    all arguments in the kernel's order), as long as the tensors' 16-byte alignment, the one
    thing about them Triton specializes on, is what it was compiled for; otherwise, and where
    this Triton's compiled kernels take their arguments in another form, the plain launch.
    """

    def __init__(self, kernel, grid, args, *, on_cuda, config=None, traceable=False, op="", key="", candidates=(),
                 scratch=None, descriptors=False):
        self.kernel, self.grid, self.args = kernel, grid, args
        self.scratch = scratch
        self.descriptors = descriptors
        self.on_cuda = on_cuda
        self.traceable = traceable
        self.op, self.key, self.candidates = op, key, list(candidates)
        self.config = config
        self.bound = None if config is None else self._bind(config)
        self.direct = None  # (compiled[grid], the arguments after the tensors, alignment), or False

    def _bind(self, config):
        self.take_scratch = None if self.scratch is None else self.scratch(config)
        kernel, kwargs = self.kernel, {**self.args, **config}
        # (An interpreted kernel never enters a traced graph: on a CPU, tracing traces the reference.
        # So it launches as it is; torch 2.11's wrap_triton refuses the interpreter's kernels.)
        if self.traceable and self.on_cuda:
            if "num_warps" in config:  # a traced launch takes warps and stages from a one-config autotuner
                # (which also sets the config's switches: an argument both passes and sets is refused)
                kernel = _single_config(self.kernel, config)
                kwargs = {k: v for k, v in self.args.items() if k not in config}
            kernel = wrap_triton(kernel)
        return kernel, self.grid(config), kwargs

    def __call__(self, *tensors):
        compiling = precompile.session()
        if compiling is not None:  # inside precompile.compile_only: record, launch nothing
            compiling.record(self, tensors)
            return
        if self.descriptors:
            ensure_allocator()
        if self.on_cuda:
            device = tensors[0].get_device()  # (-1 for the CPU tensors of tests' stand-in kernels)
            if device >= 0 and device != torch.cuda.current_device():  # Triton launches on the current one
                with torch.cuda.device(device):
                    return self._launch(tensors)
        return self._launch(tensors)

    def _launch(self, tensors):
        if self.bound is None:
            self.bound = self._bind(self._choose(tensors))
        kernel, grid, kwargs = self.bound
        if self.take_scratch is not None:
            tensors = tensors + self.take_scratch(tensors[0])
        if not self.on_cuda:
            check_interpreter()
            with _interpreter_lock:
                bool_masks()
                kernel[grid](*tensors, **kwargs)
            return
        direct = self.direct
        if direct and direct[2] == _alignment(tensors):
            try:
                direct[0](*tensors, *direct[1])
                return
            except TypeError:  # this Triton's compiled kernels take other arguments: plain launches
                self.direct = False
        compiled = kernel[grid](*tensors, **kwargs)
        if self.direct is None:
            self.direct = DIRECT_LAUNCH and not self.traceable and _direct(kernel, compiled, grid, tensors, kwargs)

    def table_entry(self, like, gpu=None):
        """(gpu, op, dtype, key): where this launch's config is looked up and stored, for operands
        like `like` on the GPU family `gpu` (default: the one `like` is on)."""
        if gpu is None:
            gpu = configs.gpu_family(_device_name(like.device.index or 0))
        return gpu, self.op, str(like.dtype).removeprefix("torch."), self.key

    def _choose(self, tensors):
        entry = self.table_entry(next(t for t in tensors if isinstance(t, torch.Tensor)))
        found = configs.lookup(*entry)
        if found is not None:
            return found
        if any(is_fake(t) for t in tensors if isinstance(t, torch.Tensor)):
            return self.candidates[0]  # tracing: nothing to time; the real first call tunes
        timed, unfit = [], []
        for config in self.candidates:
            try:
                timed.append((self._time(config, tensors), config))
            except _UNFIT as err:  # more shared memory or registers than this GPU has, say: skipped
                unfit.append(err)
        if not timed:
            raise NoConfigFits(f"{self.op}: none of the {len(self.candidates)} candidate configs for {self.key} "
                               f"compiles for this GPU; the first error: {unfit[0]}") from unfit[0]
        best = min(timed, key=lambda pair: pair[0])[1]  # the first of the fastest, as min() gives
        configs.remember(*entry, best)
        return best

    def _time(self, config, tensors):
        if self.scratch is not None:
            tensors = tensors + self.scratch(config)(tensors[0])
        kwargs = {**self.args, **config}
        grid = self.grid(config)
        return time_call(lambda: self.kernel[grid](*tensors, **kwargs))


class NoConfigFits(RuntimeError):
    """None of a launch's candidate configs compiles for this GPU (too much shared memory, too
    many registers)."""


def time_call(fn) -> float:
    """fn's median time on the GPU in ms, as a first call times its candidates."""
    return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")


class PlanChoice:
    """Plans that compute the same thing in different ways (a chain of convs in one kernel, or the
    convs one after the other; the stem's conv over its pixels or over their 2x2 blocks), called
    as one: each call runs the plan that is faster on this GPU.

    It is chosen as KernelLaunch chooses a config. The first call with real GPU tensors takes the
    plan that the shipped table or the disk cache names for (GPU, `op`, dtype, `key`), as
    {"plan": its index}; else it runs each plan once (each choosing its own configs), times each
    on the call's own operands, stores the fastest in the disk cache, and keeps it (a plan none of
    whose kernel configs compiles for this GPU is passed over, as a config that does not is, and so,
    with a warning, is any other plan but the first that fails). Where nothing
    can be timed (tracing, CUDA graph capture) a call runs the named plan, or else the first, and
    the choice waits for a call that can time. Inside a compile-only listing (kernels.precompile)
    a call runs the named plan, or else every plan, so that each kernel that may launch is
    compiled ahead; under configs.override, whose config is for the first plan's kernel, it runs
    the first.
    """

    def __init__(self, op, key, plans):
        self.op, self.key, self.plans = op, key, tuple(plans)
        self.chosen = None

    def __call__(self, *operands):
        if self.chosen is not None:
            return self.chosen(*operands)
        if configs.forced():
            return self.plans[0](*operands)
        like = operands[0]
        named = self._named(like)
        if precompile.session() is not None:
            return [plan(*operands) for plan in (self.plans if named is None else (named,))][0]
        if named is None:
            if is_fake(like) or (like.is_cuda and torch.cuda.is_current_stream_capturing()):
                return self.plans[0](*operands)
            named = self._fastest(like, operands)
        self.chosen = named
        return named(*operands)

    def table_entry(self, like):
        """(gpu, op, dtype, key): where the choice is looked up and stored for operands like `like`."""
        gpu = None if like.is_cuda else precompile.target_gpu()  # (CPU tensors: a compile-only listing)
        if gpu is None:
            gpu = configs.gpu_family(_device_name(like.device.index or 0))
        return gpu, self.op, str(like.dtype).removeprefix("torch."), self.key

    def _named(self, like):
        found = configs.lookup(*self.table_entry(like))
        index = None if found is None else found.get("plan")
        return self.plans[index] if index in range(len(self.plans)) else None

    def _fastest(self, like, operands):
        runnable, unfit = [], []
        for index, plan in enumerate(self.plans):  # untimed: each chooses its configs and compiles its kernels
            try:
                plan(*operands)
            except NoConfigFits as err:
                unfit.append(err)
            except Exception as err:
                if index == 0:  # the way the op runs without a choice: its errors are the op's
                    raise
                # Another way that fails costs the first call its choice, not its answer.
                warnings.warn(f"{self.op}: way {index} to run {self.key} failed and is passed over: "
                              f"{type(err).__name__}: {err}", stacklevel=2)
            else:
                runnable.append(index)
        if not runnable:
            raise unfit[0]
        best = runnable[0]
        if len(runnable) > 1:
            timings = {index: time_call(functools.partial(self.plans[index], *operands)) for index in runnable}
            best = min(timings, key=timings.get)
        configs.remember(*self.table_entry(like), {"plan": best})
        return self.plans[best]


# Scratch that launches on one stream reuse, per (device, stream, dtype): launches on one stream
# run one after another (on two, at once). The int32 ones are counters the kernels leave zero again.
_per_stream = {}

# The CaptureCounts of the CUDA graph being warmed up or captured, if any.
_capture_counts = contextvars.ContextVar("fused_resnet_capture_counts", default=None)


def _stream_buffer(like, n, dtype):
    """At least n elements of `dtype`, zero when first made, kept for like's device and current
    stream; None where nothing may be kept (a CPU, tracing, graph capture)."""
    if not like.is_cuda or is_fake(like) or torch.cuda.is_current_stream_capturing():
        return None
    key = (like.device.index, torch.cuda.current_stream(like.device).cuda_stream, dtype)
    buffer = _per_stream.get(key)
    if buffer is None or buffer.numel() < n:
        buffer = _per_stream[key] = torch.zeros(max(n, 1024), dtype=dtype, device=like.device)
    return buffer


def working_memory(like: torch.Tensor, n: int) -> torch.Tensor:
    """n fp32 elements (at least) of working memory on like's device, whose contents do not
    matter, such as split-K's partial tiles: kept per stream on CUDA, else new."""
    kept = _stream_buffer(like, n, torch.float32)
    return torch.empty(n, dtype=torch.float32, device=like.device) if kept is None else kept


def zeroed_counts(like: torch.Tensor, n: int) -> torch.Tensor:
    """n int32 counters, zero, on `like`'s device, for a kernel that counts in them (split_sum) and
    sets them back to zero before it ends. On CUDA they are kept per stream and reused, so no
    kernel zeroes them per launch. While a CUDA graph module captures, they are its CaptureCounts'
    slices. Otherwise (under another capture, tracing, on a CPU) each call gets new zeros; a
    captured graph owns those and zeroes them at each replay, one memset a launch."""
    capture = _capture_counts.get()
    counts = None if capture is None else capture.take(like, n)
    if counts is None:
        counts = _stream_buffer(like, n, torch.int32)
    return torch.zeros(n, dtype=torch.int32, device=like.device) if counts is None else counts


class CaptureCounts:
    """The zeroed counters of one CUDA graph's launches, made before its capture.

    Under capture zeroed_counts could only take new zeros, which the graph zeroes again at every
    replay: one memset node a split-K launch. Instead, the warm-up run just before capture goes
    under `measuring()`, which adds up the counters its launches take; `serving(device)` makes
    that many zeros, before capture begins, and hands each launch captured under it a slice of
    its own (16-byte aligned, as the warm-up's were, so the compiled kernels fit). The kernels
    leave their counters zero, so each slice is zero again for the next replay. Keep this object
    as long as the graph: the graph reads its buffer. A launch the warm-up did not see, once the
    buffer is spent, falls back to new zeros.
    """

    def __init__(self):
        self.size, self.taken, self.buffer = 0, 0, None

    @contextlib.contextmanager
    def measuring(self):
        self.size, self.buffer = 0, None
        token = _capture_counts.set(self)
        try:
            yield self
        finally:
            _capture_counts.reset(token)

    @contextlib.contextmanager
    def serving(self, device):
        self.buffer, self.taken = torch.zeros(self.size, dtype=torch.int32, device=device), 0
        token = _capture_counts.set(self)
        try:
            yield self
        finally:
            _capture_counts.reset(token)

    def take(self, like, n):
        """A slice of n counters while serving (None once they run out, or on another device);
        while measuring, None after counting n."""
        aligned = -(-n // 4) * 4  # whole 16-byte words, so that every slice starts aligned
        if self.buffer is None:
            self.size += aligned
            return None
        if self.buffer.device != like.device or self.taken + n > self.buffer.numel():
            return None
        self.taken += aligned
        return self.buffer[self.taken - aligned:self.taken - aligned + n]


# Whether this context has given Triton our allocator (Triton keeps its allocator in a ContextVar:
# each thread starts without one).
_allocator_given = contextvars.ContextVar("fused_resnet_triton_allocator", default=False)


def ensure_allocator():
    """Give Triton, in the calling context, the allocator that in-kernel tensor descriptors take
    their scratch memory from (on the current device), unless this context has it already. Each
    launch of a kernel that may read through descriptors calls this, so a plan built in one thread
    launches in any other."""
    if not _allocator_given.get():
        triton.set_allocator(_allocate)
        _allocator_given.set(True)


def _allocate(size, alignment, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda" if torch.cuda.is_available() else "cpu")


# What a candidate config that this GPU cannot run raises, at compile time or launch (as Triton's
# own autotuner skips them): the first call's tuning passes over it.
_UNFIT = (OutOfResources, CompileTimeAssertionFailure, PTXASError)


def _alignment(tensors):
    return tuple(t is None or t.data_ptr() % 16 == 0 for t in tensors)


def _direct(kernel, compiled, grid, tensors, kwargs):
    """What a direct launch of `compiled` needs, or False where the kernel objects lack it."""
    names = getattr(kernel, "arg_names", None)
    if names is None or not callable(getattr(compiled, "__getitem__", None)):
        return False
    try:
        rest = tuple(kwargs[name] for name in names[len(tensors):])
    except KeyError:  # an argument left to its default: not worth the bookkeeping
        return False
    grid = tuple(grid) + (1,) * (3 - len(grid))  # the compiled kernel's launcher takes all three
    return compiled[grid], rest, _alignment(tensors)


@functools.cache
def _device_name(index):
    return torch.cuda.get_device_name(index)


_single_configs = {}


def _single_config(kernel, config):
    """The kernel as a one-config triton.autotune, which wrap_triton traces with its warps and stages."""
    key = (kernel, tuple(sorted(config.items())))
    if key not in _single_configs:
        meta = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
        chosen = triton.Config(meta, num_warps=config["num_warps"], num_stages=config["num_stages"])
        _single_configs[key] = triton.autotune(configs=[chosen], key=[])(kernel)
    return _single_configs[key]
