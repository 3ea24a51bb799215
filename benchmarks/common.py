"""What the benchmark and research scripts share: paths, the subprocess runner, the markdown header that
says which command, code version, device and date produced a result, compile-cache checks, argument
errors, the study's recipes in both frameworks, and PyTorch's train step at a benchmark cell.

Every script in ``benchmarks/`` runs as ``python benchmarks/NAME.py`` and imports this module as
``common`` (Python puts a script's own directory first on its path); the tests find it through
pytest's ``pythonpath`` setting. No script imports another.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
BENCHMARKS = ROOT / "benchmarks"


class Failed(RuntimeError):
    """A child process that failed; the message is its last line of standard error."""


# ----------------------------------------------------------------------------- running


def last_line(text: str, default: str = "(no output)") -> str:
    return (text.strip().splitlines() or [default])[-1]


def run(cmd: list[str], *, env: dict | None = None, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` to completion, capturing its output; raise ``Failed`` with its last error line."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise Failed(f"timed out after {timeout:g} s") from None
    if done.returncode != 0:
        raise Failed(f"exit {done.returncode}: {last_line(done.stderr)}")
    return done


def run_json(cmd: list[str], *, env: dict | None = None, timeout: float | None = None, prefix: str = "") -> dict:
    """Run ``cmd`` and parse its last standard-output line that starts with ``prefix`` as JSON: how a script
    runs one measurement in a fresh process (its own memory peak, its own compilation)."""
    done = run(cmd, env=env, timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith(prefix)]
    if not lines:
        raise Failed(f"no result line: {last_line(done.stderr)}")
    return json.loads(lines[-1][len(prefix):])


def run_self(script: str, flag: str, payload: dict, *, env: dict | None = None, timeout: float | None = None) -> dict:
    """``script`` run again with ``flag JSON``: one cell of a benchmark in a process of its own."""
    return run_json([sys.executable, script, flag, json.dumps(payload)], env=env, timeout=timeout)


def script_path(name: str) -> Path:
    """A runnable file by name: the user tools (``train.py``, ...) are in ``scripts/``, the rest here."""
    return ROOT / "scripts" / name if (ROOT / "scripts" / name).is_file() else BENCHMARKS / name


def report_of(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "report.json").read_text())


# ----------------------------------------------------------------------------- provenance


def command(script: str, argv: list[str] | None = None) -> str:
    """The command line that reproduces this run, as the results files quote it."""
    rel = Path(script).resolve().relative_to(ROOT)
    return shlex.join(["python", str(rel), *(sys.argv[1:] if argv is None else argv)])


def code_version() -> str:
    """The commit the code is at (with ``+dirty`` if the tree has changes), or ``unknown``."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def header(title: str, *, date: str, command: str, device=None, versions: dict | None = None) -> list[str]:
    """The markdown lines every results file starts with: what, when, how, on what, with which code."""
    lines = [f"# {title} ({date})", "", f"Command: `{command}`  ", f"Code: {code_version()}  "]
    if device is not None:
        lines.append(f"Device: {device}  " if isinstance(device, str) else
                     f"Device: {device.get('platform')} ({device.get('device_kind')}), "
                     f"{device.get('device_count', 1)} device(s)  ")
    if versions:
        lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "  ")
    return lines + [""]


# ----------------------------------------------------------------------------- arguments, compile cache


def fail(message: str) -> SystemExit:
    """A bad argument: one line on standard error, exit status 2 (``raise common.fail(...)``)."""
    print(f"error: {message}", file=sys.stderr)
    return SystemExit(2)


def int_list(text: str, flag: str) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2]; anything else is a one-line argument error naming ``flag``."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise fail(f"{flag} must be comma-separated integers, got {text!r}") from None


def names(text: str, allowed, flag: str) -> list[str]:
    """``"a,b"`` -> ["a", "b"], each one of ``allowed``; anything else is a one-line argument error."""
    picked = [x for x in text.split(",") if x]
    if not picked or any(x not in allowed for x in picked):
        raise fail(f"{flag} takes a comma-separated list of {', '.join(allowed)}, got {text!r}")
    return picked


def compile_cache(directory: str | None) -> str | None:
    """Turn on JAX's persistent compilation cache in ``directory`` (None: off); returns its absolute path.
    A directory that cannot be created is a one-line argument error."""
    if not directory:
        return None
    from lora_jax.cli import enable_compile_cache
    from lora_jax.config import ConfigValueError

    try:
        enable_compile_cache(directory)
    except ConfigValueError as e:
        raise fail(str(e)) from None
    return str(Path(directory).expanduser().resolve())


