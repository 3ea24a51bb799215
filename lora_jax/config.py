"""Run configuration: one frozen dataclass, presets, and the checks that keep bad values out.

Flags become ``dataclasses.replace`` on top of a preset on top of the defaults;
every run writes the resolved config next to its results.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .batching import BATCHINGS
from .lora import TARGET_PRESETS, LoraConfig, full_finetuning
from .quant import QUANTIZED

METHODS = ("lora", "full", "adalora")
# --xla-scheduler -> XLA:CPU's scheduler type: its default or its memory-optimised one (train.compiler_options).
XLA_CPU_SCHEDULERS = {"default": "CPU_SCHEDULER_TYPE_DEFAULT", "memory": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
XLA_SCHEDULERS = tuple(XLA_CPU_SCHEDULERS)
MIN_SEQ_LEN = 8  # the shortest --max-seq-len that training and evaluation take
PARAM_DTYPES = ("float32", "bfloat16", *QUANTIZED)
# LoRA+'s ratio for --method lora when none is given: B's learning rate 16x A's left the trivial plateau
# where plain LoRA stayed on it, and led plain LoRA in 18 of 21 task x seed pairs of MRPC, RTE and SST-2
# (results/robust-lora/; not at RTE's default budget).
DEFAULT_LORAPLUS_RATIO = 16.0
# How each target's rank is set: "fixed", --lora-rank everywhere; "eva", --lora-rank is the mean budget and
# every matrix's rank and A come from its inputs over the first batches (eva.py); "gate", --lora-rank is
# every matrix's maximum and a gate per component, pruned by a proximal L1 step, keeps what the task needs
# (gate.py). --lora-rank auto picks AUTO_ALLOCATION, the winner of results/rank-baseline/.
RANK_ALLOCATIONS = ("fixed", "eva", "gate")
AUTO_ALLOCATION = "eva"


class ConfigValueError(ValueError):
    """A flag value that cannot work."""


@dataclass(frozen=True)
class TrainConfig:
    task: str = "rte"
    model: str = "roberta-base"
    data_dir: str | None = None
    dev_file: str | None = None
    method: str = "lora"
    # LoRA
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    targets: str = "qv"  # a preset name (qv, qkvo, all) or comma-separated regexes
    lora_init: str = "kaiming"
    rank_allocation: str = "fixed"  # one of RANK_ALLOCATIONS
    gate_sparsity: float = 0.5  # --rank-allocation gate: the threshold over the gate learning rate (gate.py)
    rslora: bool = False
    dora: bool = False  # DoRA (Liu et al., 2024): also train a magnitude per output column of each target
    # "factored" x@W + s(x@A)@B, "merged" x@(W + sAB), or "auto": merged (measured faster on CPU and
    # H100, results/bench/) unless LoRA dropout needs the factored form, or the base is stored in
    # bfloat16 (W + sAB would be rounded to bfloat16, losing the small early updates).
    lora_forward: str = "auto"
    # AdaLoRA (--method adalora): every target starts at adalora_init_rank; the total falls to
    # adalora_target_rank per matrix on average. Warm-up / final steps, when not given, are these
    # shares of the run (10% / 25%: pruning over the middle 65%).
    adalora_init_rank: int = 12
    adalora_target_rank: float = 8.0
    adalora_warmup_steps: int | None = None
    adalora_final_steps: int | None = None
    adalora_warmup_frac: float = 0.10
    adalora_final_frac: float = 0.25
    adalora_interval: int = 10
    adalora_beta1: float = 0.85
    adalora_beta2: float = 0.85
    adalora_orth_reg: float = 0.1
    adalora_init: str = "gaussian"  # P, Q: "gaussian" N(0, 0.02^2) as in the paper, "orthogonal", or
    # "gradient": the top singular vectors of dL/dW over the first adalora_init_batches batches
    adalora_init_batches: int = 8
    # Start the LoRA factors from another run's adapter (e.g. the LoRA paper's MNLI warm start for
    # MRPC, RTE and STS-B); the head starts fresh.
    init_adapter: str | None = None
    # optimisation
    epochs: float = 3.0
    max_steps: int | None = None
    batch_size: int = 16
    lr: float = 5e-4
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    # LoRA+ (Hayou et al., 2024): B's learning rate is this many times A's (1: plain LoRA, the paper's
    # recipe). None: DEFAULT_LORAPLUS_RATIO for --method lora, 1 for the others (resolved on creation,
    # so config.json and --resume see the number).
    loraplus_lr_ratio: float | None = None
    # Linear probing, then fine-tuning: the adapters' learning rate is 0 for this many first steps
    # while the head trains alone; their warm-up and decay then run over the remaining steps.
    head_only_steps: int = 0
    # data
    max_seq_len: int = 128
    # Length buckets of unpacked rows; row-count buckets of packed batches. Each is one compiled step that
    # stays resident (about 60-100 MiB at MiniLM size on the CPU): 4 against 8 costs RTE 2 points of padding
    # and saves 4 compilations (results/memory/README.md).
    num_buckets: int = 4
    # "packed": random batches, each packed into few rows (packing.py); "random": the same batches, one
    # example per row; "by-length": length-grouped batches (--group-by-length, the behaviour before packing).
    batching: str = "packed"
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    # numerics and memory
    param_dtype: str = "float32"  # dtype of the frozen base: float32, bfloat16, or quantized int8 / nf4 (quant.py)
    compute_dtype: str = "float32"
    # Recompute the attention probabilities and the GELU terms in the backward pass: the same loss,
    # gradients equal to 1e-6 (tests), 0.71x the LoRA step's peak memory on an H100 at no measured
    # cost in speed there or on the CPU (results/bench/).
    remat: str = "cheap"
    # XLA:CPU's instruction scheduler for the train step, one of XLA_SCHEDULERS (no effect elsewhere).
    xla_scheduler: str = "default"
    # bookkeeping
    seed: int = 0
    eval_every: int | None = None  # steps; default once per epoch
    save_every: int | None = None  # steps between checkpoints; default once per epoch (and always at the end)
    keep_checkpoints: int = 2
    log_every: int = 10
    output_dir: str = "runs/latest"

    def __post_init__(self):
        if self.loraplus_lr_ratio is None:
            object.__setattr__(self, "loraplus_lr_ratio", DEFAULT_LORAPLUS_RATIO if self.method == "lora" else 1.0)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):  # nan or inf passes no range check below
                raise ConfigValueError(f"--{f.name.replace('_', '-')} must be a finite number, got {v}")
        if self.method not in METHODS:
            raise ConfigValueError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.batch_size <= 0:
            raise ConfigValueError(f"--batch-size must be > 0, got {self.batch_size}")
        if self.max_seq_len < MIN_SEQ_LEN:
            raise ConfigValueError(f"--max-seq-len must be >= {MIN_SEQ_LEN}, got {self.max_seq_len}")
        if self.epochs <= 0:
            raise ConfigValueError(f"--epochs must be > 0, got {self.epochs}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigValueError(f"--max-steps must be > 0, got {self.max_steps}")
        if not self.lr > 0:
            raise ConfigValueError(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigValueError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if not self.max_grad_norm > 0:  # 0 would zero every update, a negative norm ascend the loss
            raise ConfigValueError(f"--max-grad-norm must be > 0, got {self.max_grad_norm}")
        if self.log_every < 1:
            raise ConfigValueError(f"--log-every must be >= 1, got {self.log_every}")
        if not 0 <= self.seed < 2**32:  # jax.random.key takes an unsigned 32-bit seed
            raise ConfigValueError(f"--seed must be in [0, 2^32), got {self.seed}")
        if self.weight_decay < 0:
            raise ConfigValueError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.eval_every is not None and self.eval_every <= 0:
            raise ConfigValueError(f"--eval-every must be > 0, got {self.eval_every}")
        if self.save_every is not None and self.save_every <= 0:
            raise ConfigValueError(f"--save-every must be > 0, got {self.save_every}")
        if self.keep_checkpoints < 1:
            raise ConfigValueError(f"--keep-checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.batching not in BATCHINGS:
            raise ConfigValueError(f"--batching must be one of {', '.join(BATCHINGS)}, got {self.batching!r}")
        if not self.loraplus_lr_ratio > 0:
            raise ConfigValueError(f"--loraplus-lr-ratio must be > 0, got {self.loraplus_lr_ratio}")
        if self.loraplus_lr_ratio != 1 and self.method != "lora":
            raise ConfigValueError("--loraplus-lr-ratio needs --method lora (it sets B's learning rate)")
        if self.head_only_steps < 0:
            raise ConfigValueError(f"--head-only-steps must be >= 0, got {self.head_only_steps}")
        if self.head_only_steps and self.method == "full":
            raise ConfigValueError("--head-only-steps needs --method lora or adalora (full fine-tuning has "
                                   "no adapters to hold back)")
        if self.max_steps is not None and self.head_only_steps >= self.max_steps:
            raise ConfigValueError(f"--head-only-steps {self.head_only_steps} leaves none of --max-steps "
                                   f"{self.max_steps} to train the adapters")
        if self.num_buckets < 0:
            raise ConfigValueError(f"--num-buckets must be >= 0 (0: pad every batch to --max-seq-len), "
                                   f"got {self.num_buckets}")
        if self.xla_scheduler not in XLA_SCHEDULERS:
            raise ConfigValueError(f"--xla-scheduler must be one of {', '.join(XLA_SCHEDULERS)}, "
                                   f"got {self.xla_scheduler!r}")
        if self.lora_forward not in ("auto", "factored", "merged"):
            raise ConfigValueError(f"--lora-forward must be auto, factored or merged, got {self.lora_forward!r}")
        if self.lora_forward == "merged" and self.lora_dropout > 0:
            raise ConfigValueError("--lora-dropout needs --lora-forward factored (a merged weight has no LoRA path)")
        for name in ("max_train_examples", "max_eval_examples"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigValueError(f"--{name.replace('_', '-')} must be > 0, got {v}")
        if self.method != "full" and not self.target_patterns():
            raise ConfigValueError(f"--targets {self.targets!r} names no pattern: give qv, qkvo, all or regexes")
        if self.param_dtype not in PARAM_DTYPES:
            raise ConfigValueError(f"--param-dtype must be one of {', '.join(PARAM_DTYPES)}, got {self.param_dtype!r}")
        if self.param_dtype in QUANTIZED and self.method == "full":
            raise ConfigValueError(f"--param-dtype {self.param_dtype} quantizes the frozen base: full fine-tuning "
                                   "freezes nothing")
        if self.dora and self.method != "lora":
            raise ConfigValueError("--dora needs --method lora (full fine-tuning has no adapters; AdaLoRA's "
                                   "factors are not DoRA's)")
        if self.dora and self.lora_init in ("pissa", "olora"):
            raise ConfigValueError(f"--dora starts from the base kernel's column norms: use it with --lora-init "
                                   f"kaiming or gaussian, not {self.lora_init}")
        self.lora_config()  # raises LoraError on bad rank / alpha / dropout / patterns
        if self.init_adapter is not None and self.method != "lora":
            raise ConfigValueError("--init-adapter needs --method lora")
        if self.lora_init in ("pissa", "olora"):
            if self.method != "lora":
                raise ConfigValueError(f"--lora-init {self.lora_init} needs --method lora")
            if self.init_adapter is not None:
                raise ConfigValueError(f"--lora-init {self.lora_init} and --init-adapter both set the starting "
                                       "factors: choose one")
        if self.rank_allocation not in RANK_ALLOCATIONS:
            raise ConfigValueError(f"--rank-allocation must be one of {', '.join(RANK_ALLOCATIONS)}, "
                                   f"got {self.rank_allocation!r}")
        if self.rank_allocation != "fixed":
            if self.method != "lora":
                raise ConfigValueError(f"--rank-allocation {self.rank_allocation} (--lora-rank auto) needs --method "
                                       "lora")
            if self.lora_init in ("pissa", "olora") or self.init_adapter is not None:
                raise ConfigValueError(f"--rank-allocation {self.rank_allocation} (--lora-rank auto) sets A from the "
                                       "data: not with --lora-init pissa/olora or --init-adapter")
            if self.dora and self.rank_allocation == "gate":
                raise ConfigValueError("--rank-allocation gate gates plain LoRA components: not with --dora")
        if not 0 <= self.gate_sparsity < 2:
            raise ConfigValueError(f"--gate-sparsity must be in [0, 2), got {self.gate_sparsity}")
        if self.adalora_init not in ("gaussian", "orthogonal", "gradient"):
            raise ConfigValueError(f"--adalora-init must be gaussian, orthogonal or gradient, "
                                   f"got {self.adalora_init!r}")
        if self.adalora_init_batches <= 0:
            raise ConfigValueError(f"--adalora-init-batches must be > 0, got {self.adalora_init_batches}")
        for name in ("adalora_warmup_frac", "adalora_final_frac"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigValueError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")
        if self.adalora_warmup_frac + self.adalora_final_frac >= 1:
            raise ConfigValueError(f"--adalora-warmup-frac {self.adalora_warmup_frac} + --adalora-final-frac "
                                   f"{self.adalora_final_frac} leave no share of the run to prune")
        if self.method == "adalora":
            # Everything but the run length is checkable now; adalora_config checks the schedule.
            self.adalora_config(total_steps=10**9)

    def forward_mode(self) -> str:
        if self.lora_forward == "auto":
            return "factored" if self.lora_dropout > 0 or self.param_dtype != "float32" else "merged"
        return self.lora_forward

    def target_patterns(self) -> tuple[str, ...]:
        if self.targets in TARGET_PRESETS:
            return TARGET_PRESETS[self.targets]
        return tuple(t.strip() for t in self.targets.split(",") if t.strip())

    def lora_config(self) -> LoraConfig:
        if self.method == "full":
            return full_finetuning()
        return LoraConfig(
            rank=self.adalora_init_rank if self.method == "adalora" else self.lora_rank,
            alpha=self.lora_alpha,
            dropout=self.lora_dropout,
            targets=self.target_patterns(),
            init_a=self.lora_init,
            rslora=self.rslora,
            dora=self.dora and self.method == "lora",
        )

    def adalora_config(self, total_steps: int):
        """The adaptive-rank schedule for a run of ``total_steps``; raises AdaptiveError on bad values."""
        from .adaptive import AdaLoraConfig, default_steps

        warmup, final = default_steps(total_steps, self.adalora_warmup_steps, self.adalora_final_steps,
                                      self.adalora_warmup_frac, self.adalora_final_frac)
        return AdaLoraConfig(
            init_rank=self.adalora_init_rank, target_rank=self.adalora_target_rank, total_steps=total_steps,
            warmup_steps=warmup, final_steps=final, interval=self.adalora_interval, beta1=self.adalora_beta1,
            beta2=self.adalora_beta2, orth_reg=self.adalora_orth_reg,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Fields whose default changed: a run's config.json that lacks one was made with this value.
LEGACY_VALUES = {"batching": "by-length", "loraplus_lr_ratio": 1.0}


# The LoRA paper's RoBERTa-base hyperparameters (Hu et al., 2021, Table 9).
_PAPER_BATCH = {"mnli": 16, "sst2": 16, "mrpc": 16, "cola": 32, "qnli": 32, "qqp": 16, "rte": 32, "stsb": 16}
_PAPER_LR = {"mnli": 5e-4, "sst2": 5e-4, "mrpc": 4e-4, "cola": 4e-4, "qnli": 4e-4, "qqp": 5e-4, "rte": 5e-4, "stsb": 4e-4}
_PAPER_EPOCHS = {"mnli": 30, "sst2": 60, "mrpc": 30, "cola": 80, "qnli": 25, "qqp": 25, "rte": 80, "stsb": 40}


def preset(name: str, task: str) -> dict:
    """Field values of a named preset for ``task`` (applied before explicit flags)."""
    if name == "paper":
        if task not in _PAPER_BATCH:
            raise ConfigValueError(f"the paper preset has no hyperparameters for {task!r}")
        return dict(
            batch_size=_PAPER_BATCH[task], lr=_PAPER_LR[task], epochs=float(_PAPER_EPOCHS[task]),
            lora_rank=8, lora_alpha=8.0, warmup_ratio=0.06, max_seq_len=512, weight_decay=0.1,
            loraplus_lr_ratio=1.0,
        )
    if name == "tiny":
        # Seconds on a CPU: a few steps on a few examples, short sequences.
        return dict(
            batch_size=8, max_seq_len=64, max_steps=8, epochs=1.0, lr=1e-3, warmup_ratio=0.0,
            max_train_examples=64, max_eval_examples=32, num_buckets=2, log_every=1,
        )
    raise ConfigValueError(f"unknown preset {name!r}; choose paper or tiny")
