"""Compile the kernels a model will launch before it launches them: in parallel, or for a GPU
that is not there.

Left to itself, a model's first forward on a GPU compiles each Triton kernel it launches, one
after another, as each launch meets it (the networks fused_resnet.fuse returns do what follows on
their first call, by a forward pre-hook). Inside `compile_only()` the launches run nothing
instead: each one's first call records a CompileJob for every config that call would compile (the
config the shipped table or the disk cache holds; without one, each candidate it would time), and
the outputs are left uninitialized. `compile_jobs` then compiles the jobs, in worker processes
where asked, into Triton's on-disk cache, where the model's real first forward finds them:

    with precompile.compile_only() as jobs:
        model(x)                                # CUDA tensors: nothing runs
    precompile.compile_jobs(jobs, workers=8)    # Triton's cache now holds every kernel
    model(x)                                    # compiles nothing

`compiled(job)` says whether Triton's cache holds a job's kernel already (warmup leaves those out).

With `gpu` named ("H100", ...), CPU tensors plan as they would on that GPU (Triton path, its
configs, its table entries), so a machine without a GPU compiles what the GPU would run; this is
how the compile report (benchmarks/compile_report.py) and the tests look at compiled code.

Compiling needs Triton's compiler, not its interpreter: with TRITON_INTERPRET=1 the jobs can be
recorded here but compiled only in worker processes, which start without it.
"""

import contextlib
import contextvars
import dataclasses
import functools
import importlib
import io
import os
import pickle
import re
import subprocess
import sys
import tempfile
import threading
import time

import torch

from . import configs


@dataclasses.dataclass(frozen=True)
class Target:
    """What planning for a GPU family without its device takes from the GPU: its compute
    capability, its SMs, and the most shared memory one program may take (the device's opt-in
    limit per block, as Triton reads it)."""

    capability: int
    multiprocessors: int
    shared_memory: int


# The GPU families of the config table (the SXM parts where a family has several), as CPU tensors
# plan for them inside compile_only(gpu), and for an H100 otherwise (the interpreter's tests).
TARGETS = {
    "B200": Target(100, 148, 227 * 1024),  # Blackwell: tcgen05 MMAs, which accumulate in tensor memory
    "H200": Target(90, configs.H100_SMS, configs.H100_SHARED_MEMORY),  # (one chip with the H100)
    "H100": Target(90, configs.H100_SMS, configs.H100_SHARED_MEMORY),
    "A100": Target(80, 108, 163 * 1024),
    "L40S": Target(89, 142, 99 * 1024),
    "L4": Target(89, 58, 99 * 1024),
}
CAPABILITY = {family: target.capability for family, target in TARGETS.items()}

_session = contextvars.ContextVar("fused_resnet_compile_only", default=None)


@dataclasses.dataclass(frozen=True)
class CompileJob:
    """One kernel compile: a Triton kernel (by module and name), its launch arguments as the
    compiler sees them (each tensor as its dtype and 16-byte alignment), and the config."""

    op: str  # the launch's op in the config table ("" for fixed-config kernels)
    key: str  # its shape key
    config: dict
    kernel: tuple  # (module, name) of the @triton.jit function
    args: tuple  # positional: ("tensor", dtype, aligned) or ("none",)
    kwargs: dict  # scalars and constexprs, without the config
    capability: int  # the target's compute capability, e.g. 90


class _Session:
    def __init__(self, gpu, every_candidate):
        self.gpu = gpu
        self.every_candidate = every_candidate
        self.jobs = []
        self._seen = set()

    def record(self, launch, tensors):
        """The jobs of `launch`'s first call on `tensors` (a KernelLaunch)."""
        like = next(t for t in tensors if isinstance(t, torch.Tensor))
        if not like.is_cuda and self.gpu is None:
            return  # interpreted: nothing to compile
        capability, gpu = launch_target(like).capability, None if like.is_cuda else self.gpu
        if launch.config is not None:
            chosen = [launch.config]
        else:
            found = configs.lookup(*launch.table_entry(like, gpu))
            chosen = launch.candidates if found is None or self.every_candidate else [found]
        fn = getattr(launch.kernel, "fn", launch.kernel)
        kernel = (fn.__module__, fn.__name__)
        for config in chosen:
            scratch = () if launch.scratch is None else launch.scratch(config)(like)
            args = tuple(("none",) if t is None else ("tensor", t.dtype, t.data_ptr() % 16 == 0)
                         for t in (*tensors, *scratch))
            job = CompileJob(launch.op, launch.key, dict(config), kernel, args, dict(launch.args), capability)
            identity = (kernel, args, tuple(sorted(job.kwargs.items())), tuple(sorted(job.config.items())), capability)
            if identity not in self._seen:
                self._seen.add(identity)
                self.jobs.append(job)


