"""benchmarks/sweep_convs.py on a CPU: the harness runs the distinct resnet50 convs through the
interpreted kernels, times them beside the cuDNN/reference path and writes the results schema."""

import json
import pathlib

import pytest
from conftest import HAS_CUDA, interpreted_configs, load_benchmark, run_compiling

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_sweep():
    return load_benchmark("sweep_convs")


@pytest.mark.skipif(HAS_CUDA, reason="the CPU check of the harness; on a GPU run the sweep itself")
def test_sweep_harness_on_a_cpu(tmp_path, capsys):
    import torch

    sweep = load_sweep()
    out = tmp_path / "sweep.json"
    cases = sweep.main(["--device", "cpu", "--limit", "4", "--size", "32", "--json", str(out), "--network",
                        "eager_channels_last", "--network-after", "eager", "eager_channels_last"])
    payload = json.loads(out.read_text())
    assert payload["cases"] == json.loads(json.dumps(cases))
    assert {"gpu", "torch", "triton", "commit", "command", "date"} <= set(payload["provenance"])
    layers = [c["layer"] for c in cases if c["impl"] == "fused"]
    # The stem (conv + max pooling) and the head (average pooling + fc), then layer1.0's first convs.
    assert layers == ["C3 K64 7x7/2 32x32 +maxpool", "head C2048 1x1 -> 1000", "C64 K64 1x1/1 8x8",
                      "C64 K64 3x3/1 8x8"]
    network = [c for c in cases if c["model"] == "resnet50"]
    # --network-after: after the sweep only, once each
    assert [(c["impl"], c["when"]) for c in network] == [("eager_channels_last", "before"),
                                                         ("eager_channels_last", "after"), ("eager", "after")]
    assert all(c["median_ms"] > 0 and c["batch"] == 1 and c["dtype"] == "float16" for c in network)
    for c in cases:
        if c["model"] == "resnet50":
            continue
        assert c["dtype"] == "float16" and c["batch"] == 1 and c["kernel_ms"] > 0
        assert c["model"] == ("resnet50-head" if c["layer"].startswith("head") else "resnet50-conv")
    # The head has no cuDNN form: it is timed against eager's pooling and fc.
    assert {c["impl"] for c in cases if c.get("layer", "").startswith("head")} == {"fused", "eager"}
    assert {c["impl"] for c in cases if c.get("layer", "").endswith("+maxpool")} == {"fused", "cudnn_fused", "eager"}
    # The stem is timed in four plans: as the conv of 3 channels or as space-to-depth over 16, each
    # with its max pooling in the same kernel or after it.
    stem = next(c for c in cases if c["impl"] == "fused")
    assert stem["configs_timed"] == 4 and set(stem["by_plan"]) == {
        "direct", "space_to_depth", "pool_apart_direct", "pool_apart_space_to_depth"}
    assert stem["kernel_ms"] == min(stem["by_plan"].values())
    # Every config's time is kept, with its error against cuDNN's output (which it passed), the best
    # among them reported.
    for fused in (c for c in cases if c["impl"] == "fused"):
        assert len(fused["timed"]) == fused["configs_timed"]
        assert fused["kernel_ms"] == min(t["kernel_ms"] for t in fused["timed"])
        assert all(0 <= t["error"] <= sweep.TOLERANCE[torch.float16] for t in fused["timed"])
    assert all("by_plan" not in c for c in cases if c["impl"] == "fused" and c is not stem)
    # Each conv's least work (operands read once, the output written once; the stem's conv once a
    # pixel, before its pooling), and its time at the roof: on a CPU, an H100's data sheet.
    conv = next(c for c in cases if c["impl"] == "fused" and c["layer"] == "C64 K64 1x1/1 8x8")
    assert conv["least_bytes"] == 2 * (2 * 64 * 8 * 8 + 64 * 64 + 64) and conv["least_flops"] == 2 * 64 * 8 * 8 * 64
    assert stem["least_bytes"] == 2 * (3 * 32 * 32 + 64 * 3 * 7 * 7 + 64 * 8 * 8 + 64)
    assert stem["least_flops"] == 2 * 16 * 16 * 64 * 3 * 7 * 7
    flops, bandwidth = 989e12, 3.35e12
    for c in (conv, stem):
        assert c["roof_ms"] == float(f"{max(c['least_bytes'] / bandwidth, c['least_flops'] / flops) * 1e3:.4g}")
    assert all("roof_ms" not in c for c in cases if c["model"] == "resnet50-head")
    printed = capsys.readouterr().out
    assert "geomean over 3 convs" in printed and "not a measurement" in printed
    assert "fused at roof" in printed and "roof: 3.35 TB/s and 989 TFLOP/s in float16 (H100 SXM" in printed