def cache_entries(directory: str | None) -> int | None:
    """How many compiled programs a compile cache holds now (0 for a cold one; None when there is none)."""
    if not directory:
        return None
    path = Path(directory)
    return sum(1 for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def child_env(**extra: str) -> dict:
    return {**os.environ, **extra}


# ----------------------------------------------------------------------------- the study's recipes

# Method name -> lora-jax train flags (benchmarks/grid.py; benchmarks/train_torch.py takes the same). LoRA scale alpha / r = 1 throughout (the LoRA paper's RoBERTa
# setting, alpha = r = 8), AdaLoRA's alpha / initial rank = 1 likewise.
METHODS = {
    "full": ["--method", "full"],
    # The LoRA paper's RoBERTa-base hyperparameters per task (Table 9): r = 8, alpha = 8 on q, v.
    "lora-paper": ["--preset", "paper"],
    "lora-qv-r2": ["--targets", "qv", "--lora-rank", "2", "--lora-alpha", "2"],
    "lora-qv-r8": ["--targets", "qv", "--lora-rank", "8", "--lora-alpha", "8"],
    "lora-qv-r16": ["--targets", "qv", "--lora-rank", "16", "--lora-alpha", "16"],
    # The same with the frozen base stored in bfloat16 (the memory lever): does it keep accuracy?
    "lora-qv-r8-bf16base": ["--targets", "qv", "--lora-rank", "8", "--lora-alpha", "8", "--param-dtype", "bfloat16"],
    # ... and quantized (QLoRA's setting: the frozen kernels in int8 or nf4, issue 32).
    "lora-qv-r8-int8base": ["--targets", "qv", "--lora-rank", "8", "--lora-alpha", "8", "--param-dtype", "int8"],
    "lora-qv-r8-nf4base": ["--targets", "qv", "--lora-rank", "8", "--lora-alpha", "8", "--param-dtype", "nf4"],
    # The robust-recipe study (results/robust-lora/): the batching before packing, a larger scale
    # (rsLoRA, alpha / sqrt(r) = 5.7), LoRA+ (B's learning rate 16x A's), the head alone first.
    "lora-qv-r8-bylength": ["--targets", "qv", "--lora-rank", "8", "--lora-alpha", "8", "--batching", "by-length"],
    "lora-qv-r8-rslora16": ["--targets", "qv", "--lora-rank", "8", "--lora-alpha", "16", "--rslora"],
    "lora-qv-r8-plus16": ["--targets", "qv", "--lora-rank", "8", "--lora-alpha", "8", "--loraplus-lr-ratio", "16"],
    "lora-qv-r8-probe": ["--targets", "qv", "--lora-rank", "8", "--lora-alpha", "8", "--head-only-steps", "30"],
    # peft's options at r = 8 (issue 33's grid): PiSSA's and OLoRA's starts from each kernel, DoRA; beside
    # lora-*-r8 (kaiming) and lora-qv-r8-plus16 (LoRA+). train_torch.py gives each to peft.
    **{f"lora-{t}-r8-{o}": ["--targets", t, "--lora-rank", "8", "--lora-alpha", "8", *flags]
       for t in ("qv", "all") for o, flags in (("pissa", ["--lora-init", "pissa"]), ("olora", ["--lora-init", "olora"]),
                                               ("dora", ["--dora"]))},
    "lora-all-r8-plus16": ["--targets", "all", "--lora-rank", "8", "--lora-alpha", "8", "--loraplus-lr-ratio", "16"],
    "lora-all-r2": ["--targets", "all", "--lora-rank", "2", "--lora-alpha", "2"],
    "lora-all-r8": ["--targets", "all", "--lora-rank", "8", "--lora-alpha", "8"],
    # LoRA at the same 16x scale as the adalora-*-s16 variants below: the comparison at equal budget
    # then differs in the allocation only, not in the scale.
    "lora-all-r2-s16": ["--targets", "all", "--lora-rank", "2", "--lora-alpha", "32"],
    "lora-all-r8-s16": ["--targets", "all", "--lora-rank", "8", "--lora-alpha", "128"],
    # AdaLoRA on every linear layer, starting at 1.5x the target mean rank (AdaLoRA's 12 -> 8 ratio).
    "adalora-t2": ["--method", "adalora", "--targets", "all", "--adalora-init-rank", "3",
                   "--adalora-target-rank", "2", "--lora-alpha", "3"],
    "adalora-t8": ["--method", "adalora", "--targets", "all", "--adalora-init-rank", "12",
                   "--adalora-target-rank", "8", "--lora-alpha", "12"],
    # The same at 16x the scale with orthonormal P, Q: λ moves about lr per step under Adam, so at
    # scale 1 AdaLoRA stays near the pretrained model for hundreds of steps (results/adaptive/probe-scale).
    "adalora-t2-s16": ["--method", "adalora", "--targets", "all", "--adalora-init-rank", "3",
                       "--adalora-target-rank", "2", "--lora-alpha", "48", "--adalora-init", "orthogonal"],
    "adalora-t8-s16": ["--method", "adalora", "--targets", "all", "--adalora-init-rank", "12",
                       "--adalora-target-rank", "8", "--lora-alpha", "192", "--adalora-init", "orthogonal"],
}
# The -s16 recipes with pruning over the third quarter of the run instead of 10%-75%: on RTE the
# training loss stays near ln 2 for about 300 steps (two epochs) in 600- and 1200-step runs alike, so
# the default schedule, which does most of its pruning early, ranks triplets on noise.
METHODS.update({f"adalora-t{n}-s16-late": [*METHODS[f"adalora-t{n}-s16"], "--adalora-warmup-frac", "0.5",
                                            "--adalora-final-frac", "0.25"] for n in (2, 8)})
# Every LoRA recipe above without a ratio of its own is plain LoRA (B's learning rate A's), as it was
# measured before LoRA+ became lora-jax's default (config.DEFAULT_LORAPLUS_RATIO).
METHODS.update({name: [*flags, "--loraplus-lr-ratio", "1"] for name, flags in METHODS.items()
                if "--method" not in flags and "--loraplus-lr-ratio" not in flags})
# The rank a user would have to choose (issue 34's baseline): LoRA on every linear layer at each rank, the
# scale alpha / r = 1 at every rank, lora-jax's default recipe otherwise (LoRA+ since 2026-12-07).
METHODS.update({f"rank-all-r{r}": ["--targets", "all", "--lora-rank", str(r), "--lora-alpha", str(r)]
                for r in (1, 2, 4, 8, 16, 32)})
# ... and the rank chosen for the user: `--lora-rank auto` (a mean budget of 8, the same scale 1).
METHODS["rank-all-auto"] = ["--targets", "all", "--lora-rank", "auto", "--lora-alpha", "8"]
# A screen of its first version (results/rank-baseline/screens/): B's rate equal to A's, as EVA was published.
METHODS["rank-all-auto-plain"] = [*METHODS["rank-all-auto"], "--loraplus-lr-ratio", "1"]
# The other candidates: a gate per component from rank 16 (--lora-rank auto's largest rank) down, SoRA-style
# (gate.py; scale 1), and AdaLoRA's best recipe so far (docs/adaptive-rank.md), from 12 down to a mean of 8.
METHODS["rank-all-gate"] = ["--targets", "all", "--lora-rank", "16", "--lora-alpha", "16", "--rank-allocation", "gate"]
METHODS["rank-all-adalora"] = METHODS["adalora-t8-s16-late"]
METHODS["rank-all-gate-sp1"] = [*METHODS["rank-all-gate"], "--gate-sparsity", "1.0"]  # a screen: sparser



def torch_flags(method: str) -> list[str]:
    """train_torch.py flags of a method (it has no AdaLoRA)."""
    if "adalora" in METHODS[method]:
        raise SystemExit(f"error: the PyTorch reference has no {method}")
    if "--param-dtype" in METHODS[method]:
        raise SystemExit(f"error: the PyTorch reference has no bfloat16 or quantized base ({method})")
    return METHODS[method]  # train_torch.py takes the same flags


# ----------------------------------------------------------------------------- PyTorch at a benchmark cell


def torch_step(cell: dict):
    """PyTorch transformers (+ peft LoRA r = 8, alpha 16 on query and value) on random weights and tokens of
    the cell's shape: returns ``step()`` (one AdamW step; returns the loss as a float, which waits for
    the step) with ``step.model`` and ``step.params`` (the trained parameters) attached."""
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    config = transformers.AutoConfig.from_pretrained(cell["config"], num_labels=2)
    model = transformers.AutoModelForSequenceClassification.from_config(config)
    if cell["method"] == "lora":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16,
                                                           target_modules=["query", "value"]))
    if cell["variant"] == "remat":
        # Non-reentrant: the reentrant form passes no gradient to LoRA factors inside a checkpointed
        # layer when the layer's input (from frozen embeddings) needs none.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # the newer name; the old one warns there
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.to(dev).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    b, t = cell["batch"], cell["seq"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, config.vocab_size, (b, t), generator=g).to(dev)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 2, (b,), generator=g).to(dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cell["variant"] == "bf16")

    def step() -> float:
        with autocast:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()  # waits for the step (and synchronises on GPU)
        if cuda:
            torch.cuda.synchronize()
        return value

    def saved_bytes() -> int:
        """Bytes of the tensors autograd keeps from one forward pass for the backward pass, the
        parameters not counted; each storage once (views share their base's)."""
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights:
                storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.zero_grad(set_to_none=True)
        return sum(storages.values())

    step.model, step.params, step.saved_bytes = model, params, saved_bytes
    return step
