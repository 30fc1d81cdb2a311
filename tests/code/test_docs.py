"""The README stays true: its two set-up commands are what CI runs, its settings table is the
settings' own, and every CLI command it shows exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def first_code_block() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert block, "README must open with a bash block holding the two commands"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_run_and_test_commands_and_ci_runs_the_test_one():
    run_cmd, test_cmd = first_code_block()[:2]
    assert "urbansound up" in run_cmd and "scripts/setup.sh" in run_cmd
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"exec {test_cmd}" in ci


def test_configuration_table_matches_the_settings():
    table = subprocess.run([sys.executable, str(ROOT / "scripts" / "settings_table.py")],
                           capture_output=True, text=True, check=True, cwd=ROOT,
                           env={"PYTHONPATH": str(ROOT)}).stdout.strip()
    assert table in README, "regenerate with: python scripts/settings_table.py"


def test_every_urbansound_command_in_the_readme_exists():
    from typer.main import get_command

    from src.cli import app

    root = get_command(app)
    code = " ".join(re.findall(r"```.*?```", README, re.S) + re.findall(r"`[^`\n]+`", README))
    shown = set(re.findall(r"urbansound ([a-z]+)(?: ([a-z]+))?", code))
    assert shown
    for cmd, sub in shown:
        assert cmd in root.commands, f"urbansound {cmd} is not a command"
        group = root.commands[cmd]
        if sub and hasattr(group, "commands") and group.commands:
            assert sub in group.commands, f"urbansound {cmd} {sub} is not a command"


def test_readme_has_a_first_run_path_for_each_goal():
    section = README.split("### First run", 1)[1].split("\n## ", 1)[0]
    for needed in ("Predict", "Retrain", "notebook", "urbansound data download",
                   "urbansound data import", "upload", "retrain/plan", "data/README.md"):
        assert needed in section, needed


def test_readme_uploads_no_clip_of_the_gates_test_fold():
    """The committed model's gate tests on fold 3: an upload example from fold 3 would teach
    the next model the clips it is graded on (and the leakage guard rejects it)."""
    clip = re.search(r"^CLIP=(\S+)", README, re.M)
    assert clip and "/fold3/" not in clip.group(1)
    uploads = [line for line in README.splitlines() if "/uploads" in line or "cp " in line]
    assert not [line for line in uploads if "fold3" in line], uploads
