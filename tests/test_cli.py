"""The command line at tiny sizes on the CPU: verify, bench, the default run, and the JSON they write."""

import json
import re

import pytest

from fused_resnet import __main__ as cli
from fused_resnet import kernels

CASE_KEYS = {"model", "impl", "dtype", "batch", "size", "min_ms", "q1_ms", "median_ms", "q3_ms", "max_ms", "iters",
             "first_call_s", "images_per_s"}
PROVENANCE_KEYS = {"gpu", "driver", "cuda", "torch", "triton", "commit", "command", "date"}


def test_verify_writes_the_errors(tmp_path, capsys):
    out = tmp_path / "verify.json"
    # resnet18 through the Triton kernels (interpreted without a GPU).
    cli.main(["verify", "--arch", "resnet18", "--batch", "1", "--size", "32", "--json", str(out), "--quiet"])
    result = json.loads(out.read_text())
    assert {"max_abs_err", "max_rel_err", "top1_agreement"} <= set(result)
    assert result["max_rel_err"] < 1e-4 and result["top1_agreement"] == 1.0
    printed = capsys.readouterr().out
    assert "top-1 agreement 100.0%" in printed and "random weights" in printed


def test_bench_table_and_json_schema(tmp_path, capsys):
    out = tmp_path / "bench.json"
    with kernels.use_backend("reference"):
        cli.main(["bench", "--arch", "resnet18", "--batch", "2", "--size", "32", "--iters", "2", "--impl", "eager",
                  "eager_channels_last", "fused", "fused_cuda_graph", "--json", str(out), "--quiet"])
    payload = json.loads(out.read_text())
    assert PROVENANCE_KEYS <= set(payload["provenance"])
    assert [c["impl"] for c in payload["cases"]] == ["eager", "eager_channels_last", "fused"]
    for case in payload["cases"]:
        assert set(case) == CASE_KEYS
        assert case["median_ms"] > 0 and case["images_per_s"] == pytest.approx(2e3 / case["median_ms"], rel=1e-2)
        assert case["min_ms"] <= case["q1_ms"] <= case["median_ms"] <= case["q3_ms"] <= case["max_ms"]
        assert case["iters"] == 2
    printed = capsys.readouterr().out
    assert "vs eager_channels_last" in printed and "fused_cuda_graph" in printed and "needs CUDA" in printed
    assert "no Triton kernel" in printed  # a CPU run says it is one


def test_default_run_verifies_then_benches(monkeypatch, capsys):
    monkeypatch.setitem(cli.CPU_DEFAULTS, "batch", 1)
    monkeypatch.setitem(cli.CPU_DEFAULTS, "size", 32)
    monkeypatch.setitem(cli.CPU_DEFAULTS, "iters", 1)
    with kernels.use_backend("reference"):
        assert cli.main([]) == 0
    printed = capsys.readouterr().out
    assert printed.index("verify resnet50") < printed.index("bench resnet50")
    assert "top-1 agreement" in printed and "images/s" in printed