def session():
    """The compile_only session in force, or None."""
    return _session.get()


def target_gpu():
    """The GPU family CPU tensors plan for inside compile_only(gpu=...), or None."""
    current = _session.get()
    return None if current is None else current.gpu


def cpu_target() -> Target:
    """The GPU CPU tensors plan for: compile_only's `gpu`, else an H100."""
    return TARGETS[target_gpu() or "H100"]


@functools.cache
def device_target(device_index: int) -> Target:
    """The Target of a GPU of this machine, read from its driver (shared memory as Triton reads it)."""
    import triton

    major, minor = torch.cuda.get_device_capability(device_index)
    shared = triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]
    return Target(10 * major + minor, torch.cuda.get_device_properties(device_index).multi_processor_count, shared)


def launch_target(x: torch.Tensor) -> Target:
    """The GPU a launch on `x` runs on: x's, or, for the CPU tensors of the interpreter and of
    compile_only, the GPU they plan for (cpu_target), so that a listing compiled here for another
    GPU holds what a first call there compiles."""
    return device_target(x.device.index or 0) if x.is_cuda else cpu_target()


@contextlib.contextmanager
def compile_only(gpu: str | None = None, *, every_candidate: bool = False):
    """Inside the `with` block Triton launches record what they would compile instead of running.

    Yields the list of CompileJobs, filled as the block runs. Outputs of launches inside are
    uninitialized. `gpu` (a family of CAPABILITY): CPU tensors plan for that GPU. With
    `every_candidate`, a launch records each of its candidate configs even where the table or the
    cache holds one. Plans built inside are kept apart from those built outside it.
    """
    if gpu is not None and gpu not in CAPABILITY:
        raise ValueError(f"compile_only: unknown GPU {gpu!r}; expected one of {sorted(CAPABILITY)}")
    current = _Session(gpu, every_candidate)
    token = _session.set(current)
    try:
        yield current.jobs
    finally:
        _session.reset(token)


class _Pointer:
    """A tensor argument as the compiler sees it: its element type and whether it is 16-byte aligned."""

    def __init__(self, dtype, aligned):
        self.dtype = dtype
        self._ptr = 0 if aligned else 8

    def data_ptr(self):
        return self._ptr


ASM_MARKERS = {
    "tma_loads": "cp.async.bulk.tensor",  # tensor-descriptor (TMA) copies
    "async_copies": "cp.async.cg",  # asynchronous gathered copies: software-pipelined loads
    "wgmma": "wgmma.mma_async",  # Hopper's asynchronous tensor-core MMA
    "tcgen05": "tcgen05.mma",  # Blackwell's (sm_100), its accumulator in tensor memory
    "mma": "mma.sync",  # Ampere-style tensor-core MMA
    "scalar_loads_16": "ld.global.b16",  # 2-byte elements loaded one at a time (fp16/bf16): unvectorized
}


