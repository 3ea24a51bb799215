"""Bad input, given as a hostile user would: every probe ends in one line naming the problem and exit
status 2 (1 for a diverged loss, 130 for Ctrl-C); nothing already saved is lost; the good lines of a
predict batch are answered beside the bad ones; a damaged checkpoint is found and set aside.
docs/errors.md lists what each kind of bad input gets."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import checkpoint
from lora_jax.cli import evaluate_main, predict_main, train_main
from lora_jax.config import TrainConfig
from lora_jax.train import fit

from .conftest import ROOT, write_tiny_checkpoint


def one_line(capsys) -> str:
    """The single line a probe printed to stderr (no traceback, nothing else)."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def train_args(model, glue, out, *extra) -> list[str]:
    return ["--task", "rte", "--model", str(model), "--data-dir", str(glue), "--preset", "tiny", "--max-steps", "2",
            "--output-dir", str(out), "--no-progress", *extra]


def copy_run(run, where):
    """A copy of a tiny run that ``fit(..., resume=True)`` accepts as its own (config.json names the copy)."""
    shutil.copytree(run, where)
    cfg = json.loads((where / "config.json").read_text())
    (where / "config.json").write_text(json.dumps({**cfg, "output_dir": str(where)}))
    return TrainConfig(**{**cfg, "output_dir": str(where)})


# ----------------------------------------------------------------------------- train: flags


