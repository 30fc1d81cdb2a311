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