def compile_job(job: CompileJob, machine_code: bool = False) -> dict:
    """Compile `job` in this process, into Triton's cache (a hit if it is there already).

    Returns {"seconds", "shared", "num_warps", "num_stages"} and counts of the PTX markers in
    ASM_MARKERS: whether the loads are asynchronous (pipelined), through tensor descriptors,
    and which tensor-core instruction the dot became. With `machine_code`, also "registers" and
    "spill_bytes" (stores) a thread, from Triton's ptxas step run once more on the PTX, its log read, the
    "programs_per_sm" they and the shared memory allow, and what loop_instructions() reads in the
    machine code."""
    import triton

    source, target, compiler, options = _source(job)
    start = time.perf_counter()
    kernel = triton.compile(source, target=target, options=options)
    seconds = time.perf_counter() - start
    ptx = kernel.asm.get("ptx", "")
    result = {"seconds": seconds, "shared": kernel.metadata.shared, "num_warps": kernel.metadata.num_warps,
              "num_stages": kernel.metadata.num_stages}
    result.update({name: len(re.findall(re.escape(marker), ptx)) for name, marker in ASM_MARKERS.items()})
    if machine_code:
        result.update(_register_use(ptx, compiler, options))
        if result["registers"] and job.capability in SM_LIMITS:
            result["programs_per_sm"] = programs_per_sm(result["registers"], result["shared"], result["num_warps"],
                                                        job.capability)
        result.update(loop_instructions(kernel.asm["cubin"]))
    return result


def _source(job):
    """(Triton's source for the job's kernel, its GPU target, that target's compiler backend, its
    compile options), as JITFunction.run builds them for a launch with these arguments."""
    from triton.compiler import ASTSource

    from .backend import interpreting

    getattr(importlib.import_module(job.kernel[0]), job.kernel[1])  # (a kernel that is not there says so first)
    if interpreting():
        raise RuntimeError("precompile: Triton's interpreter is on (TRITON_INTERPRET=1); kernels cannot be compiled")
    fn, target, backend, binder = _binder(job.kernel, job.capability)
    args = [None if a[0] == "none" else _Pointer(a[1], a[2]) for a in job.args]
    kwargs = {**job.kwargs, **job.config}
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), target, backend, options.__dict__


@functools.cache
def _binder(kernel, capability):
    """(the @triton.jit function, the target, its compiler backend, the function that binds a
    launch's arguments): the binder is Python code Triton writes and compiles for the kernel's
    signature, the larger part of a compiled() lookup's time when made for each job."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = getattr(importlib.import_module(kernel[0]), kernel[1])
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    return fn, target, backend, create_function_from_signature(fn.signature, fn.params, backend)


def compiled(job: CompileJob) -> bool:
    """Whether Triton's on-disk cache already holds `job`'s kernel, so that compiling it would
    only load it: the cache entry triton.compile would look up (its key, as triton.compile makes
    it, names a folder of the cache manager that holds the kernel's metadata file). False where
    this Triton lays its cache out otherwise, and where it compiles afresh every time
    (TRITON_ALWAYS_COMPILE)."""
    import hashlib

    import triton

    try:
        from triton.compiler.compiler import get_cache_invalidating_env_vars
        from triton.runtime.cache import get_cache_key, get_cache_manager

        if triton.knobs.compilation.always_compile:
            return False
        source, _, backend, options = _source(job)
        options = backend.parse_options(dict(options, **source.parse_options()))
        key = get_cache_key(source, backend, options, env_vars=get_cache_invalidating_env_vars())
        metadata = f"{source.name[:150]}.json"
        group = get_cache_manager(hashlib.sha256(key.encode("utf-8")).hexdigest()).get_group(metadata)
    except (ImportError, AttributeError, TypeError):
        return False
    return bool(group) and metadata in group


# Tensor-core instructions in the machine code (SASS): Hopper's warpgroup MMA, Blackwell's tcgen05
# MMA (fp16, bf16 and TF32 operands alike), and mma.sync.
SASS_MMA = ("HGMMA", "UTCHMMA", "HMMA")


def disassemble(cubin: bytes) -> str:
    """A compiled kernel's machine code (SASS), as Triton's nvdisasm prints it."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([knobs.nvidia.nvdisasm.path, "-c", path], capture_output=True, text=True,
                              check=True).stdout


