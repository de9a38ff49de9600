"""Compiling ahead of the first launch (kernels.precompile): recording what a forward would compile,
and compiling it for a GPU on a machine without one.

The recording runs here, under the interpreter. Compiling needs Triton's compiler, which the
interpreter replaces, so those tests run in a child process without TRITON_INTERPRET; they compile
for an H100 (sm_90) with the ptxas that ships with Triton, no GPU needed.
"""

import json
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch
from conftest import H100_LAUNCHES, assert_close, load_benchmark, run_compiling
from fused_resnet.kernels import backend, configs, igemm, precompile
from fused_resnet.kernels.precompile import CompileJob
from torch import nn

from fused_resnet import FusedConv2d, kernels


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSED_RESNET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(configs, "_cache", None)
    monkeypatch.setattr(configs, "_table", {})


def layer(c, k, r, dtype=torch.float16):
    conv = nn.Conv2d(c, k, r, padding=r // 2, bias=False)
    bn = nn.BatchNorm2d(k).eval()
    return FusedConv2d.from_conv_bn(conv, bn, relu=True, dtype=dtype)


def test_records_each_candidate_and_launches_nothing(empty_cache, monkeypatch):
    fused = layer(64, 128, 1)
    x = torch.randn(2, 64, 8, 8).half().contiguous(memory_format=torch.channels_last)

    def no_launch(self, config):
        raise AssertionError("a launch was bound inside compile_only")

    monkeypatch.setattr(backend.KernelLaunch, "_bind", no_launch)
    with precompile.compile_only("H100") as jobs:
        y = fused(x)
    assert y.shape == (2, 128, 8, 8) and y.dtype == torch.float16
    gathered = configs.candidates(2 * 8 * 8, 128, 64, 2, switches={"FLAT_LOOP": 1, "USE_TMA": 0, "BOX_W": 0})
    gathered = configs.cap_stages(gathered, lambda c: 64 // c["BLOCK_K"])  # one trip over 64 channels: 2 stages
    # A dense 1x1: its first two shapes through tensor descriptors first, then gathered.
    assert [job.config for job in jobs] == [{**c, "USE_TMA": 1} for c in gathered[:2]] + gathered[:2]
    job = jobs[0]
    assert job.op == "conv2d_bias_act" and job.capability == 90
    assert job.kernel == ("fused_resnet.kernels.conv2d", "_conv2d_bias_act_kernel")
    # x, weight, bias, residual, shortcut weight, y: 16-byte aligned fp16 tensors and two Nones; then
    # split-K's scratch, None unsplit (one trip over 64 channels is not split)
    assert [a[0] for a in job.args] == ["tensor", "tensor", "tensor", "none", "none", "tensor", "none", "none"]
    assert job.kwargs["DOT_FP32"] is False  # compiled for the GPU, not interpreted
    assert job.kwargs["Cg"] == 64 and job.kwargs["R"] == 1


@pytest.mark.parametrize("gpu", ["H100", "A100", "L4"])
def test_plans_for_the_named_gpu(empty_cache, gpu):
    # CPU tensors plan as the named GPU would: its shared memory bounds the stages, and tensor
    # descriptors (dense 1x1s, box tiles) are tried only where it has TMA (compute capability 9.0).
    target = precompile.TARGETS[gpu]
    x = torch.randn(2, 64, 16, 16).half().contiguous(memory_format=torch.channels_last)
    with precompile.compile_only(gpu, every_candidate=True) as jobs:
        layer(64, 256, 1)(x)
        layer(64, 64, 3)(x)
    assert jobs and all(job.capability == target.capability for job in jobs)
    descriptors = [job.config for job in jobs if job.config.get("USE_TMA") or job.config.get("BOX_W")]
    has_tma = target.capability >= 90
    assert bool(descriptors) == has_tma
    assert {bool(c.get("USE_TMA")) for c in descriptors} == ({True, False} if has_tma else set())  # both kinds
    assert all(configs.gemm_shared_bytes(job.config, 2) <= target.shared_memory for job in jobs)
    with precompile.compile_only(gpu):
        assert igemm.launch_has_tma(x) == has_tma
        assert igemm.launch_multiprocessors(x) == target.multiprocessors
        assert igemm.launch_shared_memory(x) == target.shared_memory
    # Outside compile_only, CPU tensors (the interpreter's) plan as an H100 does.
    assert igemm.launch_has_tma(x) and igemm.launch_shared_memory(x) == precompile.TARGETS["H100"].shared_memory


def test_a_gpu_tensor_plans_for_its_own_device(monkeypatch):
    # On a GPU the limits come from the tensor's device (its driver), not from TARGETS; here the
    # driver is a stand-in for an A100's as device 1, and the tensor a stand-in on that device.
    import triton

    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: asked.append(i) or (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(multi_processor_count=108))

    class A100Utils:
        def get_device_properties(self, i):
            return {"max_shared_mem": 163 * 1024}

    driver = types.SimpleNamespace(active=types.SimpleNamespace(utils=A100Utils()))
    monkeypatch.setattr(triton.runtime, "driver", driver)
    precompile.device_target.cache_clear()
    try:
        x = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
        assert precompile.launch_target(x) == precompile.TARGETS["A100"]
        assert not igemm.launch_has_tma(x)
        assert (igemm.launch_multiprocessors(x), igemm.launch_shared_memory(x)) == (108, 163 * 1024)
        with precompile.compile_only("H100"):  # a named GPU is for CPU tensors only
            assert precompile.launch_target(x).capability == 80
        assert asked == [1]  # read once a device
    finally:
        precompile.device_target.cache_clear()


def test_table_entry_records_one_config_unless_every_candidate(empty_cache):
    fused = layer(16, 32, 3)
    x = torch.randn(1, 16, 6, 6).half().contiguous(memory_format=torch.channels_last)
    chosen = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 8, "FLAT_LOOP": 0, "USE_TMA": 0, "BOX_W": 0,
              "num_warps": 2, "num_stages": 2}
    with configs.override(chosen) as asked, precompile.compile_only("H100") as jobs:
        fused(x)
    assert [job.config for job in jobs] == [chosen]
    assert asked[0][:3] == ("H100", "conv2d_bias_act", "float16")
    with configs.override(chosen), precompile.compile_only("H100", every_candidate=True) as jobs:
        fused(x)
    assert len(jobs) > 1 and chosen not in [job.config for job in jobs]


def test_few_channel_fp32_candidates_hold_fewer_accumulators(empty_cache):
    # The 7x7 stem over its 3 channels, in fp32, holds its input runs beside the accumulator: its
    # 128x64 tile over 4 warps spilled (compiled for an H100), so its candidates keep at most
    # FEW_CHANNELS_FP32_MAX_ACC accumulators a thread; fp16's keep their wider tiles.
    most = {}
    for dtype in (torch.float32, torch.float16):
        x = torch.empty(8, 3, 64, 64, dtype=dtype).contiguous(memory_format=torch.channels_last)
        weight = torch.empty(64, 3, 7, 7, dtype=dtype).contiguous(memory_format=torch.channels_last)
        with precompile.compile_only("H100", every_candidate=True) as jobs:
            kernels.plan_conv2d_bias_act(x, weight, None, 2, 3, relu=True)(x, None)
        direct = [job.config for job in jobs if job.kwargs.get("Cg") == 3]  # (not space-to-depth's 16)
        assert len(direct) >= 2
        most[dtype] = max(c["BLOCK_M"] * c["BLOCK_N"] // (32 * c["num_warps"]) for c in direct)
    assert most[torch.float32] <= igemm.FEW_CHANNELS_FP32_MAX_ACC < most[torch.float16]


def test_plans_made_inside_stay_inside(empty_cache):
    fused = layer(8, 8, 3, dtype=torch.float32)
    x = torch.randn(1, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    with precompile.compile_only("H100") as jobs:
        fused(x)
    assert jobs
    # The same signature outside runs the interpreted kernel (the plan recorded above would launch
    # nothing, or the GPU build on CPU tensors), and gives the conv's answer.
    with torch.no_grad():
        expected = torch.relu(nn.functional.conv2d(x, fused.weight, fused.bias, padding=1))
    assert_close(fused(x), expected, rtol=1e-4, atol=1e-4)


def test_interpreted_launches_record_nothing():
    fused = layer(8, 8, 3, dtype=torch.float32)
    x = torch.randn(1, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    with precompile.compile_only() as jobs:
        fused(x)
    assert jobs == []


def test_refusals():
    with pytest.raises(ValueError, match="unknown GPU 'H800'"):
        with precompile.compile_only("H800"):
            pass
    job = CompileJob("", "", {"BLOCK_SIZE": 1024}, ("fused_resnet.kernels.add_relu", "_add_relu_kernel"),
                     (("tensor", torch.float32, True),) * 3, {"numel": 10}, 90)
    if backend.interpreting():
        with pytest.raises(RuntimeError, match="interpreter is on"):
            precompile.compile_job(job)
        assert "interpreter is on" in precompile.compile_jobs([job])[0]["error"]
    broken = CompileJob("", "", {}, ("fused_resnet.kernels.add_relu", "no_such_kernel"), (), {}, 90)
    assert "no_such_kernel" in precompile.compile_jobs([broken])[0]["error"]


# A child process without the interpreter: records a bottleneck's launches for an H100, compiles
# one job per kernel in two worker processes, then compiles them again here.
COMPILE_SCRIPT = textwrap.dedent("""
    import dataclasses, json, os, sys
    import torch, torchvision
    from fused_resnet import fuse
    from fused_resnet.kernels import precompile, configs

    torch.manual_seed(0)
    block = torchvision.models.resnet50().layer1[0].eval()  # compiled, not run: its numbers do not matter
    fused = fuse(block, dtype=torch.float16)
    # 48x48 maps: enough output tiles (72 of 64 rows) that no candidate is split-K
    x = torch.randn(2, 64, 48, 48).half().contiguous(memory_format=torch.channels_last)
    with precompile.compile_only("H100") as jobs:
        fused(x)
    first = {}
    for job in jobs:
        first.setdefault((job.op, job.key), job)  # one config per launch
    jobs = list(first.values())
    cache = os.environ["TRITON_CACHE_DIR"]
    before = [precompile.compiled(job) for job in jobs]
    cold = precompile.compile_jobs(jobs, workers=2)
    files = sum(len(f) for _, _, f in os.walk(cache))
    after = [precompile.compiled(job) for job in jobs]
    other = dataclasses.replace(jobs[0], config={**jobs[0].config, "num_warps": 2 * jobs[0].config["num_warps"]})
    import triton
    triton.knobs.compilation.always_compile = True  # TRITON_ALWAYS_COMPILE: a cached kernel compiles again
    always = precompile.compiled(jobs[0])
    triton.knobs.compilation.always_compile = False
    warm = precompile.compile_jobs(jobs)
    again = sum(len(f) for _, _, f in os.walk(cache))
    print(json.dumps({"launches": [[j.kernel[1], j.kwargs["R"], j.kwargs["EPILOGUE"]] for j in jobs],
                      "cold": cold, "warm": warm, "files": [files, again],
                      "compiled": [before, after, precompile.compiled(other), always]}))
""")


def test_compiles_for_an_h100_without_one(tmp_path):
    out = run_compiling(COMPILE_SCRIPT, tmp_path)
    # The bottleneck's three convs: 1x1, 3x3, and the last 1x1 with its merged projection shortcut.
    assert out["launches"] == [["_conv2d_bias_act_kernel", 1, "none"], ["_conv2d_bias_act_kernel", 3, "none"],
                               ["_conv2d_bias_act_kernel", 1, "shortcut"]]
    # Each first candidate reads through tensor descriptors: the 1x1s as dense GEMMs (the third's
    # projection shortcut, strided, gathered after it), the 3x3 as box tiles.
    assert all(r["tma_loads"] > 0 for r in out["cold"])
    for result in out["cold"]:
        assert "error" not in result, result
        # fp16 dots on Hopper's asynchronous tensor cores, fed by the TMA engine (and the
        # shortcut by asynchronous, pipelined copies).
        assert result["wgmma"] > 0, result
        assert result["shared"] > 0
    # The workers' compiles landed in Triton's cache: compiling again adds nothing to it.
    assert out["files"][0] > 0 and out["files"][0] == out["files"][1]
    # compiled() finds in the cache what the workers put there, and only that: none before, all
    # after, and not the same kernel at other warps (which warmup would then leave uncompiled).
    before, after, other, always = out["compiled"]
    assert before == [False] * 3 and after == [True] * 3 and other is False and always is False
    assert all("error" not in r for r in out["warm"])


# A child process without the interpreter: a bottleneck's first candidates planned for a B200 and
# compiled for it, with what their machine code says.
BLACKWELL_SCRIPT = textwrap.dedent("""
    import json
    import torch, torchvision
    from fused_resnet import fuse
    from fused_resnet.kernels import precompile

    block = torchvision.models.resnet50().layer1[0].eval()
    fused = fuse(block, dtype=torch.float16)
    # 4 images of 56x56: enough output tiles for a B200's 148 SMs that no first candidate is split-K
    x = torch.randn(4, 64, 56, 56).half().contiguous(memory_format=torch.channels_last)
    with precompile.compile_only("B200") as jobs:
        fused(x)
        sms = precompile.launch_target(x).multiprocessors
    first = {}
    for job in jobs:
        first.setdefault((job.op, job.key), job)
    jobs = list(first.values())
    print(json.dumps({"sms": sms, "capabilities": [job.capability for job in jobs],
                      "results": precompile.compile_jobs(jobs, machine_code=True)}))
""")


def test_compiles_for_a_b200_with_its_tensor_core_mma(tmp_path):
    # Blackwell (sm_100): Triton turns the same dots into tcgen05 MMAs, whose accumulator lives in
    # tensor memory, not Hopper's wgmma; the compile reports find them in the main loops.
    out = run_compiling(BLACKWELL_SCRIPT, tmp_path)
    assert out["sms"] == precompile.TARGETS["B200"].multiprocessors == 148
    assert out["capabilities"] == [100] * 3
    for result in out["results"]:
        assert "error" not in result, result
        assert result["tcgen05"] > 0 and result["wgmma"] == 0, result
        assert result["tma_loads"] > 0, result  # the first candidates read through tensor descriptors
        assert result["spill_bytes"] == 0 and result["programs_per_sm"] >= 1, result
    # The 3x3's main loop over its 9 taps, found in the machine code by its MMAs (the 1x1s over 64
    # channels make one trip, which the compiler does not keep as a loop).
    assert out["results"][1]["loop_mma"][0] > 0, out["results"][1]


def test_gpu_families_by_device_name():
    assert [configs.gpu_family(name) for name in ("NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA B200",
                                                  "NVIDIA GB200", "NVIDIA A100-SXM4-80GB", "NVIDIA RTX 6000")] == \
        ["H100", "H200", "B200", "B200", "A100", "NVIDIA RTX 6000"]
    assert set(precompile.TARGETS) == set(configs.GPU_FAMILIES)


VARIANTS_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from conftest import COMPILED_VARIANTS, VARIANT_TILES, make_case
    from fused_resnet import kernels
    from fused_resnet.kernels import configs, igemm, precompile

    found, copies = [], []
    for dtype in (torch.float16, torch.float32):
        for c, k, ksize, stride, padding, hw, switches in COMPILED_VARIANTS:
            switches = dict(switches)
            igemm.SPACE_TO_DEPTH = bool(switches.pop("SPACE_TO_DEPTH", 0))
            x, weight, bias = make_case(2, c, hw, hw, k, ksize, ksize, 1, dtype, device="cpu")
            with precompile.compile_only("H100") as jobs, configs.override({**VARIANT_TILES, **switches}):
                kernels.plan_conv2d_bias_act(x, weight, bias, stride, padding, relu=True)(x, None)
            found += [job for job in jobs if job.kernel[1] == "_conv2d_bias_act_kernel"]
            copies += [job for job in jobs if job.kernel[1] != "_conv2d_bias_act_kernel"]  # space-to-depth's
    print(json.dumps([precompile.compile_jobs(found, workers=2), precompile.compile_jobs(copies, workers=2)]))
""")


def test_every_kernel_variant_compiles_for_an_h100(tmp_path):
    # What each config switch asks of the compiler, checked without a GPU: the fp16 dots become
    # wgmma (fp32: TF32 wgmma), fed by asynchronous copies or by tensor-descriptor (TMA) copies.
    from conftest import COMPILED_VARIANTS

    results, copies = run_compiling(VARIANTS_SCRIPT, tmp_path)
    assert len(results) == 2 * len(COMPILED_VARIANTS)
    # The space-to-depth variants' input copy, a kernel of its own: fp16 and fp32.
    assert len(copies) >= 2 and all("error" not in r for r in copies), copies
    for i, ((c, *_, switches), result) in enumerate(zip(COMPILED_VARIANTS * 2, results)):
        assert "error" not in result, (switches, result)
        assert result["wgmma"] > 0, (switches, result)
        if switches["USE_TMA"] or switches["BOX_W"]:
            assert result["tma_loads"] > 0, (switches, result)
        elif switches["FLAT_LOOP"] and switches.get("ROWS", 1):
            assert result["async_copies"] > 0, (switches, result)
        if i < len(COMPILED_VARIANTS) and not (c == 3 and not switches.get("SPACE_TO_DEPTH")):
            # fp16: every load vectorized, but the 3-channel stem's own (runs of 21 at any offset),
            # and a box tile's bias: its accumulator, transposed, holds channels 8 apart in a
            # thread, so the bias loads as 2 elements a thread, once a tile.
            assert result["scalar_loads_16"] == (2 if switches["BOX_W"] else 0), (switches, result)


LOOP_SCRIPT = textwrap.dedent("""
    import json
    import torch
    from conftest import make_case
    from fused_resnet import kernels
    from fused_resnet.kernels import configs, precompile

    tiles = {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4,
             "FLAT_LOOP": 1, "USE_TMA": 0, "BOX_W": 0}
    found = []
    for ksize, box_w in ((3, 0), (1, 0), (3, 8)):
        x, weight, bias = make_case(2, 64, 14, 14, 64, ksize, ksize, 1, torch.float16, device="cpu")
        with precompile.compile_only("H100") as jobs, configs.override({**tiles, "BOX_W": box_w}):
            kernels.plan_conv2d_bias_act(x, weight, bias, 1, ksize // 2, relu=True)(x, None)
        found += jobs
    # The stem's conv + max pooling, as space-to-depth in the row schedule: its loop over pooling taps.
    x, weight, bias = make_case(2, 3, 64, 64, 64, 7, 7, 1, torch.float16, device="cpu")
    stem = {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3,
            "FLAT_LOOP": 1, "ROWS": 1}
    with precompile.compile_only("H100") as jobs, configs.override(stem):
        kernels.plan_conv2d_bias_act_maxpool(x, weight, bias, 2, 3, relu=True, pool_size=3, pool_stride=2,
                                             pool_padding=1)(x)
    found += [job for job in jobs if job.op]  # the pooled kernel, not its input's space-to-depth copy
    print(json.dumps(precompile.compile_jobs(found, workers=2, machine_code=True)))  # workers: not interpreted
""")


def test_the_main_loops_issue_less_than_their_tensor_cycles(tmp_path):
    # The machine code of the pipelined loop over (tap, channel block), fp16 128x64x64 tiles, 4
    # warps, compiled for an H100: a warp's instructions per iteration against the cycles its
    # wgmmas take the tensor cores (256). Gathered (8 m64n64k16): with the window's offsets and the
    # taps' bounds recomputed per row each iteration it was 350 (3x3) and 194 (1x1), so the loop
    # was bound by issuing its address arithmetic; now 177 and 120 (triton 3.8). Box tiles (4
    # m64n128k16, the product transposed): both operands come by TMA into shared memory, 86; with
    # the box as the first operand it went through registers, 150.
    # The stem's loop over pooling taps (16 m64n64k16 on 8 warps, 512 cycles): the filter rows' 4
    # runs of 64 as one reduction against a weight tile loaded once, before the loop, from a start
    # that moves by a scalar from tap to tap, 263 (triton 3.8); with the weight loaded again and
    # the window's start recomputed, clamped, per row and tap, 418 (559 with a compare-and-select
    # maximum).
    conv3x3, conv1x1, box3x3, stem = run_compiling(LOOP_SCRIPT, tmp_path)
    for result in (conv3x3, conv1x1):
        assert result["loop_mma"] == [8] and result["loop_tensor_cycles"] == [256], result
    assert conv3x3["loop_instructions"][0] < 0.8 * 256, conv3x3
    assert conv1x1["loop_instructions"][0] < 0.55 * 256, conv1x1
    assert box3x3["loop_mma"] == [4] and box3x3["loop_tensor_cycles"] == [256], box3x3
    assert box3x3["loop_instructions"][0] < 0.45 * 256 and box3x3["async_copies"] == 0, box3x3
    assert stem["loop_mma"] == [16] and stem["loop_tensor_cycles"] == [512], stem
    assert stem["loop_instructions"][0] < 0.6 * 512 and stem["spill_bytes"] == 0, stem


GROUPED_SCRIPT = textwrap.dedent("""
    import json
    import torch
    from fused_resnet import kernels
    from fused_resnet.kernels import precompile

    x = torch.empty(256, 128, 56, 56, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    weight = torch.empty(128, 4, 3, 3, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    with precompile.compile_only("H100", every_candidate=True) as jobs:
        kernels.plan_conv2d_bias_act(x, weight, None, 1, 1, groups=32, relu=True)(x, None)
    print(json.dumps([[job.kwargs["Cg"], result]
                      for job, result in zip(jobs, precompile.compile_jobs(jobs, workers=2, machine_code=True))]))
""")


def test_resnexts_small_groups_compile_to_dense_loops(tmp_path):
    # ResNeXt-50's first grouped 3x3 (32 groups of 4 channels), every candidate compiled for an
    # H100. As 32 groups of 4, the loop issued 33-36 instructions per tensor-core cycle and spilled
    # up to 1 KB of registers a thread; bundled into 2 groups of 64, as much as resnet50's 3x3s.
    found = run_compiling(GROUPED_SCRIPT, tmp_path)
    assert found
    for channels, result in found:
        assert channels == 64 and "error" not in result and result["spill_bytes"] == 0, result
        assert result["loop_instructions"][0] < 1.1 * result["loop_tensor_cycles"][0], result


HEAD_SCRIPT = textwrap.dedent("""
    import json
    import torch
    from fused_resnet import kernels
    from fused_resnet.kernels import precompile

    found = []
    for dtype in (torch.float16, torch.float32):
        x = torch.empty(256, 2048, 7, 7, dtype=dtype).contiguous(memory_format=torch.channels_last)
        w, b = torch.empty(1000, 2048, dtype=dtype), torch.empty(1000, dtype=dtype)
        with precompile.compile_only("H100", every_candidate=True) as jobs:
            kernels.avgpool_linear(x, w, b)
        found += jobs
    results = precompile.compile_jobs(found, workers=2, machine_code=True)
    print(json.dumps([[job.config, result] for job, result in zip(found, results)]))
""")


def test_the_heads_pooling_keeps_many_loads_in_flight(tmp_path):
    # ResNet-50's head (batch 256, 7x7x2048 maps, 1000 classes), every candidate compiled for an H100.
    # A warp of the pooling loop waits for memory about once an iteration. Read one pixel at a time
    # (64 images x 64 channels), an iteration held 4 loads a thread (87 instructions), and a
    # program waited 49 x 32 times; BLOCK_HW pixels a round hold 8-16 (fp16: 16 at 243 instructions
    # for 16x256x64 tiles on 8 warps) and wait 4 x 32 times.
    found = run_compiling(HEAD_SCRIPT, tmp_path)
    assert len(found) >= 5
    for config, result in found:
        assert "error" not in result and result["spill_bytes"] == 0, (config, result)
        assert len(result["load_loop_loads"]) == 1 and result["load_loop_loads"][0] >= 8, (config, result)


STEM_SCRIPT = textwrap.dedent("""
    import json
    import torch
    from fused_resnet import kernels
    from fused_resnet.kernels import precompile

    found = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = torch.empty(8, 3, 224, 224, dtype=dtype).contiguous(memory_format=torch.channels_last)
        weight = torch.empty(64, 3, 7, 7, dtype=dtype).contiguous(memory_format=torch.channels_last)
        with precompile.compile_only("H100") as jobs:  # its first call times both layouts: both are listed
            kernels.plan_conv2d_bias_act_maxpool(x, weight, None, 2, 3, relu=True, pool_size=3, pool_stride=2,
                                                 pool_padding=1)(x)
        # the pooled kernel's candidates, not the copy or the conv apart
        found += [job for job in jobs if job.op == "conv2d_bias_act_maxpool"]
    assert {job.kwargs["R"] for job in found} == {4, 7}  # over 2x2 blocks (space_to_depth), and as it is
    print(json.dumps([[job.config, result] for job, result in zip(found, precompile.compile_jobs(found, workers=2))]))
""")


def test_the_stems_candidates_fit_an_h100_in_every_dtype(tmp_path):
    # The pooled stem's row schedule keeps its weight tile in shared memory for the whole loop and
    # stages (BLOCK_M, 256) input runs: its candidates are pruned by that count
    # (conv2d_maxpool.shared_bytes), not the GEMM's, or the wider ones would not compile.
    found = run_compiling(STEM_SCRIPT, tmp_path)
    assert len(found) >= 6
    for config, result in found:
        assert "error" not in result, (config, result)
        assert 0 < result["shared"] <= 232448, (config, result)  # an H100's shared memory a block


IEEE_SCRIPT = textwrap.dedent("""
    import json
    import torch
    from fused_resnet import kernels
    from fused_resnet.kernels import precompile

    torch.backends.cudnn.allow_tf32 = False  # fp32 dots in IEEE precision: FMA units, operands in registers
    x = torch.empty(8, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    stem = torch.empty(64, 3, 7, 7).contiguous(memory_format=torch.channels_last)
    h = torch.empty(8, 128, 28, 28).contiguous(memory_format=torch.channels_last)
    conv = torch.empty(128, 128, 3, 3).contiguous(memory_format=torch.channels_last)
    with precompile.compile_only("H100") as jobs:
        kernels.plan_conv2d_bias_act_maxpool(x, stem, None, 2, 3, relu=True, pool_size=3, pool_stride=2,
                                             pool_padding=1)(x)
        kernels.plan_conv2d_bias_act(h, conv, None, 1, 1, residual=h, relu=True)(h, h)
    # the pooled stem, over either layout, and the 3x3 (not the stem's conv apart, which the pooled
    # stem's first call times too)
    found = [job for job in jobs if job.op == "conv2d_bias_act_maxpool" or job.kwargs.get("R") == 3]
    assert {job.kwargs["R"] for job in found if job.op == "conv2d_bias_act_maxpool"} == {4, 7}
    results = precompile.compile_jobs(found, workers=2, machine_code=True)
    print(json.dumps([[job.op, job.kwargs["R"], job.config, result] for job, result in zip(found, results)]))
""")


def test_fp32_ieee_candidates_do_not_spill(tmp_path):
    # Compiled for an H100, in IEEE fp32 the stem's pooled kernel spilled 3296 bytes a thread at
    # 64x64 over 4 warps, and a 3x3's 64x128x32 tile over 4 warps 8: IEEE fp32 takes
    # IEEE_FP32_SHAPES (at most 32 accumulators a thread), the stem at most 16.
    # Triton 3.9 compiles for Hopper with CUDA 13's ptxas, which holds the pooled stem's
    # space-to-depth candidates (a 4x4 conv) at 56-64 registers a thread, spilling 4.5-6.3 KB,
    # where 3.6 and 3.8 give them 200-242 and spill nothing. (Their first call also times the
    # direct layout, which does not spill, and the pooling apart.)
    import triton

    ptxas_13 = backend._release(triton.__version__) >= (3, 9)
    found = run_compiling(IEEE_SCRIPT, tmp_path)
    assert {op for op, _, _, _ in found} == {"conv2d_bias_act_maxpool", "conv2d_bias_act"}
    for op, taps, config, result in found:
        assert "error" not in result, (op, config, result)
        if not (ptxas_13 and op == "conv2d_bias_act_maxpool" and taps == 4):
            assert result["spill_bytes"] == 0, (op, config, result)
        per_thread = 16 if op == "conv2d_bias_act_maxpool" else 32
        assert config["BLOCK_M"] * config["BLOCK_N"] <= per_thread * 32 * config["num_warps"], (op, config)


# IEEE fp32 kernels, where the ptxas flags tell: a stride-2 3x3 over 512 channels and a 1x1 with
# its projection shortcut (layer1.0's conv3), every candidate, compiled for an H100.
IEEE_LAUNCHES = textwrap.dedent("""
    import torch
    from fused_resnet import kernels
    from fused_resnet.kernels import precompile

    torch.backends.cudnn.allow_tf32 = False
    cl = lambda *shape: torch.empty(*shape).contiguous(memory_format=torch.channels_last)
    x3, w3 = cl(256, 512, 14, 14), cl(512, 512, 3, 3)
    x1, w1, ws = cl(256, 64, 56, 56), cl(256, 64, 1, 1), cl(256, 64, 1, 1)
    with precompile.compile_only("H100", every_candidate=True) as jobs:
        kernels.plan_conv2d_bias_act(x3, w3, None, 2, 1, relu=True)(x3, None)
        kernels.plan_conv2d_bias_act(x1, w1, None, relu=True, residual=x1, shortcut_weight=ws)(x1, x1)
""")

REGISTERS_SCRIPT = IEEE_LAUNCHES + textwrap.dedent("""
    import json, os, re, subprocess, tempfile
    import triton
    from triton import knobs

    found = []
    for job in jobs:
        result = precompile.compile_job(job, machine_code=True)
        source, target, _, options = precompile._source(job)
        cubin = triton.compile(source, target=target, options=options).asm["cubin"]  # (Triton's cache)
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "kernel.cubin")
            with open(path, "wb") as f:
                f.write(cubin)
            usage = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", path], capture_output=True,
                                   text=True, check=True).stdout
        found.append([job.config, result["registers"], result["spill_bytes"],
                      int(re.search(r"REG:(\\d+)", usage).group(1)), int(re.search(r"STACK:(\\d+)", usage).group(1))])
    print(json.dumps(found))
""")


def test_compile_reports_read_the_registers_of_the_kernel_triton_built(tmp_path):
    # A report's registers and spills come from Triton's own ptxas step, with its flags: on triton
    # 3.9 a plain `ptxas -v` (no --regAllocOptLevel=2) gave the 3x3's 64x64x32 candidate 128
    # registers a thread where the kernel Triton builds takes 156, and the 1x1's 128x64 ones no
    # spill where they spill 12 bytes. Checked against the machine code Triton built (cuobjdump).
    found = run_compiling(REGISTERS_SCRIPT, tmp_path)
    assert len(found) >= 6
    for config, registers, spill_bytes, built_registers, stack in found:
        assert registers == built_registers, (config, registers, built_registers)
        assert (spill_bytes > 0) == (stack > 0), (config, spill_bytes, stack)


FP_FUSION_SCRIPT = IEEE_LAUNCHES + textwrap.dedent("""
    import collections, dataclasses, json, re
    import triton

    h = torch.empty(8, 3, 224, 224, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    stem = torch.empty(64, 3, 7, 7, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    f = torch.empty(8, 2048, 7, 7, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    fc = torch.empty(1000, 2048, dtype=torch.float16)
    with precompile.compile_only("H100") as more:
        kernels.plan_conv2d_bias_act_maxpool(h, stem, None, 2, 3, relu=True, pool_size=3, pool_stride=2,
                                             pool_padding=1)(h)
        kernels.plan_avgpool_linear(f, fc, fc[:, 0])(f)
    firsts = {}
    for job in jobs + more:  # each launch's first candidate
        firsts.setdefault((job.kernel, job.key), job)

    def float_arithmetic(job, fusion):
        source, target, _, options = precompile._source(dataclasses.replace(job, config={**job.config,
                                                                                          "enable_fp_fusion": fusion}))
        assert options["enable_fp_fusion"] is fusion
        sass = precompile.disassemble(triton.compile(source, target=target, options=options).asm["cubin"])
        opcodes = re.findall(r"/\\*[0-9a-f]{4,}\\*/\\s*(?:@!?U?P[T\\d]+\\s+)?([A-Z0-9]+(?:\\.[A-Z0-9]+)*)", sass)
        # (HFMA2.MMA with zero operands is how ptxas clears or moves a register, not arithmetic)
        return collections.Counter(op.split(".")[0] for op in opcodes
                                   if op.split(".")[0] in ("FADD", "FMUL", "FFMA", "HADD2", "HMUL2", "HFMA2")
                                   and ".MMA" not in op)

    print(json.dumps([[job.op, job.key, float_arithmetic(job, True), float_arithmetic(job, False)]
                      for job in firsts.values()]))
""")


def test_the_kernels_float_arithmetic_does_not_depend_on_fp_fusion(tmp_path):
    # Triton 3.9 warns that TRITON_DEFAULT_FP_FUSION, unset, will mean no FP fusion (no fused
    # multiply-adds from a multiply and an add) from 3.10. Our kernels' dots lower to MMAs, or in
    # IEEE fp32 to explicit FMAs, and their epilogues add: compiled for an H100 with fusion on and
    # off, each holds the same floating-point instructions (the pooled stem and the head in fp16,
    # IEEE fp32 convs with a projection shortcut); only the schedule of the others may move.
    found = run_compiling(FP_FUSION_SCRIPT, tmp_path)
    assert {op for op, _, _, _ in found} >= {"conv2d_bias_act", "conv2d_bias_act_maxpool", "avgpool_linear"}
    assert sum(fused.get("FFMA", 0) for _, _, fused, _ in found) > 1000  # the IEEE dots
    for op, key, fused, unfused in found:
        assert fused == unfused, (op, key, fused, unfused)


WARMUP_SCRIPT = textwrap.dedent("""
    import json, os, pathlib
    import torch, torchvision
    from fused_resnet import fuse, modules

    torch.manual_seed(0)
    fused = fuse(torchvision.models.resnet18().eval(), dtype=torch.float16).cuda()
    x = torch.randn(4, 3, 64, 64, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    cubins = lambda: len(list(pathlib.Path(os.environ["TRITON_CACHE_DIR"]).rglob("*.cubin")))
    real, ahead = modules._compile_ahead, []
    modules._compile_ahead = lambda *args: (real(*args), ahead.append(cubins()))
    fused(x)  # a plain first call: fuse's CompileAhead hook compiles the kernels first
    torch.cuda.synchronize()
    print(json.dumps([ahead, cubins()]))
""")


@pytest.mark.gpu
def test_a_plain_first_call_compiles_ahead_everything_the_forward_compiles(tmp_path):
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "triton"), "FUSED_RESNET_CACHE_DIR": str(tmp_path / "c")}
    done = subprocess.run([sys.executable, "-c", WARMUP_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ahead, after = json.loads(done.stdout.strip().splitlines()[-1])
    # The hook listed and compiled once; the forward (which times each launch's candidates) then
    # found every kernel compiled: the cache keys match.
    assert len(ahead) == 1 and ahead[0] > 0 and after == ahead[0]


JIT_KEY_SCRIPT = H100_LAUNCHES + textwrap.dedent("""
    import json, os, pathlib
    import triton
    from fused_resnet.kernels import precompile

    precompile.compile_jobs(jobs, workers=2)
    cubins = lambda: sorted(p.name for p in pathlib.Path(os.environ["TRITON_CACHE_DIR"]).rglob("*.cubin"))
    ahead = cubins()
    # Each candidate as a launch compiles it: Triton's JIT (warmup: compile, no launch), for an H100.
    triton.runtime.driver.set_active(StandInDriver())
    calls = 0
    for launch, tensors in launches:
        for config in [launch.config] if launch.config is not None else launch.candidates:
            scratch = () if launch.scratch is None else launch.scratch(config)(tensors[0])
            launch.kernel.warmup(*tensors, *scratch, grid=launch.grid(config), **{**launch.args, **config})
            calls += 1
    print(json.dumps({"jobs": len(jobs), "calls": calls, "ahead": ahead, "after": cubins(),
                      "descriptors": sum(bool(j.config.get("USE_TMA") or j.config.get("BOX_W")) for j in jobs),
                      "split": sum(j.config.get("SPLIT_K", 1) > 1 for j in jobs)}))
""")


def test_what_is_compiled_ahead_is_what_a_launch_looks_up(tmp_path):
    # Compiling ahead (warmup, the sweep's workers) pays only if a launch then finds each kernel in
    # Triton's cache: the key precompile compiles under must be the one Triton's JIT computes for
    # the launch. Checked here without a GPU: the JIT, given a stand-in for an H100's driver,
    # compiles each candidate of two bottlenecks' convs, the stem's and the head's (warmup: no
    # launch) into the cache the compile-ahead filled, and makes no kernel of its own.
    found = run_compiling(JIT_KEY_SCRIPT, tmp_path)
    assert found["calls"] >= found["jobs"] > 0 and found["descriptors"] > 0 and found["split"] > 0
    assert {"_conv2d_bias_act_maxpool_kernel.cubin", "_space_to_depth_kernel.cubin"} <= set(found["ahead"])
    # (jobs that differ only in a scalar the compiler does not specialize on share a kernel)
    assert 0.9 * found["jobs"] <= len(found["ahead"]) <= found["jobs"]
    assert found["after"] == found["ahead"]


def test_programs_per_sm_meet_the_first_limit():
    # An H100 SM: 64K registers (a warp's in units of 256), 228 KB of shared memory (1 KB more
    # reserved a program), 64 warps, 32 programs.
    assert precompile.programs_per_sm(143, 65552, 8, 90) == 1  # 144 x 256 threads = 36,864 registers
    assert precompile.programs_per_sm(101, 65552, 8, 90) == 2  # 104 x 256 = 26,624: two fit
    assert precompile.programs_per_sm(58, 98320, 4, 90) == 2  # shared memory: 2 x 97 KB of 228
    assert precompile.programs_per_sm(32, 0, 4, 90) == 16  # warps: 16 x 4 of 64
    assert precompile.programs_per_sm(16, 0, 1, 90) == 32  # programs: at most 32
    # The same kernel on an L4 (sm_89: 100 KB of shared memory an SM, 48 warps).
    assert precompile.programs_per_sm(58, 49168, 4, 89) == 2 and precompile.programs_per_sm(32, 0, 4, 89) == 12


def test_compile_report(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FUSED_RESNET_CACHE_DIR"] = str(tmp_path / "cache")
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "compile_report.py")
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, script, "--arch", "resnet18", "--batch", "1", "--size", "32", "--limit", "3",
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads(out.read_text())
    copy, *cases = payload["cases"]
    # First the stem's space-to-depth copy of the input (a kernel with a fixed config, no op in the
    # table), then its conv+maxpool in the row schedule, compiled twice (two candidate configs).
    assert copy["op"] == "" and copy["launch"] == "_space_to_depth_kernel" and "error" not in copy
    assert [c["op"] for c in cases] == ["conv2d_bias_act_maxpool"] * 2
    assert all(c["config"]["ROWS"] == 1 and c["seconds"] > 0 and c["wgmma"] > 0 for c in cases), cases
    # ptxas's count of a thread's registers; the pooled kernel's candidates fit without spilling.
    assert all(0 < c["registers"] <= 255 and c["spill_bytes"] == 0 for c in cases), cases
    # The programs an SM holds, as those registers and the shared memory allow.
    assert all(c["programs_per_sm"] == precompile.programs_per_sm(c["registers"], c["shared"], c["num_warps"], 90)
               for c in cases), cases
    assert payload["summary"]["one_per_sm"] == sum(c["programs_per_sm"] == 1 for c in [copy, *cases])
    # Its machine code: one main loop of warpgroup MMAs a pooling tap, its issue against their cycles.
    assert all(len(c["loop_instructions"]) == 1 and c["loop_tensor_cycles"][0] > 0 for c in cases), cases
    assert payload["summary"]["issue_ratio_max"] > 0
    assert "instructions per tensor-core cycle" in done.stdout
    assert payload["summary"]["jobs"] == 3 and payload["summary"]["failed"] == 0
    assert "compile_report.py --arch resnet18" in payload["provenance"]["command"]
    assert payload["provenance"]["path"].startswith("compiled here for H100 (sm_90)")
    assert "3 kernels for H100 (resnet18, float16, batch 1)" in done.stdout


def test_compile_report_of_the_sweep(tmp_path):
    # --sweep compiles what benchmarks/sweep_convs.py compiles: its configs, layer by layer, the
    # stem first, each case naming its layer.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FUSED_RESNET_CACHE_DIR"] = str(tmp_path / "cache")
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "compile_report.py")
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, script, "--sweep", "--batch", "1", "--size", "32", "--limit", "2",
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads(out.read_text())
    cases = payload["cases"]
    assert [c["sweep_layer"] for c in cases] == ["C3 K64 7x7/2 32x32 +maxpool"] * 2
    # The stem's pooled kernel over its pixels as they are, in the sweep's first two configs.
    assert [c["op"] for c in cases] == ["conv2d_bias_act_maxpool"] * 2
    assert all("error" not in c and c["seconds"] > 0 for c in cases), cases
    assert cases[0]["config"] != cases[1]["config"]
    assert payload["summary"]["sweep"] is True and payload["summary"]["jobs"] == 2
    assert "2 kernels for H100 (the sweep's configs of resnet50, float16, batch 1)" in done.stdout
    refused = subprocess.run([sys.executable, script, "--sweep", "--arch", "resnet18"], env=env,
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "--sweep compiles the sweep's configs of resnet50" in refused.stderr


def test_compile_report_of_a_dilated_network(monkeypatch, empty_cache):
    # --dilated records the arch with replace_stride_with_dilation=[False, True, True]: layer3's 3x3
    # convs 2 apart, layer4's 4 apart (its first block's at layer3's 2), each named so. Only the
    # recording runs here (it needs no compiler); the compiling is replaced by a stand-in that
    # hands every job back uncompiled.
    report = load_benchmark("compile_report")
    recorded = []

    def not_compiled(jobs, workers, machine_code):
        recorded.extend(jobs)
        return [{"error": "not compiled here"} for _ in jobs]

    monkeypatch.setattr(report.precompile, "compile_jobs", not_compiled)
    cases = report.main(["--arch", "resnet50", "--dilated", "--batch", "1", "--size", "32"])
    assert len(cases) == len(recorded) > 0 and {c["arch"] for c in cases} == {"resnet50-dilated"}
    dilated = {c["launch"] for c in cases if " dil" in c["launch"]}
    assert dilated == {"conv: C256 K256 3x3 4->4 dil2", "conv: C512 K512 3x3 4->4 dil2",
                       "conv: C512 K512 3x3 4->4 dil4"}, dilated
    plain = report.main(["--arch", "resnet50", "--batch", "1", "--size", "32"])
    assert not any(" dil" in c["launch"] for c in plain)
    with pytest.raises(SystemExit) as refused:
        report.main(["--arch", "resnet18", "--dilated"])
    assert refused.value.code == 2
