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


def test_many_devices_block_runs():
    """The multi-device block, as a bash script: 4 forced CPU devices, then 2 processes with --fsdp 2."""
    import json
    import os
    from pathlib import Path

    shared_path("models", "all-MiniLM-L6-v2")
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Many devices and hosts.*?```bash\n(.*?)```", text, re.S).group(1)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "-e", "-c", block], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    four = json.loads((ROOT / "runs" / "rte-4dev" / "report.json").read_text())
    assert four["parallel"]["devices"] == 4
    two = json.loads((ROOT / "runs" / "rte-2proc" / "report.json").read_text())
    assert two["parallel"] == {"devices": 2, "processes": 2, "mesh": {"data": 1, "fsdp": 2}, "platform": "cpu"}
    assert two["steps"] == 4
