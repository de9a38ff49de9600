"""benchmarks/report.py on a small fixture: the table, the README rewrite and the chart."""

import json

import pytest
from conftest import load_benchmark

report = load_benchmark("report")

PROV = {"gpu": "NVIDIA H100 80GB HBM3", "driver": "550.1", "cuda": "12.8", "torch": "2.11.0", "triton": "3.6.0",
        "commit": "abc1234", "command": "pytest benchmarks/", "date": "2026-11-24T10:00:00+00:00"}


def case(impl, ms, model="resnet50"):
    return {"model": model, "impl": impl, "dtype": "float16", "batch": 256, "size": 224, "median_ms": ms,
            "images_per_s": 256 / ms * 1e3}


@pytest.fixture
def results(tmp_path):
    gpu = tmp_path / "gpu.json"
    gpu.write_text(json.dumps({"provenance": PROV, "cases": [
        case("eager_channels_last", 10.0), case("fused", 8.0), case("fused", 1.0, model="resnet50-conv"),
        {"model": "resnet50", "impl": "fused", "dtype": "float16", "batch": 256, "host_ms": 2.0},
        {"model": "resnet50", "impl": "eager_channels_last", "dtype": "float16", "batch": 256, "host_ms": 8.0},
        {"model": "resnet50", "impl": "fused", "dtype": "float16", "batch": 256, "first_call_s": 20.0, "cache": "cold",
         "how": "forward", "compile_ahead_s": 12.5},
        {"model": "resnet50", "impl": "fused", "dtype": "float32", "batch": 256, "first_call_s": None, "cache": "cold",
         "how": "warmup", "tf32": False, "error": "did not finish within 240 s"},
        {"model": "resnet50", "impl": "fused", "dtype": "float16", "batch": 256, "median_ms": 4.0, "when": "after"}]}))
    cpu = tmp_path / "cpu.json"
    cpu.write_text(json.dumps({"provenance": {**PROV, "gpu": None}, "cases": [case("fused", 500.0)]}))
    return [str(gpu), str(cpu)]


def test_table_reports_gpu_network_cases_with_speedups(results):
    text = report.table(report.load(results))
    sections = text.split("\n\n")  # the timings; a title, the host times; a title, the first calls; the runs
    timings, host, first = sections[0], sections[2], sections[4]
    rows = [line for line in timings.splitlines() if line.startswith("| NVIDIA")]
    assert len(rows) == 3  # the CPU run and the per-layer case are left out
    assert "| fused | 8.000 | 32000 | 1.25x | gpu.json |" in rows[1]
    assert "| fused | 4.000 | 64000 | 2.50x | gpu.json |" in rows[2]  # images/s from the batch where not given
    assert "driver 550.1" in text and "`pytest benchmarks/`" in text
    # host times against the baseline's, and first calls (one that failed says why), each a table of its own
    assert "| fused | 2.000 | 0.25x | gpu.json |" in host and "| eager_channels_last | 8.000 | 1.00x |" in host
    assert "| float16 | 256 | forward | cold | 20.0 | 12.5 | gpu.json |" in first
    assert "| float32 (TF32 off) | 256 | warmup | cold | did not finish within 240 s | - |" in first


def compile_report(tmp_path, name, date, command, cases, **summary):
    path = tmp_path / name
    path.write_text(json.dumps({
        "provenance": {**PROV, "gpu": None, "triton": "3.6.0", "date": date, "command": command,
                       "commit": date[8:10] + "abcde"},
        "cases": [{"arch": "resnet50", "dtype": "float16", "batch": 256, "target": "H100", "tf32": None,
                   "spill_bytes": 0, **c} for c in cases],
        "summary": {"jobs": len(cases), "compile_s": 12.4, "workers": 2, "failed": 0, **summary}}))
    return str(path)


def test_compile_table_gives_the_newest_report_of_each_kind(tmp_path, results):
    command = "python benchmarks/compile_report.py --arch resnet50 --dtype float16 --workers 2"
    files = [
        compile_report(tmp_path, "old.json", "2026-11-24T10:00:00+00:00", command, [{}, {"spill_bytes": 8}]),
        compile_report(tmp_path, "new.json", "2026-12-03T10:00:00+00:00", command,
                       [{"registers": 143, "shared": 65552, "num_warps": 8},  # 1 an SM: its registers
                        {"registers": 101, "shared": 65552, "num_warps": 8},  # 2
                        {"registers": 58, "shared": 229376, "num_warps": 4}],  # 1: its shared memory
                       spilled=0, issue_ratio_median=0.416),
        compile_report(tmp_path, "chain.json", "2026-11-25T10:00:00+00:00", command + " --chain-blocks --chain-3x3",
                       [{}], spilled=1),
        compile_report(tmp_path, "ieee.json", "2026-11-25T10:00:00+00:00", command,
                       [{"arch": "resnet18", "dtype": "float32", "tf32": False, "batch": 8, "spill_bytes": 4}]),
        compile_report(tmp_path, "sweep.json", "2026-11-25T10:00:00+00:00",
                       "python benchmarks/compile_report.py --sweep", [{}] * 5, spilled=2, one_per_sm=3),
        *results,  # GPU runs and whole-network timings are not compile reports
    ]
    reports = report.load_compile_reports(files)
    assert [name for name, *_ in reports] == ["ieee.json", "new.json", "chain.json", "sweep.json"]
    text = report.compile_table(reports)
    rows = text.splitlines()[2:]
    # Spilling counted from the cases where the summary lacks it; programs an SM where they have registers.
    assert rows[0] == ("| resnet18 | float32 (TF32 off) | 8 | H100 | 3.6 | 1 | 12 (2) | 0 | 1 | - | - | ieee.json "
                       "| 25abcde |")
    assert rows[1] == "| resnet50 | float16 | 256 | H100 | 3.6 | 3 | 12 (2) | 0 | 0 | 2 | 0.42 | new.json | 03abcde |"
    assert rows[2].startswith("| resnet50, chain_blocks, chain_3x3 | float16 |")
    assert rows[3].startswith("| resnet50, the conv sweep | float16 | 256 | H100 | 3.6 | 5 | 12 (2) | 0 | 2 | 3 |")
    assert report.compile_table([]) == "No compile report is committed in benchmarks/results/ yet."


def test_readme_rewrite_between_markers(results, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.BEGIN}\nold table\n{report.END}\nmiddle\n"
                      f"{report.COMPILE_BEGIN}\nold compile table\n{report.COMPILE_END}\noutro\n")
    command = "python benchmarks/compile_report.py --arch resnet50"
    compiled = compile_report(tmp_path, "c.json", "2026-12-03T10:00:00+00:00", command, [{}])
    report.main([*results, compiled, "--readme", str(readme)])
    text = readme.read_text()
    assert "old table" not in text and "1.25x" in text
    assert "old compile table" not in text and "| c.json |" in text
    assert text.startswith("intro\n") and text.endswith("outro\n") and "\nmiddle\n" in text
    assert report.table([]) == "No GPU run is committed in benchmarks/results/ yet."


def test_chart_is_a_png(results, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "chart.png"
    report.main([*results, "--plot", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
