"""The README's commands are the ones CI runs."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"^(python3 -m venv .+)$", text, flags=re.M)


def test_readme_gives_the_main_job_and_the_test_command():
    commands = readme_commands()
    assert any(c.endswith("python -m fused_resnet") for c in commands), commands
    assert any("pytest" in c for c in commands), commands


def test_ci_runs_the_readmes_test_command():
    test_command = next(c for c in readme_commands() if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_readme_fusion_guide_matches_the_profile_command():
    # The guide's ablation table is generated; it must still be what the traffic model says.
    import torch
    import torchvision

    from fused_resnet.profile import README_BEGIN, README_END, profile, readme_block

    text = (ROOT / "README.md").read_text()
    block = text.split(README_BEGIN, 1)[1].split(README_END, 1)[0].strip()
    command = re.search(r"`(fused-resnet profile [^`]*)`", block).group(1)
    args = dict(re.findall(r"--(arch|batch|size|dtype) (\S+)", command))
    result = profile(getattr(torchvision.models, args["arch"])(), batch=int(args["batch"]), size=int(args["size"]),
                     dtype=getattr(torch, args["dtype"]), device=torch.device("cpu"))
    assert block == readme_block(result, command), "regenerate with: " + command + " --readme README.md"


def test_readme_compare_example_prints_as_compare_does():
    from fused_resnet.validate import Comparison

    text = (ROOT / "README.md").read_text()
    example = re.search(r"^# (max abs err .*)$", text, flags=re.M).group(1)
    printed = str(Comparison(1e-3, 1e-4, 1.0, (0, 0), 0, "torch.float32", "torch.float16"))
    assert example.split("%", 1)[1] == printed.split("%", 1)[1], (example, printed)