def usage_error(capsys, argv):
    """Run the CLI on argv, which it must refuse: exit status 2 and one line on stderr, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_bad_arguments_are_clear(tmp_path, monkeypatch, capsys):
    err = usage_error(capsys, ["verify", "--arch", "vgg11", "--quiet"])
    assert "invalid choice: 'vgg11'" in err and "resnet50" in err
    err = usage_error(capsys, ["verify", "--arch", "resnet18", "--weights", str(tmp_path / "missing.pt"), "--quiet"])
    assert "neither a file nor a torchvision weights name" in err and len(err.strip().splitlines()) == 1
    import torch

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    err = usage_error(capsys, ["verify", "--arch", "resnet18", "--weights", "IMAGENET1K_V1", "--quiet"])
    assert "not cached" in err and len(err.strip().splitlines()) == 1
    not_weights = tmp_path / "notes.pt"
    not_weights.write_text("not a state dict")
    err = usage_error(capsys, ["verify", "--arch", "resnet18", "--weights", str(not_weights), "--quiet"])
    assert f"--weights {not_weights}: not a resnet18 state_dict" in err


@pytest.mark.parametrize("argv,message", [
    (["bench", "--iters", "0"], "--iters must be at least 1, got 0"),
    (["bench", "--iters", "-3"], "--iters must be at least 1, got -3"),
    (["verify", "--batch", "0"], "--batch must be at least 1, got 0"),
    (["profile", "--size", "-1"], "--size must be at least 1, got -1"),
    (["profile", "--iters", "0"], "--iters must be at least 1, got 0"),
    (["bench", "--json", "{tmp}/missing/out.json"], "the folder {tmp}/missing does not exist"),
    (["verify", "--json", "{tmp}"], "is a folder"),
    (["profile", "--plot", "{tmp}/missing/chart.png"], "the folder {tmp}/missing does not exist"),
    (["profile", "--readme", "{tmp}/nothing.md"], "no writable file there"),
    (["profile", "--readme", "{tmp}/plain.md"], "has no profile markers"),
    (["profile", "--readme", "{tmp}/plain.md", "--no-ablation"], "--readme needs the ablation"),
])
def test_every_argument_is_checked_before_any_work(tmp_path, capsys, monkeypatch, argv, message):
    (tmp_path / "plain.md").write_text("# no markers\n")

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(cli.bench, "load_model", no_work)
    argv = [a.format(tmp=tmp_path) for a in argv] + ["--quiet"]
    err = usage_error(capsys, argv)
    assert err.startswith("fused-resnet: error: ") and len(err.strip().splitlines()) == 1, err
    assert message.format(tmp=tmp_path) in err


def test_help_lists_architectures_devices_and_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for arch in cli.bench.ARCHS:
        assert arch in text
    assert "where to run" in text and "(default: auto)" in text and "(default: resnet50)" in text
    assert "(default: 50 on a GPU, 10 on a CPU)" in text


def test_bench_says_when_the_spread_hides_the_difference(monkeypatch, capsys):
    # Made-up timings: two implementations 2% apart whose runs spread by 40%, and one 3x faster.
    fake = {"eager": [10.0, 14.0, 12.0, 9.0, 13.0], "eager_channels_last": [10.0, 14.0, 12.2, 9.0, 13.0],
            "fused": [4.0, 4.1, 4.0, 4.1, 4.0]}

    def fake_time(fn, x, *, iters, progress, warmup_note):
        return None, fake[fn]

    monkeypatch.setattr(cli.bench, "build_impls",
                        lambda model, names, *a: ({n: (n, None) for n in names}, {}))
    monkeypatch.setattr(cli.bench, "time_impl", fake_time)
    monkeypatch.setattr(cli.bench, "first_call", lambda fn, cuda: 0.5)
    status = cli.main(["bench", "--arch", "resnet18", "--batch", "1", "--size", "32", "--iters", "5", "--impl",
                        "eager", "eager_channels_last", "fused", "--quiet"])
    assert status == 0
    printed = capsys.readouterr().out
    rows = {line.split()[0]: line for line in printed.splitlines() if re.match(r"\s+\w+\s+\d", line)}
    eager_line, fused_line = rows["eager"], rows["fused"]
    assert "(noise)" in eager_line and "10.000-13.000" in eager_line
    assert "(noise)" not in fused_line and "3.05x" in fused_line
    assert "eager differ from eager_channels_last by less than the spread" in printed


def test_weights_from_a_state_dict_file(tmp_path, capsys):
    import torch
    import torchvision

    path = tmp_path / "r18.pt"
    torch.manual_seed(3)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with kernels.use_backend("reference"):
        cli.main(["verify", "--arch", "resnet18", "--batch", "1", "--size", "32", "--weights", str(path), "--quiet"])
    assert f"state_dict from {path}" in capsys.readouterr().out


def test_cudnn_baselines_run_cudnns_fastest_algorithm(monkeypatch):
    # A baseline timed against tuned kernels must be tuned too: on a GPU every timing path turns on
    # cuDNN's own search for the fastest algorithm, and the results file says whether it was on.
    import torch

    from fused_resnet import bench

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    bench.tuned_cudnn(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False and bench.provenance("x", torch.device("cpu"))[
        "cudnn_benchmark"] is False
    bench.tuned_cudnn(torch.device("cuda"))
    assert torch.backends.cudnn.benchmark is True
    assert bench.provenance("x", torch.device("cpu"))["cudnn_benchmark"] is True
