"""The command line: a tiny run end to end, and one-line errors with non-zero exits on bad input."""

import json
import subprocess
import sys

import pytest

from lora_jax.cli import main, train_main

from .conftest import ROOT


def args(model, glue, out, *extra):
    return ["--task", "rte", "--model", str(model), "--data-dir", str(glue), "--preset", "tiny",
            "--max-steps", "2", "--output-dir", str(out), "--no-progress", *extra]


def test_tiny_run(tiny_bert_dir, glue_dir, tmp_path, capsys):
    # --num-buckets 0: one shape, so one train and one eval compilation.
    assert train_main(args(tiny_bert_dir, glue_dir, tmp_path / "r", "--lora-rank", "2", "--num-buckets", "0")) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["config"]["lora_rank"] == 2 and report["config"]["batch_size"] == 8  # flag > preset
    assert report["steps"] == 2 and report["lora_params"] == 2 * 2 * (32 * 2 + 2 * 32)
    assert "dev/accuracy final" in capsys.readouterr().out


def test_refuses_existing_run(tiny_runs, tiny_bert_dir, glue_dir, capsys):
    out = tiny_runs["rte"]
    before = {f: (out / f).read_bytes() for f in ("report.json", "config.json", "metrics.jsonl")}
    assert train_main(args(tiny_bert_dir, glue_dir, out)) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert all((out / f).read_bytes() == b for f, b in before.items())  # nothing lost


@pytest.mark.slow
def test_overwrite_replaces_an_existing_run(tiny_bert_dir, glue_dir, tmp_path):
    out = tmp_path / "r"
    assert train_main(args(tiny_bert_dir, glue_dir, out)) == 0
    assert train_main(args(tiny_bert_dir, glue_dir, out, "--overwrite", "--seed", "3")) == 0
    assert json.loads((out / "report.json").read_text())["config"]["seed"] == 3


@pytest.mark.parametrize("extra, match", [
    (["--task", "glue9"], "unknown task 'glue9'"),
    (["--batch-size", "0"], "--batch-size must be > 0"),
    (["--max-seq-len", "4096"], "exceeds the model's maximum of 72 positions"),
    (["--lora-rank", "0"], "LoRA rank must be a positive integer"),
    (["--lora-rank", "64"], "exceeds min(d_in, d_out)"),
    (["--lora-alpha", "-1"], "alpha must be > 0"),
    (["--lora-dropout", "1.5"], "dropout must be in [0, 1)"),
    (["--targets", ".*/querry/kernel"], "matches no parameter"),
])
def test_bad_flags_one_line(tiny_bert_dir, glue_dir, tmp_path, capsys, extra, match):
    assert train_main(args(tiny_bert_dir, glue_dir, tmp_path / "r", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "r").exists()  # nothing half-written


@pytest.mark.parametrize("extra, match", [
    (["--remat", "bogus"], "argument --remat: invalid choice: 'bogus'"),
    (["--lora-rank", "eight"], "argument --lora-rank: a positive integer or auto"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_bad_command_line_one_line(tiny_bert_dir, glue_dir, tmp_path, capsys, extra, match):
    # argparse's own errors too: one line naming the problem, not the whole usage block; exit 2.
    with pytest.raises(SystemExit) as exit_:
        train_main(args(tiny_bert_dir, glue_dir, tmp_path / "r", *extra))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_bad_data_dir(tiny_bert_dir, tmp_path, capsys):
    (tmp_path / "glue" / "RTE").mkdir(parents=True)
    assert train_main(args(tiny_bert_dir, tmp_path / "glue", tmp_path / "r")) == 2
    assert "RTE/train.tsv not found" in capsys.readouterr().err


@pytest.mark.slow
def test_diverged_run_exits_1(tiny_bert_dir, glue_dir, tmp_path, capsys):
    assert train_main(args(tiny_bert_dir, glue_dir, tmp_path / "r", "--lr", "1e30", "--max-grad-norm", "1e30",
                           "--max-steps", "10")) == 1
    assert "training diverged" in capsys.readouterr().err


def test_unknown_subcommand():
    assert main(["frobnicate"]) == 2


@pytest.mark.slow
def test_script_bad_model_is_one_line(tmp_path):
    # The script trains as asked (--method full included) in the README's commands (tests/test_readme.py).
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--task", "rte", "--model",
                          str(tmp_path / "missing"), "--output-dir", str(tmp_path / "r2")],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: model directory")


@pytest.mark.slow
def test_compile_cache_reused_across_runs(tiny_bert_dir, glue_dir, tmp_path):
    # Subprocesses: the cache is a process-wide JAX setting that must not leak into other tests.
    cache = tmp_path / "cache"
    reports = []
    for run in ("a", "b"):
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"),
                               *args(tiny_bert_dir, glue_dir, tmp_path / run, "--compile-cache", str(cache),
                                     "--num-buckets", "0")],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        reports.append(json.loads((tmp_path / run / "report.json").read_text()))
        if run == "a":
            entries = sorted(p.name for p in cache.iterdir())
            assert entries, "the first run stored nothing"
    # The second run loaded what the first stored (no new entries) and trained to the same result.
    assert sorted(p.name for p in cache.iterdir()) == entries
    assert reports[0]["compile_cache"] == reports[1]["compile_cache"] == str(cache)
    assert reports[0]["metrics"] == reports[1]["metrics"]
    losses = [[r["loss"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
               if "loss" in r] for run in ("a", "b")]
    assert losses[0] == losses[1] and len(losses[0]) == 2


def test_compile_cache_bad_dir(tiny_bert_dir, glue_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert train_main(args(tiny_bert_dir, glue_dir, tmp_path / "r", "--compile-cache", str(tmp_path / "file"))) == 2
    err = capsys.readouterr().err.strip()
    assert "--compile-cache" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "r").exists()
