"""Kernel configs without long autotuning: the shipped table, the disk cache, the bucketed keys, the
small candidate sets, the choice at a plan's first launch, and fused_resnet.warmup.

Without a GPU the choice runs against a table written for the test, a made-up GPU name and
made-up timings; the launches themselves run interpreted.
"""

import collections
import json
import pickle
import warnings

import pytest
import torch
import torchvision
from conftest import DEVICE, HAS_CUDA
from fused_resnet.kernels import backend, configs, precompile
from fused_resnet.kernels.add_relu import _add_relu_kernel

from fused_resnet import fuse, kernels, warmup
from fused_resnet.validate import synthetic_batchnorm

H100 = "NVIDIA H100 80GB HBM3"


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty disk cache in tmp_path and a shipped table written by the test."""
    table = tmp_path / "tuned_configs.json"
    table.write_text(json.dumps({"version": 1, "entries": [
        {"gpu": "H100", "op": "add_relu_test", "dtype": "float32", "key": "shipped",
         "config": {"BLOCK_SIZE": 512, "num_warps": 4}},
    ]}))
    monkeypatch.setenv("FUSED_RESNET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(configs, "TABLE_PATH", table)
    monkeypatch.setattr(configs, "_table", None)
    monkeypatch.setattr(configs, "_cache", None)
    yield tmp_path


def test_gpu_families():
    assert configs.gpu_family(H100) == "H100"
    assert configs.gpu_family("NVIDIA H200") == "H200"
    assert configs.gpu_family("NVIDIA GeForce RTX 4090") == "NVIDIA GeForce RTX 4090"


def test_keys_bucket_the_batch_but_not_the_layer():
    layer = dict(Kg=64, Cg=64, R=3, S=3, H=56, W=56, stride_h=1, EPILOGUE="residual")
    # M = batch * 3136 rows: batches 180 to 334 share the bucket 2**20, 400 is in the next one.
    by_batch = {b: configs.shape_key(M=b * 56 * 56, **layer) for b in (180, 256, 400)}
    assert by_batch[180] == by_batch[256] != by_batch[400]
    assert "M=1048576" in by_batch[256] and "M=2097152" in by_batch[400]
    assert configs.shape_key(M=256 * 3136, **{**layer, "Cg": 128}) != by_batch[256]
    assert "EPILOGUE=residual" in by_batch[256]
    assert configs.bucket(1) == 16 and configs.bucket(17) == 32


def test_table_then_cache_then_nothing(fresh):
    assert configs.lookup("H100", "add_relu_test", "float32", "shipped") == {"BLOCK_SIZE": 512, "num_warps": 4}
    assert configs.lookup("H100", "add_relu_test", "float32", "tuned") is None
    configs.remember("H100", "add_relu_test", "float32", "tuned", {"BLOCK_SIZE": 256, "num_warps": 2})
    stored = json.loads((fresh / "cache" / "configs.json").read_text())
    assert stored["entries"] == [{"gpu": "H100", "op": "add_relu_test", "dtype": "float32", "key": "tuned",
                                  "config": {"BLOCK_SIZE": 256, "num_warps": 2}}]
    configs._cache = None  # as a new process would start
    assert configs.lookup("H100", "add_relu_test", "float32", "tuned") == {"BLOCK_SIZE": 256, "num_warps": 2}
    configs.clear_cache()
    assert not (fresh / "cache" / "configs.json").exists()
    assert configs.lookup("H100", "add_relu_test", "float32", "tuned") is None
    assert configs.lookup("H100", "add_relu_test", "float32", "shipped") is not None  # the table stays


def test_processes_that_tune_at_once_keep_each_others_configs(fresh):
    assert configs.lookup("H100", "add_relu_test", "float32", "mine") is None  # this process has read the file
    configs.remember("H100", "add_relu_test", "float32", "mine", {"BLOCK_SIZE": 256})
    other = json.loads((fresh / "cache" / "configs.json").read_text())  # another process stores one since
    other["entries"].append({"gpu": "H100", "op": "add_relu_test", "dtype": "float32", "key": "theirs",
                             "config": {"BLOCK_SIZE": 1024}})
    (fresh / "cache" / "configs.json").write_text(json.dumps(other))
    configs.remember("H100", "add_relu_test", "float32", "mine too", {"BLOCK_SIZE": 128})
    stored = json.loads((fresh / "cache" / "configs.json").read_text())
    assert sorted(e["key"] for e in stored["entries"]) == ["mine", "mine too", "theirs"]


def test_a_cache_folder_that_cannot_be_written_costs_a_warning_not_the_call(fresh, monkeypatch):
    blocked = fresh / "a file"
    blocked.write_text("")
    monkeypatch.setenv("FUSED_RESNET_CACHE_DIR", str(blocked / "cache"))  # under a file: no folder there
    monkeypatch.setattr(configs, "_unwritable", None)
    with pytest.warns(UserWarning, match="cannot write the tuned-config cache in .*FUSED_RESNET_CACHE_DIR"):
        configs.remember("H100", "add_relu_test", "float32", "mine", {"BLOCK_SIZE": 256})
    assert configs.lookup("H100", "add_relu_test", "float32", "mine") == {"BLOCK_SIZE": 256}  # kept here
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        configs.remember("H100", "add_relu_test", "float32", "mine too", {"BLOCK_SIZE": 128})


def test_a_damaged_cache_is_ignored(fresh):
    (fresh / "cache").mkdir()
    (fresh / "cache" / "configs.json").write_text("{not json")
    assert configs.lookup("H100", "add_relu_test", "float32", "tuned") is None
    configs.remember("H100", "add_relu_test", "float32", "tuned", {"BLOCK_SIZE": 128})
    assert json.loads((fresh / "cache" / "configs.json").read_text())["entries"][0]["key"] == "tuned"


@pytest.mark.parametrize("m,n,reduction,element", [(802816, 64, 64, 2), (6272, 2048, 512, 2), (49, 512, 4608, 2),
                                                   (802816, 64, 147, 4), (8, 10, 3, 2)])
def test_candidates_are_few_and_fit(m, n, reduction, element):
    found = configs.candidates(m, n, reduction, element, shared_memory=160 * 1024)
    assert 1 <= len(found) <= 4
    for c in found:
        assert (c["BLOCK_M"] + c["BLOCK_N"]) * c["BLOCK_K"] * element * c["num_stages"] <= 160 * 1024
        assert c["BLOCK_M"] <= max(16, 2 ** (m - 1).bit_length()) and c["BLOCK_K"] <= max(16, 2 ** (reduction - 1)
                                                                                           .bit_length())
    if element == 4:
        assert max(c["BLOCK_K"] for c in found) <= 32  # fp32 gets its own, smaller tiles


@pytest.mark.parametrize("images,classes,channels,pixels,element", [(256, 1000, 2048, 49, 2), (1, 1000, 2048, 49, 2),
                                                                    (256, 1000, 2048, 49, 4), (3, 10, 40, 1, 2)])
def test_head_candidates_are_few_capped_and_read_several_pixels(images, classes, channels, pixels, element):
    found = configs.head_candidates(images, classes, channels, pixels, element)
    assert 1 <= len(found) <= 4 and len(configs.head_candidates(images, classes, channels, pixels, element,
                                                                 sweep=True)) >= len(found)
    for c in found:
        assert c["BLOCK_M"] <= max(16, 2 ** (images - 1).bit_length())
        assert c["BLOCK_N"] <= max(16, 2 ** (classes - 1).bit_length())
        assert min(8, pixels) <= c["BLOCK_HW"] <= 2 ** (pixels - 1).bit_length()  # several pixels at once
    if element == 4:
        assert max(c["BLOCK_K"] for c in found) <= 32  # fp32 gets its own, smaller tiles
    # Split-K over the channel blocks where the tiles are few (at batch 1, 4 to 16; at 256, 64 of
    # 16x256): those of the first two split first, in enough ways to fill 132 SMs once, with 4
    # channel blocks or more each
    split = [c for c in found if c.get("SPLIT_K", 1) > 1]
    if images in (1, 256):
        assert found[0]["SPLIT_K"] > 1 and len(split) == (2 if images == 1 else 1)  # (at 256, 16x128 makes 128)
    for c in split:
        blocks = -(-channels // c["BLOCK_K"])
        tiles = -(-images // c["BLOCK_M"]) * -(-classes // c["BLOCK_N"])
        assert tiles * 2 < 132 and blocks // c["SPLIT_K"] >= configs.MIN_SPLIT_TRIPS
        assert tiles * c["SPLIT_K"] <= 132 + tiles


def test_a_short_main_loop_gets_no_more_stages_than_it_fills():
    trips = lambda c: 64 // c["BLOCK_K"]  # noqa: E731 (a reduction of 64 channels)
    found = configs.cap_stages([{"BLOCK_K": 64, "num_stages": 4}, {"BLOCK_K": 32, "num_stages": 4},
                                {"BLOCK_K": 16, "num_stages": 3}, {"BLOCK_K": 64, "num_stages": 3}], trips)
    assert found == [{"BLOCK_K": 64, "num_stages": 2}, {"BLOCK_K": 32, "num_stages": 3},
                     {"BLOCK_K": 16, "num_stages": 3}]
    # In a conv's candidates: a 1x1 over 64 channels makes one trip of 64, so 2 stages (48 KB of
    # shared memory at 128x64x64 in fp16, 4 programs an SM, not 2); over 256 it keeps its stages.
    stages = {}
    for c in (64, 256):
        x = torch.empty(256, c, 56, 56, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
        w = torch.empty(64, c, 1, 1, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
        with precompile.compile_only("H100", every_candidate=True) as jobs:
            kernels.plan_conv2d_bias_act(x, w, None, 1, 0, relu=True)(x, None)
        stages[c] = {job.config["num_stages"] for job in jobs}
    assert stages[64] == {2} and max(stages[256]) >= 3


def launch_of(key, timings, monkeypatch):
    """A KernelLaunch of the add_relu kernel that must choose its config, on a made-up H100."""
    monkeypatch.setattr(backend, "_device_name", lambda index: H100)
    timed = []

    def fake_time(self, config, tensors):
        timed.append(config["BLOCK_SIZE"])
        timing = timings[config["BLOCK_SIZE"]]
        if isinstance(timing, Exception):
            raise timing
        return timing

    monkeypatch.setattr(backend.KernelLaunch, "_time", fake_time)
    launch = backend.KernelLaunch(
        _add_relu_kernel, lambda meta: (triton_cdiv(1000, meta["BLOCK_SIZE"]),), {"numel": 1000}, on_cuda=False,
        op="add_relu_test", key=key,
        candidates=[{"BLOCK_SIZE": b, "num_warps": 4, "num_stages": 2} for b in sorted(timings)])
    return launch, timed


def triton_cdiv(a, b):
    return -(-a // b)


def run_launch(launch):
    a, b, out = torch.randn(1000), torch.randn(1000), torch.empty(1000)
    launch(a, b, out)
    torch.testing.assert_close(out, torch.relu(a + b))


@pytest.mark.skipif(HAS_CUDA, reason="interpreted launches with a made-up GPU name")
def test_a_table_hit_times_nothing(fresh, monkeypatch):
    launch, timed = launch_of("shipped", {128: 1.0, 256: 2.0}, monkeypatch)
    run_launch(launch)
    assert timed == [] and launch.bound[2]["BLOCK_SIZE"] == 512


@pytest.mark.skipif(HAS_CUDA, reason="interpreted launches with a made-up GPU name")
def test_a_miss_times_the_candidates_once_and_caches_the_fastest(fresh, monkeypatch):
    launch, timed = launch_of("new-layer", {128: 3.0, 256: 1.0, 1024: 2.0}, monkeypatch)
    run_launch(launch)
    assert sorted(timed) == [128, 256, 1024] and launch.bound[2]["BLOCK_SIZE"] == 256
    run_launch(launch)
    assert len(timed) == 3  # bound: the second launch chooses nothing
    configs._cache = None  # a new process: the choice comes from the disk cache
    again, timed_again = launch_of("new-layer", {128: 3.0, 256: 1.0, 1024: 2.0}, monkeypatch)
    run_launch(again)
    assert timed_again == [] and again.bound[2]["BLOCK_SIZE"] == 256


@pytest.mark.skipif(HAS_CUDA, reason="interpreted launches with a made-up GPU name")
def test_the_first_call_passes_over_candidates_the_gpu_cannot_run(fresh, monkeypatch):
    from triton.compiler.errors import CompileTimeAssertionFailure
    from triton.runtime.errors import OutOfResources, PTXASError

    too_big = OutOfResources(232448, 227 * 1024, "shared memory")
    launch, timed = launch_of("unfit", {128: too_big, 256: 2.0, 1024: PTXASError("ptxas failed")}, monkeypatch)
    run_launch(launch)
    assert sorted(timed) == [128, 256, 1024] and launch.bound[2]["BLOCK_SIZE"] == 256
    assert configs.lookup(*launch.table_entry(torch.empty(1), "H100"))["BLOCK_SIZE"] == 256  # remembered
    none_fit, _ = launch_of("none-fit", {128: too_big, 256: CompileTimeAssertionFailure(None, None, "no")},
                            monkeypatch)
    with pytest.raises(RuntimeError, match="none of the 2 candidate configs for none-fit compiles") as raised:
        run_launch(none_fit)
    assert raised.value.__cause__ is too_big
    broken, _ = launch_of("broken", {128: 1.0, 256: RuntimeError("an illegal memory access")}, monkeypatch)
    with pytest.raises(RuntimeError, match="illegal memory access"):  # a fault is not a misfit: it surfaces
        run_launch(broken)


@pytest.mark.skipif(HAS_CUDA, reason="interpreted launches with a made-up GPU name")
def test_tracing_takes_the_first_candidate_without_timing(fresh, monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    launch, timed = launch_of("traced-layer", {128: 3.0, 256: 1.0}, monkeypatch)
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.randn(1000))
        assert launch._choose((fake, fake, fake)) == {"BLOCK_SIZE": 128, "num_warps": 4, "num_stages": 2}
    assert timed == []


def plan_choice(timings, monkeypatch, key="layer"):
    """A PlanChoice among plans named by `timings` (name: made-up ms), on a made-up H100: each plan
    returns its name; `ran` lists the plans run, `timed` those timed."""
    monkeypatch.setattr(backend, "_device_name", lambda index: H100)
    ran, timed = [], []

    def plan(name):
        def run(x):
            ran.append(name)
            return name
        return run

    def fake_time(fn):
        name = fn()
        ran.pop()
        timed.append(name)
        return timings[name]

    monkeypatch.setattr(backend, "time_call", fake_time)
    return backend.PlanChoice("chain_test:plan", key, [plan(name) for name in timings]), ran, timed


def test_a_plan_choice_times_its_plans_once_and_caches_the_faster(fresh, monkeypatch):
    x = torch.randn(4)
    choice, ran, timed = plan_choice({"one kernel": 2.0, "apart": 1.0}, monkeypatch)
    assert choice(x) == "apart" and choice(x) == "apart"
    assert timed == ["one kernel", "apart"]  # once each, after a first untimed call each
    assert ran == ["one kernel", "apart", "apart", "apart"]
    assert configs.lookup("H100", "chain_test:plan", "float32", "layer") == {"plan": 1}
    configs._cache = None  # a new process: the choice comes from the disk cache
    again, ran, timed = plan_choice({"one kernel": 2.0, "apart": 1.0}, monkeypatch)
    assert again(x) == "apart" and timed == [] and ran == ["apart"]
    other, _, timed = plan_choice({"one kernel": 1.0, "apart": 3.0}, monkeypatch, key="another layer")
    assert other(x) == "one kernel" and timed == ["one kernel", "apart"]


def test_a_plan_choice_passes_over_a_plan_whose_kernels_do_not_fit_the_gpu(fresh, monkeypatch):
    x = torch.randn(4)
    choice, ran, timed = plan_choice({"one kernel": 1.0, "apart": 2.0, "next apart": 3.0}, monkeypatch)
    too_big = backend.NoConfigFits("chain_test: none of the 4 candidate configs compiles for this GPU")

    def does_not_fit(x):
        raise too_big

    choice.plans = (does_not_fit, *choice.plans[1:])
    assert choice(x) == "apart" and timed == ["apart", "next apart"]
    assert configs.lookup("H100", "chain_test:plan", "float32", "layer") == {"plan": 1}
    none, _, _ = plan_choice({"one kernel": 1.0}, monkeypatch, key="none fit")
    none.plans = (does_not_fit,)
    with pytest.raises(backend.NoConfigFits, match="none of the 4 candidate configs"):
        none(x)


def test_a_plan_choice_passes_over_another_way_that_fails_but_not_the_first(fresh, monkeypatch):
    x = torch.randn(4)
    choice, _, timed = plan_choice({"one kernel": 2.0, "apart": 1.0}, monkeypatch)

    def broken(x):
        raise ValueError("no such layout")

    choice.plans = (choice.plans[0], broken)
    with pytest.warns(UserWarning, match="way 1 to run layer failed and is passed over: ValueError: no such layout"):
        assert choice(x) == "one kernel"
    assert timed == []  # one way left: nothing to time
    first_broken, _, _ = plan_choice({"one kernel": 2.0, "apart": 1.0}, monkeypatch, key="another")
    first_broken.plans = (broken, first_broken.plans[1])
    with pytest.raises(ValueError, match="no such layout"):
        first_broken(x)


def test_a_plan_choice_chooses_only_where_it_can_time(fresh, monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(4)
    choice, ran, timed = plan_choice({"one kernel": 2.0, "apart": 1.0}, monkeypatch)
    with FakeTensorMode() as mode:  # tracing: the first plan, and nothing chosen yet
        assert choice(mode.from_tensor(x)) == "one kernel"
    with configs.override({"BLOCK_M": 64}):  # a config forced for the first plan's kernel
        assert choice(x) == "one kernel"
    assert timed == [] and choice.chosen is None
    with precompile.compile_only("H100"):  # listing kernels to compile: every plan
        assert choice(x) == "one kernel"
    assert ran == ["one kernel", "one kernel", "one kernel", "apart"] and timed == []
    configs.remember("H100", "chain_test:plan", "float32", "layer", {"plan": 1})
    ran.clear()
    with precompile.compile_only("H100"):  # the plan the cache names, alone
        assert choice(x) == "apart"
    assert choice(x) == "apart" and ran == ["apart", "apart"] and timed == []


def test_warmup_plans_every_layer_before_the_first_call():
    model = fuse(synthetic_batchnorm(torchvision.models.resnet18(num_classes=10), size=32)).to(DEVICE)
    messages = []
    with kernels.use_backend("reference"):
        seconds = warmup(model, (2, 3, 32, 32), progress=messages.append)
        planned = {name: len(m._plans) for name, m in model.named_modules() if hasattr(m, "_plans")}
        assert seconds > 0 and set(planned.values()) == {1}, planned
        assert len(messages) == len(planned) and messages[-1].startswith(f"warm-up: layer {len(planned)}/")
        model(torch.randn(2, 3, 32, 32, device=DEVICE).contiguous(memory_format=torch.channels_last))
        assert {len(m._plans) for m in model.modules() if hasattr(m, "_plans")} == {1}  # no new plan
    with pytest.raises(TypeError, match="holds no fused layers"):
        warmup(torchvision.models.resnet18(), (1, 3, 32, 32))


def test_fuse_with_an_example_warms_up():
    model = synthetic_batchnorm(torchvision.models.resnet18(num_classes=10), size=32)
    with kernels.use_backend("reference"):
        fused = fuse(model, example=torch.randn(1, 3, 32, 32))
    assert all(len(m._plans) == 1 for m in fused.modules() if hasattr(m, "_plans"))


def test_a_fused_networks_first_call_per_input_compiles_ahead(monkeypatch):
    # fuse's CompileAhead hook: each new input (shape, dtype, device) first compiles the forward's
    # kernels all at once; a layout of its own or a second call does not, nor inputs warmup has done.
    from fused_resnet import modules

    listed = []
    monkeypatch.setattr(modules, "_compiles_ahead", lambda x: True)  # as for CUDA inputs with the kernels in force
    monkeypatch.setattr(modules, "_compile_ahead", lambda model, x, *_: listed.append((model, tuple(x.shape))))
    model = fuse(synthetic_batchnorm(torchvision.models.resnet18(num_classes=10), size=32)).to(DEVICE)
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    with kernels.use_backend("reference"), torch.no_grad():
        model(x)
        model(x)
        model(x.contiguous(memory_format=torch.channels_last))
        model(torch.randn(3, 3, 32, 32, device=DEVICE))
        warmup(model, (4, 3, 32, 32))
        model(torch.randn(4, 3, 32, 32, device=DEVICE))
    assert listed == [(model, (2, 3, 32, 32)), (model, (3, 3, 32, 32)), (model, (4, 3, 32, 32))]
    again = pickle.loads(pickle.dumps(model))  # as a new process loads it: nothing compiled there yet
    with kernels.use_backend("reference"), torch.no_grad():
        again(x)
    assert listed[-1] == (again, (2, 3, 32, 32))


def test_compiling_ahead_is_for_real_gpu_inputs_with_the_kernels_in_force():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fused_resnet.modules import _compiles_ahead

    x = torch.randn(1, 3, 8, 8)
    assert not _compiles_ahead(x) and not _compiles_ahead(None)  # a CPU tensor: interpreted or the reference
    with FakeTensorMode() as mode:
        assert not _compiles_ahead(mode.from_tensor(x))
    if HAS_CUDA:
        x = x.cuda()
        assert _compiles_ahead(x)
        with kernels.use_backend("cudnn"):
            assert not _compiles_ahead(x)
        with precompile.compile_only():  # the listing forward itself
            assert not _compiles_ahead(x)


def test_torch_compile_traces_a_fused_network_whole():
    # The CompileAhead hook gives dynamo nothing to break the graph on.
    model = fuse(synthetic_batchnorm(torchvision.models.resnet18(num_classes=10), size=32)).to(DEVICE)
    x = torch.randn(2, 3, 32, 32, device=DEVICE).contiguous(memory_format=torch.channels_last)
    torch._dynamo.reset()
    with kernels.use_backend("reference"), torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(compiled, expected)


@pytest.mark.skipif(HAS_CUDA, reason="interpreted launches with a made-up GPU name")
def test_override_forces_a_config_and_names_its_table_entry(fresh, monkeypatch):
    launch, timed = launch_of("swept-layer", {128: 1.0, 256: 2.0}, monkeypatch)
    with configs.override({"BLOCK_SIZE": 64, "num_warps": 2}) as asked:
        run_launch(launch)
    assert timed == [] and launch.bound[2]["BLOCK_SIZE"] == 64
    assert asked == [("H100", "add_relu_test", "float32", "swept-layer")]
    table = fresh / "written.json"
    configs.write_table({asked[0]: {"BLOCK_SIZE": 64, "num_warps": 2}}, path=table)
    configs.write_table({("H200", "add_relu_test", "float32", "other"): {"BLOCK_SIZE": 32}}, path=table)
    rows = json.loads(table.read_text())["entries"]
    assert [(r["gpu"], r["key"], r["config"]["BLOCK_SIZE"]) for r in rows] == [("H100", "swept-layer", 64),
                                                                               ("H200", "other", 32)]


def test_the_shipped_table_reads():
    # The file that ships beside the kernels parses, and every entry names a known op and dtype.
    entries = configs._read(configs.TABLE_PATH)
    assert json.loads(configs.TABLE_PATH.read_text())["version"] == 1
    for _gpu, op, dtype, key in entries:
        assert op in ("conv2d_bias_act", "conv2d_bias_act_maxpool", "avgpool_linear") and dtype in (
            "float16", "bfloat16", "float32") and "M=" in key


def test_sweep_candidates_cover_both_loops_and_fit():
    variants = ({"FLAT_LOOP": 0, "USE_TMA": 0}, {"FLAT_LOOP": 1, "USE_TMA": 0}, {"FLAT_LOOP": 1, "USE_TMA": 1})
    found = configs.sweep_candidates(256 * 3136, 64, 64, 2, shared_memory=228 * 1024, variants=variants)
    assert {(c["FLAT_LOOP"], c["USE_TMA"]) for c in found} == {(0, 0), (1, 0), (1, 1)} and len(found) >= 10
    assert all((c["BLOCK_M"] + c["BLOCK_N"]) * c["BLOCK_K"] * 2 * c["num_stages"] <= 228 * 1024 for c in found)
    assert max(c["BLOCK_N"] for c in found) == 64  # capped to the layer's 64 output channels
    fp32 = configs.sweep_candidates(256 * 3136, 64, 64, 4)
    assert len(fp32) < len(found) / 2 and max(c["BLOCK_K"] for c in fp32) <= 32


def test_the_sweep_times_each_row_schedule_kernel_once():
    # The row schedule (ROWS) ignores BLOCK_K: configs differing in it alone compile to the same
    # kernel (the same PTX for an H100), so the sweep lists one of them; the gathered schedule keeps
    # its BLOCK_K variety.
    variants = ({"FLAT_LOOP": 1, "ROWS": 1}, {"FLAT_LOOP": 1, "ROWS": 0})
    found = configs.sweep_candidates(256 * 112 * 112, 64, 147, 2, variants=variants)
    rows = [c for c in found if c["ROWS"]]
    gathered = [c for c in found if not c["ROWS"]]
    without_k = [{k: v for k, v in c.items() if k != "BLOCK_K"} for c in rows]
    assert rows and all(without_k.count(c) == 1 for c in without_k)
    assert len(rows) < len(gathered)
    assert len({(c["BLOCK_M"], c["BLOCK_N"], c["num_stages"], c["num_warps"]) for c in gathered}) < len(gathered)
    assert configs.same_kernel({**rows[0], "BLOCK_K": 16}) == configs.same_kernel({**rows[0], "BLOCK_K": 128})
    assert configs.same_kernel({**gathered[0], "BLOCK_K": 16}) != configs.same_kernel({**gathered[0], "BLOCK_K": 128})


def test_a_first_call_compiles_each_row_schedule_kernel_once():
    # At batch 1 and 8 the stem's GEMM (12,544 and 100,352 rows by 64 channels, a reduction of 147)
    # takes the small-layer shapes, two of which differ in BLOCK_K alone once capped to its 64
    # channels: one kernel under the row schedule, compiled and timed once, as the sweep does. The
    # whole network's first call at batch 1 compiles no kernel twice.
    found = configs.candidates(112 * 112, 64, 147, 2, switches={"FLAT_LOOP": 1, "ROWS": 1})
    kernels_of = [configs.same_kernel(c) for c in found]
    assert len(set(kernels_of)) == len(found) >= 2
    capped = configs.cap_stages(found + [{**found[0], "BLOCK_K": 2 * found[0]["BLOCK_K"]}], lambda c: 8)
    assert len({configs.same_kernel(c) for c in capped}) == len(capped) == len(found)
    gathered = configs.candidates(112 * 112, 64, 147, 2, switches={"FLAT_LOOP": 1, "ROWS": 0})
    assert len(gathered) > len(found)  # the gathered loop reads BLOCK_K: both kept
    model = fuse(synthetic_batchnorm(torchvision.models.resnet18(), size=32), dtype=torch.float16)
    x = torch.empty(1, 3, 224, 224, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    with precompile.compile_only("H100", every_candidate=True) as jobs, torch.no_grad():
        model(x)
    compiled = collections.Counter((j.kernel, j.args, tuple(sorted(j.kwargs.items())), configs.same_kernel(j.config))
                                   for j in jobs)
    assert any(dict(k[3]).get("ROWS") for k in compiled) and max(compiled.values()) == 1


def test_the_stems_pooled_kernel_gets_no_config_that_spills():
    # Its two accumulator tiles spill registers at 64 fp32 elements a thread (compiled for an H100);
    # its launches ask for candidates of at most conv2d_maxpool.MAX_ACC_PER_THREAD, the sweep too.
    from fused_resnet.kernels import conv2d_maxpool

    limit = conv2d_maxpool.MAX_ACC_PER_THREAD
    assert limit * 2 <= 64
    m = 256 * 56 * 56
    for found in (configs.candidates(m, 64, 147, 2, max_acc_per_thread=limit),
                  configs.sweep_candidates(m, 64, 147, 2, max_acc_per_thread=limit)):
        assert found and all(c["BLOCK_M"] * c["BLOCK_N"] <= limit * 32 * c["num_warps"] for c in found)
    # the plain conv's lists are not cut: they keep tiles of 128 elements a thread
    wide = configs.sweep_candidates(m, 256, 64, 2)
    assert max(c["BLOCK_M"] * c["BLOCK_N"] // (32 * c["num_warps"]) for c in wide) == configs.MAX_ACC_PER_THREAD
    with precompile.compile_only("H100") as jobs:
        x = torch.empty(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
        weight = torch.randn(64, 3, 7, 7).contiguous(memory_format=torch.channels_last)
        kernels.plan_conv2d_bias_act_maxpool(x, weight, None, 2, 3, pool_size=3, pool_stride=2, pool_padding=1)(x)
    pooled = [j for j in jobs if j.op == "conv2d_bias_act_maxpool"]  # (the others: its input's space-to-depth copy)
    assert pooled and all(j.config["BLOCK_M"] * j.config["BLOCK_N"] <= limit * 32 * j.config["num_warps"]
                          for j in pooled)


def test_split_k_where_few_tiles_run_long_loops():
    # No split where the tiles fill half the SMs; else enough ways to fill them once, each way
    # running at least MIN_SPLIT_TRIPS trips.
    assert configs.split_k(66, 72, 132) == 1 and configs.split_k(400, 72, 132) == 1
    assert configs.split_k(8, 72, 132) == 17  # cdiv(132, 8)
    assert configs.split_k(8, 12, 132) == 3  # 12 trips // 4
    assert configs.split_k(8, 7, 132) == 1
    # In a conv's first-call candidates: resnet50's last 3x3 (512 channels, 7x7) at batch 1 makes
    # 8 tiles of 64x64 and 72 trips, so its candidates split it; at batch 64, 50 tiles of 64 rows
    # by 8 fill the GPU unsplit. (Compiled for an H100; inside compile_only nothing runs.)
    found = {}
    for batch in (1, 64):
        x = torch.empty(batch, 512, 7, 7, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
        w = torch.empty(512, 512, 3, 3, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
        with precompile.compile_only("H100", every_candidate=True) as jobs:
            kernels.plan_conv2d_bias_act(x, w, None, 1, 1, relu=True)(x, None)
        found[batch] = {job.config.get("SPLIT_K", 1): job.args[-2:] for job in jobs}
    assert max(found[1]) == 17 and set(found[64]) == {1}
    # a split launch takes its scratch after the tensors: partial tiles in fp32, int32 counts
    assert found[1][17] == (("tensor", torch.float32, True), ("tensor", torch.int32, True))
    assert found[64][1] == (("none",), ("none",))


def test_an_h100_takes_the_h200s_entry_where_it_has_none_of_its_own(fresh):
    # One chip under two names: what the sweep tuned on the one serves the other before anything is
    # timed; the GPU's own entry, in the table or in its cache, comes first; other GPUs take nothing.
    table = fresh / "tuned_configs.json"
    rows = json.loads(table.read_text())["entries"]
    rows += [{"gpu": "H200", "op": "add_relu_test", "dtype": "float32", "key": k, "config": {"BLOCK_SIZE": 1024}}
             for k in ("shipped", "only_h200")]
    table.write_text(json.dumps({"version": 1, "entries": rows}))
    assert configs.lookup("H100", "add_relu_test", "float32", "shipped") == {"BLOCK_SIZE": 512, "num_warps": 4}
    assert configs.lookup("H100", "add_relu_test", "float32", "only_h200") == {"BLOCK_SIZE": 1024}
    assert configs.lookup("H200", "add_relu_test", "float32", "shipped") == {"BLOCK_SIZE": 1024}
    assert configs.lookup("A100", "add_relu_test", "float32", "only_h200") is None
    assert configs.lookup("H100", "add_relu_test", "float16", "only_h200") is None
    configs.remember("H100", "add_relu_test", "float32", "only_h200", {"BLOCK_SIZE": 128})
    assert configs.lookup("H100", "add_relu_test", "float32", "only_h200") == {"BLOCK_SIZE": 128}


def test_chain_candidates_with_a_3x3_head():
    # Shared memory of a chain led by a 3x3 (its main loop's buffers serve the chain's loop after it):
    # the larger of the two loops. resnet50 layer3's (Ch 256 -> C 256 -> K 1024 -> J 256, fp16) in
    # 64x64 tiles of 8 warps compiled for an H100 to 180,224 bytes, the chain loop's count; layer1's
    # head without a next conv (Ch 64 -> C 64 -> K 256) to 32 KB, under the head loop's 48 KB.
    big = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=2, HEAD=True)
    assert configs.chain_shared_bytes(big, 256, 256, 2) == 180224
    assert configs.chain_shared_bytes(big, 64, 0, 2) == ((64 + 64) * 64 * 2 + 64 * 64) * 2 == 40960
    assert configs.chain_shared_bytes({**big, "HEAD": False}, 64, 0, 2) == (64 * 64 + 64 * 64 * 2) * 2 + 64 * 64 * 4
    for ch, c, k, j, cs in ((64, 64, 256, 64, 64), (128, 128, 512, 128, 256), (256, 256, 1024, 256, 0),
                            (256, 256, 1024, 0, 0)):
        fp16 = configs.chain_candidates(c, k, j, 2, block_s=cs, head_channels=ch)
        # every resnet50 head gets a first candidate of 64 rows or more (Hopper's warpgroup MMAs), BLOCK_K 64
        assert fp16 and fp16[0]["BLOCK_M"] >= 64 and {cfg["BLOCK_K"] for cfg in fp16} == {64}, fp16
        for cfg in fp16 + configs.chain_candidates(c, k, j, 4, block_s=cs, head_channels=ch):
            threads = 32 * cfg["num_warps"]
            assert cfg["BLOCK_M"] * c <= configs.MAX_ACC_PER_THREAD * threads  # the head's accumulator
            assert configs.chain_shared_bytes({**cfg, "HEAD": True}, c, j, 4 if cfg["BLOCK_K"] == 32 else 2,
                                              cs) <= 228 * 1024
    # IEEE fp32 (operands in registers too): the widest chain has no candidate and runs apart.
    assert configs.chain_candidates(256, 1024, 256, 4, ieee=True, head_channels=256) == []
    assert configs.chain_block_k(0, 2) == 16 and configs.chain_block_k(20, 2) == 32
    assert configs.chain_block_k(256, 4) == 32 and configs.chain_block_k(256, 2, interpreter=True) == 32