@pytest.mark.skipif(HAS_CUDA, reason="the CPU check of the configs; on a GPU run the sweep itself")
def test_every_config_of_the_gpu_sweep_under_the_interpreter(tmp_path, monkeypatch):
    # --every-config: each config a GPU sweep at batch 256 lists for the layer runs under the
    # interpreter as a GPU would run it (its own tiles and switches, not the interpreter's) and is
    # checked against the reference, once each.
    from fused_resnet.kernels import backend

    sweep = load_sweep()
    out = tmp_path / "every.json"
    with interpreted_configs() as ran:
        cases = sweep.main(["--device", "cpu", "--every-config", "--size", "32", "--layer", "layer1.0.conv1",
                            "--json", str(out)])
    fused = next(c for c in cases if c["impl"] == "fused")
    timed = [t["config"] for t in fused["timed"]]
    assert fused["layer"] == "C64 K64 1x1/1 8x8" and not {"wrong", "failed"} & set(fused)
    assert len(timed) == fused["configs_timed"] >= 20 and ran == timed  # each listed config, as listed
    assert {c["USE_TMA"] for c in timed} == {0, 1} and {c["BLOCK_M"] for c in timed} >= {64, 128, 256}
    assert all("num_warps" in c for c in timed)  # GPU configs, not the interpreter's small tiles
    # Off the interpreter a CPU runs the reference, which would pass every config unchecked.
    monkeypatch.setattr(backend, "interpreting", lambda: False)
    with pytest.raises(SystemExit, match="TRITON_INTERPRET=1"):
        sweep.main(["--device", "cpu", "--every-config", "--limit", "1"])


def test_sweep_needs_a_gpu_unless_told_cpu(capsys):
    if HAS_CUDA:
        pytest.skip("there is a GPU here")
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        load_sweep().main(["--limit", "1"])


def test_the_gpu_run_script_asks_only_for_options_that_exist(tmp_path):
    # benchmarks/gpu_run.sh is run where GPU time is scarce: a misspelt option must fail here first.
    import re
    import subprocess
    import sys

    script = (ROOT / "benchmarks" / "gpu_run.sh").read_text()
    commands = re.findall(r"python3 (benchmarks/\w+\.py)((?:[^\n]*\\\n)*[^\n]*)", script)
    assert {c[0] for c in commands} == {"benchmarks/sweep_convs.py", "benchmarks/first_call.py"}
    # (the sweep's options also where sweep_resuming runs it, and the --resume it adds)
    commands += [("benchmarks/sweep_convs.py", args + " --resume")
                 for args in re.findall(r"sweep_resuming \S+((?:[^\n]*\\\n)*[^\n]*)", script)]
    for path, args in commands:
        helped = subprocess.run([sys.executable, str(ROOT / path), "--help"], capture_output=True, text=True,
                                timeout=120)
        assert helped.returncode == 0, helped.stderr
        for option in re.findall(r"(--[\w-]+)", args):
            assert option in helped.stdout, (path, option)
    stages = re.findall(r"^  ([\w|]+)\)$", script, flags=re.M)
    assert stages == ["lease", "check", "archs16|archs32", "sweep", "sweep1", "host", "network", "chain", "first"]
    known = re.search(r'^stages="([\w ]+)"$', script, flags=re.M).group(1).split()
    assert known == "|".join(stages).split("|")  # the stages it accepts are the stages it runs
    wrong = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_run.sh"), "no-such-stage", str(tmp_path)],
                           capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and "unknown stage" in wrong.stderr


def test_the_gpu_run_script_resumes_a_sweep_that_a_gpu_fault_ended(tmp_path):
    # sweep_resuming runs the sweep again with --resume while it exits with FAULT_EXIT (3), at most
    # three times, each with what is left of its timing budget; any other status ends it.
    import os
    import re
    import subprocess

    script = (ROOT / "benchmarks" / "gpu_run.sh").read_text()
    function = re.search(r"^sweep_resuming\(\) \{.*?^}$", script, flags=re.M | re.S).group(0)
    fake = tmp_path / "bin" / "python3"  # a sweep that logs its arguments and exits as told
    fake.parent.mkdir()
    fake.write_text('#!/bin/bash\necho "$*" >> "$LOG"\nread -r rc < <(sed -n "$(wc -l < "$LOG")p" "$CODES")\n'
                    'exit "$rc"\n')
    fake.chmod(0o755)

    def run(codes):
        log, codes_file = tmp_path / "log", tmp_path / "codes"
        log.unlink(missing_ok=True)
        codes_file.write_text("\n".join(map(str, codes)) + "\n")
        env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "LOG": str(log), "CODES": str(codes_file)}
        done = subprocess.run(["bash", "-c", function + "\nsweep_resuming 200 --json s.json --write-table"],
                              env=env, capture_output=True, text=True, timeout=60)
        return done.returncode, log.read_text().splitlines(), done.stderr

    rc, calls, err = run([3, 3, 0])
    assert rc == 0 and len(calls) == 3 and err.count("resuming in a new process") == 2
    assert all(c.startswith("benchmarks/sweep_convs.py --json s.json --write-table --budget ") for c in calls)
    assert [c.endswith("--resume") for c in calls] == [False, True, True]
    budgets = [int(re.search(r"--budget (\d+)", c).group(1)) for c in calls]
    assert 190 <= budgets[0] <= 200 and budgets == sorted(budgets, reverse=True)
    rc, calls, _ = run([3, 3, 3, 3, 3])
    assert rc == 3 and len(calls) == 4  # the first try and three more
    rc, calls, _ = run([1, 0])
    assert rc == 1 and len(calls) == 1  # an error that is not a fault in the GPU is not retried


