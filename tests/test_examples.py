"""The examples run: LoRA on a conv net, briefly (the full run's numbers are in results/conv/)."""

import json
import subprocess
import sys

import pytest

from .conftest import ROOT


@pytest.mark.slow
def test_conv_lora_example(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "conv_lora.py"), "--steps", "5", "--pre-steps", "10",
                           "--seeds", "0", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "conv.json").read_text())
    m = record["methods"]
    assert list(m) == ["head only", "LoRA", "full fine-tuning"]
    assert m["head only"]["trained_params"] < m["LoRA"]["trained_params"] < m["full fine-tuning"]["trained_params"]
    for name in ("head only", "LoRA"):  # the pretrained body did not move, bit for bit
        assert all(r["frozen"] > 0 and r["frozen_unchanged"] for r in m[name]["runs"])
    assert all(0 <= r["accuracy_5_9"] <= 1 for x in m.values() for r in x["runs"])
    assert "| LoRA |" in (tmp_path / "conv.md").read_text()


def test_conv_lora_bad_flag(capsys, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("conv_lora", ROOT / "examples" / "conv_lora.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "conv_lora", module)  # Flax modules are dataclasses: they look themselves up
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["conv_lora.py", "--rank", "0"])
    assert module.main() == 2
    assert capsys.readouterr().err.strip() == "error: --rank must be > 0, got 0"
