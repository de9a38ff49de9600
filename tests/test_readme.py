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