def test_the_gpu_run_scripts_lease_runs_every_step_in_its_time(tmp_path):
    # The lease stage is the one call a short GPU loan gets, and no run of it can be repeated: here it
    # runs whole with a stand-in python3 that logs each command and returns at once (the sweep's
    # first process with the status of a fault in the GPU). Every step runs, in order, the sweep
    # resumed once, and the results folder gets the sweep's log, the table and the tests' log.
    import os
    import subprocess

    fake = tmp_path / "bin" / "python3"
    fake.parent.mkdir()
    fake.write_text('#!/bin/bash\necho "$*" >> "$LOG"\n'
                    'case "$1" in\n'
                    '  benchmarks/sweep_convs.py) [[ " $* " == *" --resume "* ]] || exit 3 ;;\n'
                    '  -c) echo cpu ;;\n'
                    'esac\nexit 0\n')
    fake.chmod(0o755)
    out, log = tmp_path / "out", tmp_path / "log"
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "LOG": str(log)}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_run.sh"), "lease", str(out)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    steps = [c.split()[0] if not c.startswith("-m ") else " ".join(c.split()[:2]) for c in calls
             if not c.startswith("-c ")]
    assert steps[0] == "-m pip"  # installed in place, without network
    sweeps = [c for c in calls if c.startswith("benchmarks/sweep_convs.py")]
    assert len(sweeps) == 2 and "--resume" not in sweeps[0] and sweeps[1].endswith("--resume")
    assert all("--write-table" in c and "--network fused" in c for c in sweeps)
    rest = steps[steps.index("benchmarks/sweep_convs.py") + 2:]
    # the four test shards, then the first call, then the host times
    assert rest == ["-m pytest"] * 4 + ["benchmarks/first_call.py", "-m pytest"], rest
    files = sorted(p.name for p in out.iterdir())
    assert [f.split("-", 3)[-1] for f in files] == ["cpu-gpu-tests.log", "cpu-host.log", "cpu-sweep.log",
                                                    "tuned_configs.json"], files
    assert "resuming in a new process" in next(out.glob("*-sweep.log")).read_text()
    # Each step's seconds, last in the output (what a device call shows of it is its tail).
    timeline = done.stdout.splitlines()[-4:]
    assert [line.split(" took ")[0] for line in timeline] == [
        "lease: the sweep", "lease: the gpu tests", "lease: the first calls", "lease: the host times"]


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the shards would run the gpu tests themselves")
def test_the_gpu_run_scripts_test_shards_run_each_quick_gpu_test_once(tmp_path):
    # gpu_run.sh runs the quick gpu tests in four pytest processes at once. Here, without a GPU,
    # each test skips; the shards' log names every quick gpu test once, none twice or left out.
    import os
    import re
    import subprocess
    import sys

    script = (ROOT / "benchmarks" / "gpu_run.sh").read_text()
    shards = re.search(r"^GPU_SHARDS=\(.*?^}$", script, flags=re.M | re.S).group(0)
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "out": str(tmp_path),
           "tag": "cpu"}
    done = subprocess.run(["bash", "-c", shards + '\ngpu_tests 600 "600 s at most"'], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert "gpu tests: exit 0 0 0 0 (a shard each) after 600 s at most; 0 passed, 0 failed" in done.stdout, done.stdout
    log = (tmp_path / "cpu-gpu-tests.log").read_text()
    assert log.count("== shard ") == 4
    ran = re.findall(r"^(tests/.+?::.+?) (?:PASSED|SKIPPED|FAILED|ERROR)", log, flags=re.M)
    collected = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu and not slow", "--collect-only", "-q",
                                "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    expected = [line for line in collected.stdout.splitlines() if line.startswith("tests/") and "::" in line]
    assert len(expected) > 50
    assert sorted(ran) == sorted(expected)


def test_the_sweep_splits_k_where_the_batch_leaves_tiles_few():
    # At batch 1 resnet50's last 3x3 (512 channels over 7x7) makes 1 to 8 output tiles: the sweep
    # times each gathered config split-K as well; at batch 256 it makes hundreds, and none is split.
    import torch
    import torchvision

    sweep = load_sweep()
    model = torchvision.models.resnet50().eval()
    for batch, splits in ((1, True), (256, False)):
        layers = sweep.distinct_layers(model, batch, 224, torch.float16, "cpu")
        name, layer, x_shape, _ = next(entry for entry in layers if sweep.describe(entry[1], entry[2])
                                       == "C512 K512 3x3/1 7x7")
        found = sweep.sweep_configs(layer, x_shape, torch.float16, cuda=True)
        split = [c for c in found if c.get("SPLIT_K", 1) > 1]
        assert bool(split) == splits, name
        # split-K runs the gathered loop only
        assert all(c["FLAT_LOOP"] == 1 and c["USE_TMA"] == 0 and c["BOX_W"] == 0 for c in split)


def test_the_sweep_times_the_unrolled_loop_at_the_first_calls_tiles_and_fills_its_stages():
    # The pipelined loop takes the sweep's wide list of tiles; the unrolled one (a channel loop in
    # each tap) only the first call's tiles, as the comparison. No config has more pipeline stages
    # than its main loop fills, as at the first call.
    import torch
    import torchvision
    import triton
    from fused_resnet.kernels import configs

    sweep = load_sweep()
    layers = {sweep.describe(layer, x_shape): (layer, x_shape)
              for _, layer, x_shape, _ in sweep.distinct_layers(torchvision.models.resnet50().eval(), 256, 224,
                                                                 torch.float16, "cpu")}

    def tiles(found):
        return {(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["num_warps"]) for c in found}

    found = sweep.sweep_configs(*layers["C128 K128 3x3/1 28x28"], torch.float16, cuda=True)
    unrolled = [c for c in found if c["FLAT_LOOP"] == 0]
    first = configs.candidates(256 * 28 * 28, 128, 128, 2)
    assert tiles(unrolled) == tiles(first) and len(unrolled) == len(first) == 4
    assert all(c["BOX_W"] == 0 and c["USE_TMA"] == 0 and c.get("SPLIT_K", 1) == 1 for c in unrolled)
    pipelined = [c for c in found if c["FLAT_LOOP"] == 1 and c["BOX_W"] == 0]
    assert len(tiles(pipelined)) >= 3 * len(first)
    # A 1x1 over 64 channels makes one trip at BLOCK_K 64: two stages, whatever the list says.
    found = sweep.sweep_configs(*layers["C64 K64 1x1/1 56x56"], torch.float16, cuda=True)
    assert all(c["FLAT_LOOP"] == 1 for c in found)
    assert all(c["num_stages"] <= max(2, triton.cdiv(64, c["BLOCK_K"]) + 1) for c in found), found
    assert {c["num_stages"] for c in found if c["BLOCK_K"] == 64} == {2}


def test_the_sweep_gives_ieee_fp32_its_own_tiles(monkeypatch):
    # fp32 with TF32 off runs its dots on the FMA units: the sweep times tiles of at most 32
    # accumulators a thread there (16 for the pooled stem), as the first call's candidates are.
    import torch
    import torchvision

    sweep = load_sweep()
    layers = sweep.distinct_layers(torchvision.models.resnet50().eval(), 256, 224, torch.float32, "cpu")
    picked = [entry for entry in layers if sweep.describe(entry[1], entry[2]) in (
        "C3 K64 7x7/2 224x224 +maxpool", "C256 K256 3x3/1 14x14")]
    assert len(picked) == 2

    def per_thread():  # the most accumulator elements a thread of each layer's configs
        return [max(c["BLOCK_M"] * c["BLOCK_N"] // (32 * c["num_warps"])
                    for c in sweep.sweep_configs(layer, x_shape, torch.float32, cuda=True)
                    if c and not c.get("POOL_APART")) for _, layer, x_shape, _ in picked]

    tf32 = per_thread()
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    ieee = per_thread()
    assert tf32 == [32, 64] and ieee == [16, 32]


def test_the_sweep_never_times_or_keeps_a_config_whose_output_is_wrong(tmp_path, monkeypatch, capsys):
    # A config that gives a wrong answer must not win on speed: here every space-to-depth config of
    # the stem is made to scale its output, and the sweep reports them as wrong instead of timing them.
    if HAS_CUDA:
        pytest.skip("the CPU check of the harness")
    import contextlib

    sweep = load_sweep()
    plan_of, forced = sweep.plan_of, sweep.forced
    swept = {}  # the config the sweep is trying, while it tries it

    @contextlib.contextmanager
    def trying(config):
        swept["config"] = config or {}
        with forced(config) as asked:
            yield asked
        swept.clear()

    def corrupted(layer, x, r, pool_apart=False):
        run = plan_of(layer, x, r, pool_apart)
        if swept.get("config", {}).get("SPACE_TO_DEPTH"):
            return lambda x, r: run(x, r) * 1.5
        return run

    monkeypatch.setattr(sweep, "forced", trying)
    monkeypatch.setattr(sweep, "plan_of", corrupted)
    cases = sweep.main(["--device", "cpu", "--limit", "1", "--size", "32", "--json", str(tmp_path / "s.json")])
    stem = next(c for c in cases if c["impl"] == "fused")
    assert set(stem["by_plan"]) == {"direct", "pool_apart_direct"}
    assert stem["configs_timed"] == 2 and len(stem["timed"]) == 2
    assert [w["config"] for w in stem["wrong"]] == [{"SPACE_TO_DEPTH": 1}, {"SPACE_TO_DEPTH": 1, "POOL_APART": 1}]
    assert all(0.3 < w["error"] < 0.6 for w in stem["wrong"])  # half the output's scale, near its largest value
    assert "WRONG" in capsys.readouterr().err


def test_the_output_check_fails_a_run_that_leaves_its_output_unwritten():
    # The check fills each output it has read with NaN: a run that hands back memory it did not
    # write (here, the same tensor again) fails the next check instead of passing on old contents.
    import torch
    import torchvision

    sweep = load_sweep()

    name, layer, x_shape, r_shape = sweep.distinct_layers(torchvision.models.resnet18().eval(), 1, 16, torch.float32,
                                                          "cpu")[2]
    x, r = sweep.operands(x_shape, r_shape, torch.float32, "cpu")
    reference = next(iter(sweep.baselines(layer, x, r).values()))
    check = sweep.OutputCheck(reference, x_shape, r_shape, torch.float32, "cpu", seed=1)
    assert not torch.equal(check.x, x)  # operands of its own
    with sweep.kernels.use_backend("reference"):
        run = sweep.plan_of(layer, check.x, check.r)
    kept = []

    def writes_once(x, r):
        if not kept:
            kept.append(run(x, r))
        return kept[0]

    first = check.error(writes_once)
    assert check.passes(first) and first < 1e-6, name
    second = check.error(writes_once)
    assert not check.passes(second), second
    # and a run that is right each time passes each time
    assert check.passes(check.error(run)) and check.passes(check.error(run))
    # a wrong answer by a few percent fails
    assert not check.passes(check.error(lambda x, r: run(x, r) * 1.05))


def test_a_config_or_network_that_fails_to_run_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    # A GPU run is short: one config or one implementation that fails must not cost the rest of it.
    if HAS_CUDA:
        pytest.skip("the CPU check of the harness")
    sweep = load_sweep()
    plan_of = sweep.plan_of
    message = "no such plan here"

    def failing(layer, x, r, pool_apart=False):  # the stem's configs with its pooling apart fail
        if pool_apart:
            raise RuntimeError(message)
        return plan_of(layer, x, r, pool_apart)

    def unusable(*args, **kwargs):
        raise ValueError("not timed today")

    monkeypatch.setattr(sweep, "plan_of", failing)
    monkeypatch.setattr(sweep.bench, "time_impl", unusable)
    out = tmp_path / "s.json"
    cases = sweep.main(["--device", "cpu", "--limit", "1", "--size", "32", "--json", str(out), "--network",
                        "eager_channels_last"])
    stem = next(c for c in cases if c["impl"] == "fused")
    assert set(stem["by_plan"]) == {"direct", "space_to_depth"} and stem["configs_timed"] == 2
    assert [f["config"] for f in stem["failed"]] == [{"POOL_APART": 1}, {"SPACE_TO_DEPTH": 1, "POOL_APART": 1}]
    assert all("no such plan here" in f["error"] for f in stem["failed"])
    network = [c for c in cases if c["model"] == "resnet50"]
    assert [(c["impl"], c["when"]) for c in network] == [("eager_channels_last", "before"),
                                                         ("eager_channels_last", "after")]
    assert all("not timed today" in c["error"] and "median_ms" not in c for c in network)
    assert "failed: ValueError" in capsys.readouterr().out

    # A fault in the GPU leaves nothing to measure: the sweep stops there.
    message = "CUDA error: an illegal memory access was encountered"
    with pytest.raises(RuntimeError, match="illegal memory access"):
        sweep.main(["--device", "cpu", "--limit", "1", "--size", "32"])


def test_a_sweep_that_a_gpu_fault_ended_resumes_without_the_faulting_config(tmp_path, monkeypatch, capsys):
    # A fault in the GPU ends the process's use of it: the sweep saves what it measured and the config
    # that faulted, exits with FAULT_EXIT, and --resume measures the rest in a new process.
    if HAS_CUDA:
        pytest.skip("the CPU check of the harness")
    from fused_resnet import FusedConv2d

    sweep = load_sweep()
    plan_of = sweep.plan_of
    fault = RuntimeError("CUDA error: an illegal memory access was encountered")
    ran = []  # (layer kind, space-to-depth, pooling apart) of each config run

    def faulting_in(which):
        def run(layer, x, r, pool_apart=False):
            if sweep.kernels.current_backend() != "cudnn":  # a config's run, not a baseline's
                ran.append((type(layer).__name__, sweep.igemm.SPACE_TO_DEPTH, pool_apart))
                if which(layer, pool_apart):
                    raise fault
            return plan_of(layer, x, r, pool_apart)
        return run

    # The third layer's only config faults: the stem and the head are done.
    out = tmp_path / "s.json"
    args = ["--device", "cpu", "--limit", "3", "--size", "32", "--json", str(out), "--network", "eager_channels_last"]
    monkeypatch.setattr(sweep, "plan_of", faulting_in(lambda layer, _: type(layer) is FusedConv2d))
    assert sweep.cli(args) == sweep.FAULT_EXIT
    assert "--resume goes on from there" in capsys.readouterr().err
    first = json.loads(out.read_text())["cases"]
    fused = [c for c in first if c["impl"] == "fused"]
    assert [c.get("fault", False) for c in fused] == [False, False, True]
    bad = fused[2]["faulted"]
    assert [f["config"] for f in bad] == [None] and "illegal memory access" in bad[0]["error"]
    assert [c["impl"] for c in first if c["model"] == "resnet50"] == ["eager_channels_last"]
    # Resumed: the stem, the head and the network timed before are kept, not run again, and the
    # third layer, its one config gone, has nothing to time.
    ran.clear()
    timed_networks = []
    time_network = sweep.time_network
    monkeypatch.setattr(sweep, "time_network", lambda model, impls, *a, **k: (timed_networks.append(list(impls)),
                                                                              time_network(model, impls, *a, **k))[1])
    cases = sweep.main(args + ["--resume"])
    assert ran == [] and timed_networks == [[], ["eager_channels_last"]]  # before: kept; after: timed
    fused = [c for c in cases if c["impl"] == "fused"]
    assert fused[:2] == [c for c in first if c["impl"] == "fused"][:2]
    assert fused[2]["layer"] == "C64 K64 1x1/1 8x8" and fused[2]["kernel_ms"] is None and "fault" not in fused[2]
    assert fused[2]["faulted"] == bad
    assert json.loads(out.read_text())["cases"] == json.loads(json.dumps(cases))
    network = [c for c in cases if c["model"] == "resnet50"]
    assert [(c["impl"], c["when"]) for c in network] == [("eager_channels_last", "before"),
                                                         ("eager_channels_last", "after")]
    assert network[0] == next(c for c in first if c["model"] == "resnet50")
    with pytest.raises(SystemExit, match="holds a run of"):  # a file of another batch is not resumed
        sweep.main(args + ["--resume", "--batch", "2"])

    # The stem's space-to-depth config (pooling fused) faults: resumed, its other three are timed.
    out = tmp_path / "stem.json"
    args = ["--device", "cpu", "--limit", "1", "--size", "32", "--json", str(out)]
    monkeypatch.setattr(sweep, "plan_of", faulting_in(lambda _, apart: sweep.igemm.SPACE_TO_DEPTH and not apart))
    assert sweep.cli(args) == sweep.FAULT_EXIT
    ran.clear()
    stem = next(c for c in sweep.main(args + ["--resume"]) if c["impl"] == "fused")
    assert ran == [("FusedConv2dMaxPool", False, False), ("FusedConv2dMaxPool", False, True),
                   ("FusedConv2dMaxPool", True, True)]
    assert [f["config"] for f in stem["faulted"]] == [{"SPACE_TO_DEPTH": 1}]
    assert [t["config"] for t in stem["timed"]] == [None, {"POOL_APART": 1}, {"SPACE_TO_DEPTH": 1, "POOL_APART": 1}]

    # A network that faults the GPU before the sweep (its first call's candidates run there first)
    # is saved as such and not timed before again; the sweep and the networks after it still are.
    monkeypatch.setattr(sweep, "plan_of", plan_of)
    out = tmp_path / "network.json"
    args = ["--device", "cpu", "--limit", "1", "--size", "32", "--json", str(out), "--network", "eager_channels_last"]
    time_impl = sweep.bench.time_impl
    calls = []

    def faults_first(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise fault
        return time_impl(*a, **k)

    monkeypatch.setattr(sweep.bench, "time_impl", faults_first)
    assert sweep.cli(args) == sweep.FAULT_EXIT
    (network,) = json.loads(out.read_text())["cases"]
    assert network["fault"] and network["when"] == "before" and "illegal memory access" in network["error"]
    cases = sweep.main(args + ["--resume"])
    assert len(calls) == 2  # after the sweep only
    assert [(c["impl"], c["when"], "median_ms" in c) for c in cases if c["model"] == "resnet50"] == [
        ("eager_channels_last", "before", False), ("eager_channels_last", "after", True)]
    assert [c["layer"] for c in cases if c["impl"] == "fused"] == ["C3 K64 7x7/2 32x32 +maxpool"]


def exits_at_task_1(task):
    """A compile worker for the test below: task 1 ends its process as a crashing compiler would."""
    import os

    if task == 1:
        os._exit(3)
    return [(task, "no fit")]


def fails_at_task_1(task):
    """A compile worker for the test below: task 1 raises, as a chunk that fails outside its configs."""
    if task == 1:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    return [(task, "no fit")]


def test_a_compile_worker_that_dies_costs_the_sweep_its_unfinished_chunks_only(capsys):
    # A crash inside the compiler kills its worker process, and with it the pool: the chunks not
    # done are left to compile when timed (empty failure lists) instead of ending the sweep.
    sweep = load_sweep()
    results = sweep.precompile([0, 1, 2, 3, 4, 5], 2, work=exits_at_task_1)
    assert len(results) == 6 and results[1] == []
    assert all(r in ([], [(i, "no fit")]) for i, r in enumerate(results))
    assert "a compile worker died" in capsys.readouterr().err
    # one process, nothing dies: every task's own result
    assert sweep.precompile([0, 2], 1, work=exits_at_task_1) == [[(0, "no fit")], [(2, "no fit")]]
    # a chunk that raises costs that chunk alone
    assert sweep.precompile([0, 1, 2], 2, work=fails_at_task_1) == [[(0, "no fit")], [], [(2, "no fit")]]
    assert "a compile worker died or failed: the configs of 1 of 3 chunks" in capsys.readouterr().err


def test_the_sweep_says_how_each_chained_layer_chose_to_run():
    import torch
    from fused_resnet.kernels import backend

    from fused_resnet import FusedChain1x1

    def chain():
        return FusedChain1x1(torch.randn(8, 16, 1, 1), None, torch.randn(4, 8, 1, 1), None)

    model = torch.nn.Sequential(chain(), chain(), chain(), chain())
    ways = ["one kernel", "first conv apart", "next conv apart"]
    for layer, way in zip(model, ways):
        layer._plans["x"] = backend.PlanChoice("conv_chain_1x1:plan", "key", ways)
        layer._plans["x"].chosen = way  # model[3] has not chosen yet
    model[3]._plans["x"] = backend.PlanChoice("conv_chain_1x1:plan", "key", ways)
    assert load_sweep().chain_plans(model) == {"0": "one kernel", "1": "first conv apart", "2": "next conv apart"}


def test_what_the_chained_networks_chose_joins_the_table(tmp_path, monkeypatch):
    from fused_resnet.kernels import configs

    table = tmp_path / "tuned_configs.json"
    table.write_text('{"version": 1, "entries": []}')
    monkeypatch.setattr(configs, "TABLE_PATH", table)
    monkeypatch.setenv("FUSED_RESNET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(configs, "_table", None)
    monkeypatch.setattr(configs, "_cache", None)
    chain = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 2}
    configs.remember("H100", "conv_chain_1x1", "float16", "k1", chain)
    configs.remember("H100", "conv_chain_1x1:plan", "float16", "k1", {"plan": 2})
    configs.remember("H100", "conv2d_bias_act", "float16", "k2", {"BLOCK_M": 128})  # the sweep's to decide
    configs.remember("H200", "chain_1x1:plan", "float16", "k3", {"plan": 0})  # another GPU
    shipped = load_sweep().ship_chain_choices("H100")
    assert set(shipped) == {("H100", op, "float16", "k1") for op in ("conv_chain_1x1", "conv_chain_1x1:plan")}
    rows = json.loads(table.read_text())["entries"]
    assert {(r["op"], json.dumps(r["config"], sort_keys=True)) for r in rows} == {
        ("conv_chain_1x1", json.dumps(chain, sort_keys=True)), ("conv_chain_1x1:plan", '{"plan": 2}')}


@pytest.mark.parametrize("default", [True, False], ids=["space_to_depth_first", "direct_first"])
def test_the_sweep_ships_the_stems_fastest_way_to_run(monkeypatch, default):
    sweep = load_sweep()
    monkeypatch.setattr(sweep.igemm, "SPACE_TO_DEPTH", default)  # the layout of each plan's way 0
    first, second = ("space_to_depth", "direct") if default else ("direct", "space_to_depth")
    pooled = ("H100", "conv2d_bias_act_maxpool", "float16", "stem")  # the default layout's kernels
    conv = ("H100", "conv2d_bias_act", "float16", "stem conv")
    other = [("H100", "conv2d_bias_act_maxpool", "float16", "other stem"),
             ("H100", "conv2d_bias_act", "float16", "other conv")]  # never a way's key
    stem_way = ("H100", "conv2d_bias_act_maxpool:plan", "float16", "stem")
    conv_way = ("H100", "conv2d_bias_act:plan", "float16", "stem conv")

    def ways(pooled_ms, apart_ms, other_pooled_ms, other_apart_ms):
        timed = {first: (pooled_ms, {}, [pooled]), "pool_apart_" + first: (apart_ms, {}, [conv]),
                 second: (other_pooled_ms, {}, other[:1]), "pool_apart_" + second: (other_apart_ms, {}, other[1:])}
        return sweep.stem_ways({name: t for name, t in timed.items() if t[0] is not None})

    assert ways(0.5, 0.6, 0.7, 0.8) == {stem_way: {"plan": 0}, conv_way: {"plan": 0}}  # one kernel
    assert ways(0.9, 0.6, 0.7, 0.8) == {stem_way: {"plan": 1}, conv_way: {"plan": 0}}  # conv, then pooling
    assert ways(0.9, 0.8, 0.5, 0.6) == {stem_way: {"plan": 2}, conv_way: {"plan": 1}}  # one kernel, other layout
    assert ways(0.9, 0.8, 0.95, 0.6) == {stem_way: {"plan": 1}, conv_way: {"plan": 1}}  # conv over the other layout
    assert ways(0.9, 0.6, None, None) == {stem_way: {"plan": 1}}  # the other layout unmeasured: the conv's left open
    assert ways(None, 0.6, 0.5, 0.8) == {conv_way: {"plan": 0}}  # no way 0 measured: no key for the stem's way
    assert ways(0.5, None, None, None) == {}  # nothing to choose from
    # A stem without its pooling: its conv's layout alone.
    unpooled = {first: (0.7, {}, [conv]), second: (0.6, {}, other[1:])}
    assert sweep.stem_ways(unpooled) == {conv_way: {"plan": 1}}
    assert sweep.stem_ways({"direct": (0.5, {}, [conv])}) == {}  # a conv of one layout: no choice


@pytest.mark.skipif(HAS_CUDA, reason="the CPU check of the harness")
def test_the_sweep_runs_one_config_of_one_layer_alone(tmp_path, capsys):
    # How a config that faulted the GPU is looked at: alone, by its layer's name and its config as the
    # results file gives them (under compute-sanitizer, on the GPU).
    sweep = load_sweep()
    args = ["--device", "cpu", "--limit", "3", "--size", "32", "--json", str(tmp_path / "one.json")]
    cases = sweep.main(args + ["--layer", "conv1", "--config", '{"SPACE_TO_DEPTH": 1}'])
    (fused,) = [c for c in cases if c["impl"] == "fused"]
    assert fused["name"] == "conv1" and [t["config"] for t in fused["timed"]] == [{"SPACE_TO_DEPTH": 1}]
    with pytest.raises(SystemExit, match="no distinct layer named"):
        sweep.main(args + ["--layer", "layer9.conv9"])


WORKER_SCRIPT = """
import importlib.util, json, os, sys
import torch, torchvision
from fused_resnet.validate import synthetic_batchnorm

spec = importlib.util.spec_from_file_location("sweep_convs", sys.argv[1])  # (not conftest: no interpreter)
sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sweep)

model = synthetic_batchnorm(torchvision.models.resnet50(), size=32)
name, layer, x_shape, r_shape = next(l for l in sweep.distinct_layers(model, 2, 32, torch.float16, "cpu")
                                     if l[0] == "layer1.0.conv2")
good = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "FLAT_LOOP": 1, "USE_TMA": 0, "BOX_W": 8,
        "num_warps": 4, "num_stages": 3}
bad = {**good, "BOX_W": 0, "BLOCK_K": 24}  # not a power of two: Triton refuses to compile it
failed = sweep._compile_worker(((layer, x_shape, r_shape, torch.float16), [good, bad], "H100"))
cache = os.environ["TRITON_CACHE_DIR"]
compiled = [f for _, _, files in os.walk(cache) for f in files if f.endswith(".cubin")]
print(json.dumps({"failed": [[c, e] for c, e in failed], "cubins": len(compiled)}))
"""


def test_the_sweeps_compile_workers_compile_without_running(tmp_path):
    # The sweep's workers only compile (kernels.precompile's listing, then Triton's compiler into the
    # cache the sweep's own process then finds): a config that would fault the GPU does so where it is
    # timed and recorded, not in a worker. Here for an H100, without one, in a child process without
    # the interpreter.
    result = run_compiling(WORKER_SCRIPT, tmp_path, ROOT / "benchmarks" / "sweep_convs.py")
    assert [c["BLOCK_K"] for c, _ in result["failed"]] == [24]  # the good config compiled, the bad one said so
    assert result["cubins"] == 1