def loop_instructions(cubin: bytes) -> dict:
    """The main loops of a compiled kernel, read in its machine code (Triton's nvdisasm):
    {"loop_instructions": [...], "loop_mma": [...], "loop_tensor_cycles": [...]}, for each
    innermost loop that holds tensor-core MMAs, in code order: the instructions one warp issues
    an iteration, how many of them are MMAs, and the cycles those take the tensor cores (HGMMAs
    only: _tensor_cycles); "kernel_instructions", "kernel_tensor_cycles", the same over the
    whole code, once each (for a kernel whose loops the compiler unrolled, what it runs); and
    "load_loop_instructions", "load_loop_loads": for each innermost loop without MMAs that loads
    from global memory, its instructions and its loads (LDG) an iteration.

    Every instruction of an iteration takes an issue slot of its warp's scheduler (one a cycle),
    and a warpgroup's MMAs keep the SM's tensor cores busy for the tensor cycles; each warpgroup
    of a program puts one warp on each of the four schedulers. So instructions / tensor cycles is
    the share of an iteration's time its issue takes at best: near 1, address and mask arithmetic,
    not the tensor cores, bound the loop, whatever the tile and the number of programs an SM runs."""
    sass = disassemble(cubin)
    code = []  # (address, instruction text)
    labels = {}  # label -> address of the instruction after it
    pending = []
    for line in sass.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        found = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s*(.*?)\s*;", line)
        if found:
            address = int(found.group(1), 16)
            code.append((address, found.group(2)))
            for name in pending:
                labels[name] = address
            pending = []
    loops = []  # (start, end) of every backward branch's body
    for address, text in code:
        target = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", text)
        if target and labels.get(target.group(1), address + 1) <= address:
            loops.append((labels[target.group(1)], address))
    bodies = {loop: [_unpredicated(text) for address, text in code if loop[0] <= address <= loop[1]]
              for loop in set(loops)}
    # A wait on a TMA copy's barrier retries out of line, past the kernel's EXIT, and branches back
    # into the main loop: that span is no loop of the program's, and holds an EXIT.
    with_mma = [loop for loop in sorted(bodies) if any(_opcode(text) in SASS_MMA for text in bodies[loop])
                and not any(_opcode(text) == "EXIT" for text in bodies[loop])]

    def holds_another(loop, among):
        return any(other != loop and loop[0] <= other[0] and other[1] <= loop[1] for other in among)

    innermost = [loop for loop in with_mma if not holds_another(loop, with_mma)]
    # Innermost loops that load from global memory without MMAs (the head's pooling): a warp waits
    # for memory about once an iteration, so loads an iteration are what it keeps in flight.
    loading = [loop for loop in sorted(bodies) if loop not in with_mma
               and any(_opcode(text) == "LDG" for text in bodies[loop]) and not holds_another(loop, bodies)]
    return {"kernel_instructions": len(code),
            "kernel_tensor_cycles": sum(_tensor_cycles(_unpredicated(text)) for _, text in code),
            "loop_instructions": [len(bodies[loop]) for loop in innermost],
            "loop_mma": [sum(_opcode(text) in SASS_MMA for text in bodies[loop]) for loop in innermost],
            "loop_tensor_cycles": [sum(map(_tensor_cycles, bodies[loop])) for loop in innermost],
            "load_loop_instructions": [len(bodies[loop]) for loop in loading],
            "load_loop_loads": [sum(_opcode(text) == "LDG" for text in bodies[loop]) for loop in loading]}


def _unpredicated(instruction):
    """An SASS instruction without its predicate: "@!P0 HGMMA.64x64x16.F32 ..." -> "HGMMA.64x64x16.F32 ..."."""
    return re.sub(r"^@!?U?P[T\d]+\s+", "", instruction)


def _tensor_cycles(instruction):
    """The cycles an H100 SM's tensor cores spend on an (unpredicated) instruction: an m64nNk(32
    bytes) HGMMA is N/2 cycles in every input type (64x64x16 fp16: 65536 multiply-adds at 2048 a
    cycle); 0 for any other instruction, mma.sync included, whose rate this does not model."""
    shape = re.match(r"HGMMA\.64x(\d+)x", instruction)
    return int(shape.group(1)) / 2 if shape else 0


def _opcode(instruction):
    """An (unpredicated) SASS instruction's opcode without its modifiers: "HGMMA.64x64x16.F32 ..." -> "HGMMA"."""
    return instruction.split(" ")[0].split(".")[0]


