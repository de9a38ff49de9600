"""CUDA graphs for inference: a module captured once per input signature and replayed.

A replay launches every kernel of the forward with one call and no Python, so what the CPU
spends per layer (argument handling, launches) disappears: at small batch that is most of the
time. `fuse(model, cuda_graph=True)` wraps the fused model in a CUDAGraphModule; any module works.
"""

import contextlib
from typing import NamedTuple

import torch
from torch import nn

from . import kernels, modules
from .kernels.backend import CaptureCounts


class CapturedGraph(NamedTuple):
    static_x: torch.Tensor  # the input buffer a call copies x into
    graph: "torch.cuda.CUDAGraph"
    static_out: torch.Tensor  # the output buffer the graph writes
    counts: CaptureCounts  # split-K's counters, zeroed once for the graph
    # The graph reads the tensors its launches were given, some held by the fused layers' plans
    # alone (weights laid out for the kernel): held here too, a plan that its layer lets go
    # (MAX_PLANS) frees nothing that the graph reads.
    plans: list


class CUDAGraphModule(nn.Module):
    """module(x) replayed from a CUDA graph captured for x's signature (shape, strides, dtype,
    device, the dtype torch.autocast computes in, if on, the kernels backend and, for float32, the TF32
    settings in force).

    The first call with a new signature runs the module a few times on a side stream (autotuning,
    compilation and lazy initialisation must not happen during capture; a module that holds fused
    layers is first warmed up by fused_resnet.warmup, which compiles their kernels in parallel),
    captures one forward with a static input buffer, then replays it; later calls copy x into that
    buffer and replay.
    Graphs of one module share a memory pool and the side stream of their warm-up runs, and at
    most `max_graphs` are kept (the oldest goes). The counters of split-K launches are zeroed
    once, before capture, for each graph (kernels.backend.CaptureCounts), rather than by a memset
    in the graph at each replay.

    What a call returns: by default a new tensor, a copy of the graph's output, which stays valid
    whatever happens next. With `copy_output=False` it is the graph's own output buffer: no copy,
    but the next call with the same signature overwrites it, so use or copy it before then.

    CPU tensors run the module as it is, with no graph. Inference only: calls run under
    torch.no_grad(). A fused layer given new weights (load_state_dict, a buffer assigned), moved or
    cast drops its launch plans, some of which hold copies of its weights laid out for the kernel,
    and the next call captures the graph again (the drops are counted for the whole process, one
    number to compare a call: another fused network moved or loaded costs this one a capture too);
    a module of other kinds is expected not to change between calls other than in place (its
    weights are read in place).
    """

    def __init__(self, module: nn.Module, *, copy_output: bool = True, warmup: int = 3, max_graphs: int = 8):
        super().__init__()
        if warmup < 1 or max_graphs < 1:
            raise ValueError(f"CUDAGraphModule: warmup and max_graphs must be at least 1, got {warmup}, {max_graphs}")
        self.module = module
        self.copy_output = copy_output
        self.warmup = warmup
        self.max_graphs = max_graphs
        self._graphs = {}
        self._pool = None
        self._streams = {}  # the side stream of each device's warm-up runs, one a device (per-stream scratch)
        self._plans_seen = modules.PlannedLayer.plans_dropped

    def forward(self, x):
        if not isinstance(x, torch.Tensor) or not x.is_cuda:
            with torch.no_grad():
                return self.module(x)
        if self._plans_seen != modules.PlannedLayer.plans_dropped:
            # A fused layer dropped its plans: the graphs would replay the old ones' launches.
            self._graphs, self._plans_seen = {}, modules.PlannedLayer.plans_dropped
        key = (x.shape, x.stride(), x.dtype, x.device, kernels.current_backend(), kernels.backend.call_settings(x))
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(x)
            if len(self._graphs) >= self.max_graphs:
                del self._graphs[next(iter(self._graphs))]
            self._graphs[key] = entry
        entry.static_x.copy_(x)
        entry.graph.replay()
        return entry.static_out.clone() if self.copy_output else entry.static_out

    @torch.no_grad()
    def _capture(self, x):
        static_x = x.clone()
        if any(isinstance(m, modules.PlannedLayer) for m in self.module.modules()):
            modules.warmup(self.module, static_x)  # (fused_resnet.warmup; self.warmup counts the runs below)
        stream = self._streams.get(x.device)
        if stream is None:
            stream = self._streams[x.device] = torch.cuda.Stream(device=x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        counts = CaptureCounts()  # split-K's counters, zeroed once for the graph (kept with it)
        with torch.cuda.stream(stream):
            for i in range(self.warmup):
                with counts.measuring() if i == self.warmup - 1 else contextlib.nullcontext():
                    self.module(static_x)
        torch.cuda.current_stream(x.device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with counts.serving(x.device), torch.cuda.graph(graph, pool=self._pool):
            static_out = self.module(static_x)
        plans = [m._plans.copy() for m in self.module.modules() if isinstance(m, modules.PlannedLayer)]
        return CapturedGraph(static_x, graph, static_out, counts, plans)

    def _apply(self, fn, *args, **kwargs):
        self._graphs = {}  # the captured graphs hold the old tensors' addresses
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_graphs"], state["_pool"], state["_streams"] = {}, None, {}
        return state

    def extra_repr(self):
        return f"copy_output={self.copy_output}, graphs={len(self._graphs)}"
