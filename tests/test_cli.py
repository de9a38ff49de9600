"""The command line at tiny sizes on the CPU: verify, bench, the default run, and the JSON they write."""

import json

import pytest

import kernels
from fused_resnet import __main__ as cli

CASE_KEYS = {"model", "impl", "dtype", "batch", "size", "median_ms", "images_per_s"}
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


def test_bad_arguments_are_clear(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="unknown architecture"):
        cli.main(["verify", "--arch", "resnet7", "--quiet"])
    with pytest.raises(SystemExit, match="neither a file nor a torchvision weights name"):
        cli.main(["verify", "--arch", "resnet18", "--weights", str(tmp_path / "missing.pt"), "--quiet"])
    with pytest.raises(SystemExit, match="not cached"):
        import torch
        monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
        cli.main(["verify", "--arch", "resnet18", "--weights", "IMAGENET1K_V1", "--quiet"])


def test_weights_from_a_state_dict_file(tmp_path, capsys):
    import torch
    import torchvision

    path = tmp_path / "r18.pt"
    torch.manual_seed(3)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with kernels.use_backend("reference"):
        cli.main(["verify", "--arch", "resnet18", "--batch", "1", "--size", "32", "--weights", str(path), "--quiet"])
    assert f"state_dict from {path}" in capsys.readouterr().out