@pytest.mark.parametrize("flags, match", [
    (["--max-grad-norm", "-1"], "--max-grad-norm must be > 0"),  # was gradient ascent
    (["--max-grad-norm", "0"], "--max-grad-norm must be > 0"),  # was a frozen run
    (["--log-every", "0"], "--log-every must be >= 1"),  # was a crash after compiling
    (["--seed", "-5"], "--seed must be in [0, 2^32)"),  # was a traceback
    (["--seed", str(2**32)], "--seed must be in [0, 2^32)"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--epochs", "inf"], "--epochs must be a finite number"),
    (["--warmup-ratio", "nan"], "--warmup-ratio must be a finite number"),
    (["--lora-alpha", "inf"], "--lora-alpha must be a finite number"),
    (["--fsdp", "0"], "--fsdp must be >= 1"),
    (["--targets", ","], "names no pattern"),  # was a run that trained the head alone
    (["--rank-allocation", "gate", "--gate-sparsity", "2"], "--gate-sparsity must be in [0, 2)"),
    (["--rank-allocation", "gate", "--dora"], "--rank-allocation gate gates plain LoRA components"),
])
def test_train_flag_out_of_range(flags, match, tiny_bert_dir, glue_dir, tmp_path, capsys):
    assert train_main(train_args(tiny_bert_dir, glue_dir, tmp_path / "r", *flags)) == 2
    assert match in one_line(capsys)
    assert not (tmp_path / "r").exists()  # refused before anything was written


# ----------------------------------------------------------------------------- train: where it writes


def test_output_dir_that_cannot_be_written(tiny_bert_dir, glue_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert train_main(train_args(tiny_bert_dir, glue_dir, tmp_path / "file" / "run")) == 2
    assert "is a file, not a directory" in one_line(capsys)
    assert train_main(train_args(tiny_bert_dir, glue_dir, "/proc/lora-jax-probe/run")) == 2
    assert "cannot write there" in one_line(capsys)
    # A writable place is proved by creating it, and removed again when the run stops early after all.
    (tmp_path / "glue" / "RTE").mkdir(parents=True)
    assert train_main(train_args(tiny_bert_dir, tmp_path / "glue", tmp_path / "new" / "deep" / "run")) == 2
    assert "RTE/train.tsv not found" in one_line(capsys)
    assert not (tmp_path / "new").exists()


def test_overwrite_never_touches_a_directory_that_is_not_a_run(tiny_bert_dir, glue_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, model)
    before = {f.name: f.read_bytes() for f in model.iterdir()}
    for extra in ([], ["--overwrite"]):
        assert train_main(train_args(tiny_bert_dir, glue_dir, model, *extra)) == 2
        assert "not a lora-jax run" in one_line(capsys)
    assert {f.name: f.read_bytes() for f in model.iterdir()} == before  # nothing replaced, nothing added


def test_a_run_directory_is_marked_and_recognised(tiny_runs, tiny_bert_dir, glue_dir, capsys):
    from lora_jax import rundir

    out = tiny_runs["rte"]
    assert (out / rundir.MARKER).is_file() and rundir.is_run_dir(out)
    assert not rundir.is_run_dir(tiny_bert_dir)  # a model's config.json is not a run's
    assert train_main(train_args(tiny_bert_dir, glue_dir, out)) == 2
    assert "already holds a run" in one_line(capsys)


def test_train_file_that_is_not_utf8(tiny_bert_dir, glue_dir, tmp_path, capsys):
    glue = tmp_path / "glue"
    shutil.copytree(glue_dir, glue)
    with open(glue / "RTE" / "train.tsv", "ab") as f:
        f.write(b"999\tcaf\xe9 au lait\tA drink.\tentailment\n")  # Latin-1, not UTF-8
    assert train_main(train_args(tiny_bert_dir, glue, tmp_path / "r")) == 2
    assert "train.tsv is not UTF-8 text" in one_line(capsys)


@pytest.mark.parametrize("config, match", [
    (b'{"model_type": "bert", ', "config.json is not valid JSON"),
    (b'{"model_type": "b\xe9rt"}', "cannot read"),  # not UTF-8
    (b'["bert"]', "not a model config object"),
])
def test_damaged_model_config(config, match, tiny_bert_dir, glue_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, model)
    (model / "config.json").write_bytes(config)
    assert train_main(train_args(model, glue_dir, tmp_path / "r")) == 2
    assert match in one_line(capsys)


def test_warm_start_from_an_adapter_of_other_base_weights(tiny_runs, glue_dir, tmp_path, capsys):
    other = tmp_path / "other"
    write_tiny_checkpoint(other, "bert", seed=1)
    assert train_main(train_args(other, glue_dir, tmp_path / "r", "--init-adapter",
                                 str(tiny_runs["rte"] / "adapter"))) == 2
    assert "was trained on other base weights" in one_line(capsys)


# ----------------------------------------------------------------------------- train: resume


def test_resume_with_a_damaged_run_config(tiny_runs, tiny_bert_dir, glue_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_runs["rte"], run)
    text = (run / "config.json").read_text()
    (run / "config.json").write_text(text[: len(text) // 2])  # a crash half-way through writing it
    assert train_main(train_args(tiny_bert_dir, glue_dir, run, "--resume")) == 2
    assert "config.json is unreadable" in one_line(capsys)
    assert (run / "config.json").read_text() == text[: len(text) // 2]  # left as found


def test_resume_when_every_checkpoint_is_garbage(tiny_runs, tmp_path, capfd):
    cfg = copy_run(tiny_runs["rte"], tmp_path / "run")
    rng = np.random.default_rng(0)
    for f in (tmp_path / "run" / "checkpoints").rglob("*"):
        if f.is_file():
            f.write_bytes(rng.bytes(max(f.stat().st_size, 64)))
    with pytest.raises(Exception, match="no intact checkpoint"):
        fit(cfg, resume=True, progress=False)
    err = capfd.readouterr().err
    assert "Traceback" not in err, err  # Orbax's failures are our one warning per step, not its tracebacks


def test_a_flipped_byte_in_a_checkpoint_is_caught(tmp_path):
    """Damage that leaves Orbax's files readable changes the values silently; the checksums saved with
    every step catch it. Flip one byte at many places of the array file: each restore either fails
    or gives back exactly what was saved, and some of the flips only the checksum sees."""
    rng = np.random.default_rng(0)
    state = {"w": jnp.asarray(rng.normal(size=(64, 64)), jnp.float32), "step": jnp.asarray(5, jnp.int32),
             "rng": jax.random.key(3)}
    template = jax.tree.map(jnp.zeros_like, state)
    mngr = checkpoint.manager(tmp_path / "ck", keep=1)
    checkpoint.save(mngr, 1, state, {})
    files = [f for f in (tmp_path / "ck" / "1" / "state").rglob("*") if f.is_file()]
    data_file = max(files, key=lambda f: f.stat().st_size)
    data = data_file.read_bytes()
    outcomes = []
    for offset in np.linspace(0, len(data) - 1, 40).astype(int):
        flipped = bytearray(data)
        flipped[offset] ^= 0x5A
        data_file.write_bytes(bytes(flipped))
        try:
            got, _ = checkpoint.restore(mngr, 1, template)
        except checkpoint.CheckpointError as e:
            outcomes.append("checksum" if "fails its checksum" in str(e) else "unreadable")
            continue
        same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                   zip(jax.tree.leaves(jax.tree.map(_data, got)), jax.tree.leaves(jax.tree.map(_data, state))))
        outcomes.append("same" if same else "WRONG VALUES")
    data_file.write_bytes(data)
    mngr.close()
    assert "WRONG VALUES" not in outcomes, outcomes
    assert "checksum" in outcomes, outcomes


def _data(x):
    return jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x


@pytest.mark.slow
def test_resume_past_a_damaged_step_and_a_cut_log_line(tiny_bert_dir, glue_dir, tmp_path):
    """The command line, as a user meets it: the newest checkpoint damaged inside its array file and a
    log line cut off half-way; --resume sets the step aside with one warning, falls back to the older
    one and ends where the undamaged run ended."""
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), *train_args(
        tiny_bert_dir, glue_dir, tmp_path / "ref", "--max-steps", "4", "--save-every", "2", "--keep-checkpoints", "3",
        "--num-buckets", "0")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    run = tmp_path / "run"
    copy_run(tmp_path / "ref", run)
    (run / "report.json").unlink()
    for f in (run / "checkpoints" / "4" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 256:
            data = bytearray(f.read_bytes())
            middle = len(data) // 2
            data[middle:middle + 64] = bytes(b ^ 0x5A for b in data[middle:middle + 64])
            f.write_bytes(bytes(data))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.6')  # a write cut off by a crash
    cmd[cmd.index(str(tmp_path / "ref"))] = str(run)
    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    warnings = [line for line in done.stderr.splitlines() if "checkpoints/4" in line]
    assert len(warnings) == 1 and "trying an older one" in warnings[0], done.stderr
    assert [p.name.split("-")[0] for p in (run / "checkpoints").iterdir() if "damaged" in p.name] == ["4.damaged"]
    ref, got = (json.loads((d / "report.json").read_text()) for d in (tmp_path / "ref", run))
    assert got["resumed"] and got["metrics"] == ref["metrics"]
    assert (run / "metrics.jsonl").read_text() == (tmp_path / "ref" / "metrics.jsonl").read_text()


@pytest.mark.slow
def test_ctrl_c_says_where_the_last_checkpoint_is(tiny_bert_dir, glue_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), *train_args(
        tiny_bert_dir, glue_dir, out, "--max-steps", "100000", "--save-every", "2", "--num-buckets", "0")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "2").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("interrupted: stopped at step"), err[-2000:]
    assert "--resume" in last and str(out / "checkpoints") in last
    step = int(last.split("the last checkpoint is step ")[1].split()[0])
    assert (out / "checkpoints" / str(step)).is_dir()  # Ctrl-C waited for the step's checkpoint to be whole


@pytest.mark.slow
@pytest.mark.parametrize("flags, match", [
    (["--lr", "1e30", "--max-grad-norm", "1e30"], "training diverged: loss became"),  # NaN / inf
    (["--lr", "1e12"], "over 100x this run's first"),  # finite, and far past any sane loss
])
def test_a_diverging_loss_stops_the_run_with_status_1(flags, match, tiny_bert_dir, glue_dir, tmp_path, capsys):
    assert train_main(train_args(tiny_bert_dir, glue_dir, tmp_path / "r", "--max-steps", "10", *flags)) == 1
    assert match in capsys.readouterr().err


# ----------------------------------------------------------------------------- evaluate


@pytest.mark.parametrize("flags, match", [
    (["--max-seq-len", "4"], "--max-seq-len must be >= 8"),
    (["--max-eval-examples", "0"], "--max-eval-examples must be > 0"),
    (["--task", "sst2"], "was trained on rte, not sst2"),
    (["--batch-size", "-1"], "--batch-size must be > 0"),
    (["--peft"], "is a lora-jax adapter, not a peft one: drop --peft"),
])
def test_evaluate_flags(flags, match, tiny_runs, glue_dir, capsys):
    assert evaluate_main(["--adapter", str(tiny_runs["rte"] / "adapter"), "--data-dir", str(glue_dir), *flags]) == 2
    assert match in one_line(capsys)


def test_an_adapter_on_another_base_of_the_same_shape(tiny_runs, glue_dir, tmp_path, capsys):
    other = tmp_path / "other"
    write_tiny_checkpoint(other, "bert", seed=1)  # the architecture of the tiny base, other weights
    adapter = str(tiny_runs["rte"] / "adapter")
    common = ["--adapter", adapter, "--model", str(other), "--data-dir", str(glue_dir), "--max-eval-examples", "8"]
    assert evaluate_main(common) == 2
    assert "other base weights" in one_line(capsys)
    (tmp_path / "in.jsonl").write_text(json.dumps({"adapter": "rte", "text": "a", "text_pair": "b"}) + "\n")
    assert predict_main(["--adapter", f"rte={adapter}", "--model", str(other), "--input",
                         str(tmp_path / "in.jsonl")]) == 2
    assert "--force-base" in one_line(capsys)
    assert evaluate_main([*common, "--force-base"]) == 0  # the check alone refused it


@pytest.mark.parametrize("damage, match", [
    (lambda meta: meta.pop("base_model"), "lacks base_model"),
    (lambda meta: meta.update(lora={"rank": "eight"}), "LoRA settings are damaged"),
])
def test_damaged_adapter_metadata(damage, match, tiny_runs, glue_dir, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_runs["rte"] / "adapter", adapter)
    meta = json.loads((adapter / "adapter_config.json").read_text())
    damage(meta)
    (adapter / "adapter_config.json").write_text(json.dumps(meta))
    assert evaluate_main(["--adapter", str(adapter), "--data-dir", str(glue_dir)]) == 2
    assert match in one_line(capsys)


@pytest.mark.parametrize("config, match", [
    ('{"peft_type": "LORA", "r": 8', "is not valid JSON"),
    ('{"peft_type": "LORA", "lora_alpha": 8}', "r and lora_alpha must be"),
    ('["LORA"]', "not a JSON object"),
])
def test_damaged_peft_config(config, match, tiny_runs, tiny_bert_dir, glue_dir, tmp_path, capsys):
    adapter = tmp_path / "peft"
    shutil.copytree(tiny_runs["rte"] / "peft_adapter", adapter)
    (adapter / "adapter_config.json").write_text(config)
    assert evaluate_main(["--adapter", str(adapter), "--peft", "--task", "rte", "--model", str(tiny_bert_dir),
                          "--data-dir", str(glue_dir)]) == 2
    assert match in one_line(capsys)


# ----------------------------------------------------------------------------- predict


def test_predict_answers_the_good_lines_beside_the_bad(tiny_runs, tmp_path, capsys):
    lines = [
        json.dumps({"adapter": "rte", "text": "the cat sat", "text_pair": "a dog ran"}).encode(),
        json.dumps({"adapter": "rte", "text": 5, "text_pair": "a dog ran"}).encode(),
        json.dumps({"adapter": "sst2", "text": None}).encode(),
        json.dumps({"adapter": "sst2", "text": {"good": 1}}).encode(),  # was predicted on its keys
        json.dumps({"adapter": ["sst2"], "text": "good"}).encode(),
        b'{"adapter": "sst2", "text": "caf\xe9"}',  # Latin-1, not UTF-8
        json.dumps({"adapter": "sst2", "text": "a good movie"}).encode(),
    ]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out.jsonl"
    assert predict_main(["--adapter", f"rte={tiny_runs['rte'] / 'adapter'}", "--adapter",
                         f"sst2={tiny_runs['sst2'] / 'adapter'}", "--input", str(tmp_path / "in.jsonl"),
                         "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in rows] == list(range(1, 8))
    assert ["error" in r for r in rows] == [False, True, True, True, True, True, False], rows
    assert rows[0]["adapter"] == "rte" and rows[6]["adapter"] == "sst2" and "probs" in rows[6]
    assert rows[5]["error"] == "not UTF-8 text"
    assert "2 of 7 lines answered; 5 errors" in capsys.readouterr().err


@pytest.mark.parametrize("output, match", [
    ("missing-dir/out.jsonl", "cannot write --output"),
    (".", "is a directory"),
])
def test_predict_output_checked_before_the_work(output, match, tiny_runs, tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text(json.dumps({"adapter": "sst2", "text": "good"}) + "\n")
    assert predict_main(["--adapter", f"sst2={tiny_runs['sst2'] / 'adapter'}", "--input",
                         str(tmp_path / "in.jsonl"), "--output", str(tmp_path / output)]) == 2
    assert match in one_line(capsys)


def test_predict_adapter_named_twice(tiny_runs, tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text("")
    assert predict_main(["--adapter", f"x={tiny_runs['rte'] / 'adapter'}", "--adapter",
                         f"x={tiny_runs['sst2'] / 'adapter'}", "--input", str(tmp_path / "in.jsonl")]) == 2
    assert "--adapter x= is given twice" in one_line(capsys)
