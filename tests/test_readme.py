"""Every command in the README's "More commands" block runs, in order, exactly as written."""

import re
import subprocess
import sys

from .conftest import ROOT, shared_path


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## More commands.*?```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_more_commands_block_runs():
    shared_path("models", "all-MiniLM-L6-v2")
    commands = readme_commands()
    assert len(commands) >= 10
    for command in commands:
        assert command.startswith("python ")
        argv = [sys.executable, *command.split()[1:]]
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-2000:]}"