def _register_use(ptx: str, compiler, options: dict) -> dict:
    """{"registers", "spill_bytes"} of a thread of the kernel in `ptx`, as ptxas -v reports them when
    Triton's compiler backend `compiler` assembles it with `options` (its own ptxas and flags, which
    differ between releases: 3.8 and 3.9 add --regAllocOptLevel=2), its log printed."""
    from triton import knobs

    log = io.StringIO()
    with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        compiler.make_cubin(ptx, {}, compiler.parse_options(options), compiler.target.arch)
    used = re.search(r"Used (\d+) registers", log.getvalue())
    spilled = re.search(r"(\d+) bytes spill stores", log.getvalue())
    return {"registers": int(used.group(1)) if used else None,
            "spill_bytes": int(spilled.group(1)) if spilled else None}


# What one SM holds, per compute capability (the CUDA programming guide's table of limits): registers,
# shared memory (bytes; each resident program reserves 1 KB more of it), warps, and programs.
SM_LIMITS = {100: (65536, 233472, 64, 32), 90: (65536, 233472, 64, 32), 89: (65536, 102400, 48, 24),
             80: (65536, 167936, 64, 32)}
REGISTER_UNIT = 256  # registers are allocated to a warp in units of this many
RESERVED_SHARED = 1024


def programs_per_sm(registers: int, shared: int, num_warps: int, capability: int) -> int:
    """How many programs (thread blocks) of a kernel one SM holds at once, by the first limit each
    meets: its registers (`registers` a thread), its shared memory, its warps. For a memory-bound
    kernel, one program an SM leaves nothing to run while that program waits for memory."""
    sm_registers, sm_shared, sm_warps, sm_programs = SM_LIMITS[capability]
    warp_registers = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    return min(sm_registers // warp_registers // num_warps, sm_shared // (shared + RESERVED_SHARED),
               sm_warps // num_warps, sm_programs)


def compile_jobs(jobs, *, workers: int = 1, progress=None, machine_code: bool = False) -> list:
    """Compile every job (in `workers` child processes when more than one), each into Triton's cache.

    Returns compile_job's result per job (with `machine_code`, what its machine code says too), in order;
    a job that fails to compile gives {"error": message} instead of raising, and the others go
    on. `progress(message)` hears of each job as it finishes.

    The children are fresh Python processes (`python -c`, not multiprocessing), so that nothing
    of the caller's script runs again in them, and without TRITON_INTERPRET, so that they compile
    even where this process interprets."""
    jobs = list(jobs)
    results = [None] * len(jobs)
    lock = threading.Lock()

    def done(i, result):
        with lock:
            results[i] = result
            if progress is not None:
                finished = sum(r is not None for r in results)
                progress(f"compiled {finished}/{len(jobs)}: {jobs[i].op or jobs[i].kernel[1]} {jobs[i].config}")

    if workers <= 1 or len(jobs) <= 1:
        for i, job in enumerate(jobs):
            done(i, _compile_or_error(job, machine_code))
        return results
    shares = [list(enumerate(jobs))[w::workers] for w in range(min(workers, len(jobs)))]
    threads = [threading.Thread(target=_run_worker, args=(share, done, machine_code)) for share in shares]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in range(len(jobs)):
        if results[i] is None:
            results[i] = {"error": "the compile worker stopped before this job"}
    return results


def _run_worker(share, done, machine_code):
    """One child process compiling `share` ([(index, job)]), each result reported to done(index, result)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-c", "from fused_resnet.kernels.precompile import _serve; _serve()"]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env) as child:
        pickle.dump((share, machine_code), child.stdin)
        child.stdin.close()
        for _ in share:
            try:
                index, result = pickle.load(child.stdout)
            except EOFError:
                break
            done(index, result)


def _serve():
    """A compile worker's main: ([(index, job)], machine_code) pickled on stdin, one (index, result)
    pickled on stdout per job."""
    out = sys.stdout.buffer
    sys.stdout = sys.stderr  # anything else printed must not mix with the results
    share, machine_code = pickle.load(sys.stdin.buffer)
    for index, job in share:
        pickle.dump((index, _compile_or_error(job, machine_code)), out)
        out.flush()


def _compile_or_error(job, machine_code=False):
    try:
        return compile_job(job, machine_code)
    except Exception as err:  # one config that does not compile must not stop the others
        return {"error": f"{type(err).__name__}: {err}"[:500]}
