"""The installed package: kernels/ ships as fused_resnet.kernels, never as a top-level `kernels`
(the name of another PyPI package, which an install of ours must not overwrite)."""

import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_wheel_holds_no_top_level_kernels(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=600)
    wheel = next(tmp_path.glob("fused_resnet-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith((".dist-info", ".data"))}
    assert top_level == {"fused_resnet"}, sorted(top_level)
    assert "fused_resnet/kernels/conv2d.py" in names and "fused_resnet/kernels/__init__.py" in names
    assert "fused_resnet/kernels/tuned_configs.json" in names  # the tuned configs ship with the kernels


def test_kernels_import_under_the_package_only():
    from fused_resnet import kernels

    assert kernels.__name__ == "fused_resnet.kernels"
    # Run from the repository root, where the folder kernels/ is importable by its bare name.
    probe = subprocess.run([sys.executable, "-c", "import kernels"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert probe.returncode != 0 and "import them as `from fused_resnet import kernels`" in probe.stderr


def test_nothing_imports_a_top_level_kernels():
    offenders = []
    for path in ROOT.glob("*/**/*.py"):
        if path.parts[len(ROOT.parts)] in (".venv", "build"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            words = line.split()
            if words[:2] == ["import", "kernels"] or (words[:1] == ["from"] and words[1:2] and
                                                      words[1].split(".")[0] == "kernels"):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, offenders
