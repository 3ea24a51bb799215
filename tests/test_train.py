"""Training invariants: frozen base bit-identical, only trainable leaves move and own optimizer
state, the loss falls when overfitting, compilations are bounded, and fit() end to end."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import batching

from lora_jax import data as data_lib
from lora_jax.config import TrainConfig
from lora_jax.optim import make_optimizer
from lora_jax.prepare import init_state, setup, total_steps
from lora_jax.train import TrainingDiverged, fit
from lora_jax.train_step import PerShape, make_train_step


def tiny_cfg(model_dir, glue_dir, tmp_path, **kw) -> TrainConfig:
    base = dict(task="sst2", model=str(model_dir), data_dir=str(glue_dir), batch_size=8, max_seq_len=32,
                num_buckets=2, lr=1e-2, warmup_ratio=0.0, max_steps=6, lora_rank=4, output_dir=str(tmp_path / "run"))
    return TrainConfig(**{**base, **kw})


def run_steps(cfg, n, mode="factored"):
    s = setup(cfg)
    optimizer = make_optimizer(s.label_of, cfg, n)
    state = init_state(s, optimizer)
    frozen_before = jax.tree.map(np.array, s.frozen)  # a quantized kernel is a tree of codes and scales
    trainable_before = {k: np.array(v) for k, v in s.trainable.items()}
    step = PerShape(make_train_step(s.mcfg, s.lcfg, optimizer, mode=mode, regression=s.task.is_regression))
    losses = []
    batches = batching.train_order(s.train.lengths, cfg.batch_size, seed=0, epoch=0)
    for i in range(n):
        b = batching.collate(s.train, batches[i % len(batches)], s.buckets, cfg.batch_size)
        state, m = step(state, s.frozen, {k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids", "labels")})
        losses.append(float(m["loss"]))
    return s, state, frozen_before, trainable_before, losses, step


def test_frozen_bit_identical_trainable_moves_and_alone_has_optimizer_state(tiny_bert_dir, glue_dir, tmp_path):
    # One run for both invariants (they were two tests, each compiling the same step).
    cfg = tiny_cfg(tiny_bert_dir, glue_dir, tmp_path, num_buckets=0)  # one shape: one compilation
    s, state, frozen_before, trainable_before, _, _ = run_steps(cfg, 4)
    for k, v in s.frozen.items():
        assert np.array_equal(np.asarray(v), frozen_before[k]), k
    moved = {k for k, v in state.trainable.items() if not np.array_equal(np.asarray(v), trainable_before[k])}
    assert moved == set(trainable_before)  # every LoRA factor and head leaf changed
    assert all(k.startswith(("lora/", "params/classifier/")) for k in moved)

    base_shapes = {tuple(v.shape) for v in s.frozen.values() if v.ndim >= 2}
    trainable_shapes = {tuple(v.shape) for v in s.trainable.values()}
    state_shapes = {tuple(x.shape) for x in jax.tree.leaves(state.opt_state) if hasattr(x, "shape")}
    assert not (state_shapes & base_shapes) - trainable_shapes
    n_state = sum(x.size for x in jax.tree.leaves(state.opt_state) if hasattr(x, "size") and x.ndim > 0)
    n_trainable = sum(v.size for v in s.trainable.values())
    assert n_state == 2 * n_trainable  # Adam's mu and nu, nothing for the base


@pytest.mark.slow
def test_loss_falls_overfitting_16_examples(tiny_bert_dir, glue_dir, tmp_path):
    # A random tiny encoder gives nearly identical features to all inputs: it needs a large step size.
    cfg = tiny_cfg(tiny_bert_dir, glue_dir, tmp_path, max_train_examples=16, lora_rank=8, lr=5e-2, num_buckets=0)
    _, _, _, _, losses, _ = run_steps(cfg, 40)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3]), losses


@pytest.mark.slow
def test_merged_and_factored_train_steps_agree(tiny_bert_dir, glue_dir, tmp_path):
    cfg = tiny_cfg(tiny_bert_dir, glue_dir, tmp_path, num_buckets=0)  # one shape: one compilation per mode
    with jax.default_matmul_precision("highest"):
        *_, l1, _ = run_steps(cfg, 3, mode="factored")
        *_, l2, _ = run_steps(cfg, 3, mode="merged")
    np.testing.assert_allclose(l1, l2, rtol=1e-4)


@pytest.mark.slow
def test_full_finetuning_trains_everything(tiny_bert_dir, glue_dir, tmp_path):
    cfg = tiny_cfg(tiny_bert_dir, glue_dir, tmp_path, method="full", lr=1e-3, num_buckets=0)
    s, state, frozen_before, trainable_before, *_ = run_steps(cfg, 2)
    assert not s.frozen
    assert not any(k.startswith("lora/") for k in s.trainable)
    changed = [k for k, v in state.trainable.items() if not np.array_equal(np.asarray(v), trainable_before[k])]
    assert "params/encoder/layer/0/attention/self/query/kernel" in changed


@pytest.mark.slow
def test_compilations_bounded_by_buckets(tiny_bert_dir, glue_dir, tmp_path):
    cfg = tiny_cfg(tiny_bert_dir, glue_dir, tmp_path, num_buckets=2)
    s, *_, step = run_steps(cfg, 12)
    assert len(s.buckets) <= 3  # two fitted to the training lengths, then --max-seq-len
    assert 1 <= step.count <= len(s.buckets)


@pytest.mark.slow
def test_no_buckets_pads_every_batch_to_max_seq_len(tiny_bert_dir, glue_dir, tmp_path):
    cfg = tiny_cfg(tiny_bert_dir, glue_dir, tmp_path, num_buckets=0, max_seq_len=48)
    s, *_, step = run_steps(cfg, 5)
    assert s.buckets == (48,) and step.count == 1
    assert max(s.train.lengths) < 48  # so padding to 48 is the option's doing, not the data's
    with pytest.raises(ValueError, match="--num-buckets must be >= 0"):
        TrainConfig(task="sst2", num_buckets=-1).validate()


def test_schedule_and_decay_mask(tiny_bert_dir, glue_dir, tmp_path):
    from lora_jax.optim import no_weight_decay, schedule
    sched = schedule(1.0, 100, 0.1)
    assert float(sched(0)) == 0.0 and float(sched(10)) == pytest.approx(1.0) and float(sched(100)) == pytest.approx(0.0)
    assert no_weight_decay("params/classifier/bias") and no_weight_decay("params/embeddings/LayerNorm/scale")
    assert not no_weight_decay("lora/encoder/layer/0/attention/self/query/kernel/a")


@pytest.mark.slow
def test_fit_end_to_end_writes_report(tiny_bert_dir, glue_dir, tmp_path):
    cfg = tiny_cfg(tiny_bert_dir, glue_dir, tmp_path, max_steps=None, epochs=2.0, max_train_examples=32)
    report, state = fit(cfg, progress=False)
    out = tmp_path / "run"
    on_disk = json.loads((out / "report.json").read_text())
    for key in ("task", "method", "model", "metrics", "trainable_params", "total_params", "train_examples_per_sec",
                "train_tokens_per_sec", "step_time_median_s", "compile_time_s", "memory", "wall_time_s", "config",
                "versions", "device", "date"):
        assert key in on_disk, key
    assert on_disk["steps"] == total_steps(setup(cfg)) == 8
    assert set(on_disk["memory"]["train_step_compiled"]) >= {"argument_bytes", "temp_bytes", "output_bytes"}
    assert on_disk["memory"]["peak_rss_bytes"] > 0
    m = on_disk["metrics"]["dev"]
    assert 0.0 <= m["final"]["values"]["accuracy"] <= 1.0 and m["best"]["step"] in (4, 8)
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "eval" in l] == [4, 8]
    assert "## Dev metrics" in (out / "report.md").read_text()
    assert int(state.step) == 8
    # Packed random batches by default; the trivial-solution flag follows the dev predictions' spread.
    assert on_disk["batching"]["batching"] == "packed" and on_disk["batching"]["row_len"] <= 32
    trivial = m["final"]["values"]["majority_share"] >= 0.95
    assert on_disk["trivial"] == {"dev": trivial}
    assert ("trivial solution" in (out / "report.md").read_text()) == trivial


@pytest.mark.slow
def test_fit_regression_task(tiny_bert_dir, glue_dir, tmp_path):
    cfg = tiny_cfg(tiny_bert_dir, glue_dir, tmp_path, task="stsb", max_steps=3)
    report, _ = fit(cfg, progress=False)
    values = report["metrics"]["dev"]["final"]["values"]
    assert set(values) == {"pearson", "spearman", "std_ratio"}
    assert report["trivial"] == {"dev": values["std_ratio"] < 0.1}


@pytest.mark.slow
def test_nan_loss_stops_with_clear_error(tiny_bert_dir, glue_dir, tmp_path):
    cfg = tiny_cfg(tiny_bert_dir, glue_dir, tmp_path, lr=1e30, max_grad_norm=1e30, max_steps=10)
    with pytest.raises(TrainingDiverged, match="loss became"):
        fit(cfg, progress=False)
    assert (tmp_path / "run" / "config.json").exists()  # what was written stays


def test_warm_start_from_another_tasks_adapter(tiny_runs, tiny_bert_dir, glue_dir, tmp_path):
    """The LoRA paper's MNLI -> MRPC/RTE/STS-B warm start: LoRA factors from a saved adapter, a fresh head."""
    from safetensors.numpy import load_file

    from lora_jax.adapter import AdapterError

    init = str(tiny_runs["sst2"] / "adapter")  # trained with TrainConfig's LoRA defaults: rank 8, alpha 8
    saved = load_file(str(tiny_runs["sst2"] / "adapter" / "adapter.safetensors"))
    same = dict(lora_rank=8, lora_alpha=8.0)
    s = setup(tiny_cfg(tiny_bert_dir, glue_dir, tmp_path, task="stsb", init_adapter=init, **same))
    lora_keys = [k for k in saved if k.startswith("lora/")]
    assert lora_keys and all(np.array_equal(np.asarray(s.trainable[k]), saved[k]) for k in lora_keys)
    assert any(np.abs(saved[k]).max() > 0 for k in lora_keys if k.endswith("/b"))  # trained, not the init
    assert s.trainable["params/classifier/kernel"].shape[-1] == 1  # stsb's own (regression) head
    with pytest.raises(AdapterError, match="another rank"):  # the same scale alpha / r = 1
        setup(tiny_cfg(tiny_bert_dir, glue_dir, tmp_path, lora_rank=2, lora_alpha=2.0, init_adapter=init))
    with pytest.raises(AdapterError, match="adapts other matrices"):
        setup(tiny_cfg(tiny_bert_dir, glue_dir, tmp_path, targets="qkvo", init_adapter=init, **same))
    with pytest.raises(AdapterError, match="LoRA scale"):
        setup(tiny_cfg(tiny_bert_dir, glue_dir, tmp_path, lora_rank=8, lora_alpha=16.0, init_adapter=init))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["factored", "merged"])
def test_bf16_base_keeps_no_float32_weight_copies_for_backward(mode):
    # Float32 compute on a bfloat16 frozen base casts each weight; autodiff must not keep the casts
    # from the forward to the backward pass, or the bfloat16 base saves little of the step's peak.
    from lora_jax import lora
    from lora_jax.model import ModelConfig, init_params
    from lora_jax.profiling import saved_for_backward_bytes
    from lora_jax.prepare import split_for_training
    from lora_jax.train_step import make_loss_fn

    mcfg = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=40)
    lcfg = lora.LoraConfig(rank=4, alpha=8)
    loss_fn = make_loss_fn(mcfg, lcfg, mode=mode, regression=False)
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(3, 64, (4, 16)).astype(np.int32),
             "attention_mask": np.ones((4, 16), np.int32), "labels": np.array([0, 1, 0, 1], np.int32)}
    params = init_params(mcfg, jax.random.key(0))

    def run(dtype):
        base = jax.tree.map(lambda x: x.astype(dtype), params)
        trainable, frozen, _, _ = split_for_training(base, lcfg, jax.random.key(1))
        trainable = {k: v + 0.01 for k, v in trainable.items()}  # B != 0: the adapters matter
        loss = lambda t, f, b: loss_fn(t, f, b, jax.random.key(2))[0]
        return saved_for_backward_bytes(loss, trainable, frozen, batch), jax.grad(loss)(trainable, frozen, batch)

    saved32, grads32 = run("float32")
    saved16, grads16 = run("bfloat16")
    # Factored: the same residuals. Merged: the merged weights W + sAB are kept, in the base's dtype.
    assert saved16 == saved32 if mode == "factored" else saved16 < saved32
    # The same computation up to the base's rounding to bfloat16.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0.05, atol=2e-3), grads32, grads16)


def test_auto_forward_mode():
    assert TrainConfig().forward_mode() == "merged"
    assert TrainConfig(lora_dropout=0.1).forward_mode() == "factored"  # dropout needs the LoRA path
    # A bfloat16 base would hold W + sAB in bfloat16, where an early small update rounds away.
    assert TrainConfig(param_dtype="bfloat16").forward_mode() == "factored"
    assert TrainConfig(param_dtype="bfloat16", lora_forward="merged").forward_mode() == "merged"


def _first_updates(cfg: TrainConfig, steps: int) -> list[dict]:
    """The optimizer's updates of a LoRA factor pair and a head leaf, given the same gradient each step."""
    trainable = {"lora/q/kernel/a": jnp.ones((4, 2)), "lora/q/kernel/b": jnp.ones((2, 4)),
                 "params/classifier/kernel": jnp.ones((4, 2))}
    label_of = {"lora/q/kernel/a": "lora", "lora/q/kernel/b": "lora", "params/classifier/kernel": "trainable"}
    opt = make_optimizer(label_of, cfg, total_steps=100)
    state, out = opt.init(trainable), []
    grads = jax.tree.map(lambda x: 0.01 * x, trainable)
    for _ in range(steps):
        updates, state = opt.update(grads, state, trainable)
        out.append({k: float(jnp.abs(v).max()) for k, v in updates.items()})
    return out


def test_loraplus_gives_b_that_many_times_a_learning_rate():
    plain = _first_updates(TrainConfig(lr=1e-3, warmup_ratio=0.0, weight_decay=0.0, loraplus_lr_ratio=1.0), 1)[0]
    plus = _first_updates(TrainConfig(lr=1e-3, warmup_ratio=0.0, weight_decay=0.0, loraplus_lr_ratio=4), 1)[0]
    assert plain["lora/q/kernel/b"] == pytest.approx(plain["lora/q/kernel/a"])
    assert plus["lora/q/kernel/b"] == pytest.approx(4 * plus["lora/q/kernel/a"], rel=1e-4)
    assert plus["lora/q/kernel/a"] == pytest.approx(plain["lora/q/kernel/a"])
    assert plus["params/classifier/kernel"] == pytest.approx(plain["params/classifier/kernel"])
    # --method lora with no ratio given is LoRA+ at the default ratio.
    default = _first_updates(TrainConfig(lr=1e-3, warmup_ratio=0.0, weight_decay=0.0), 1)[0]
    assert default["lora/q/kernel/b"] == pytest.approx(16 * default["lora/q/kernel/a"], rel=1e-4)


def test_the_default_loraplus_ratio_is_the_methods_and_the_paper_preset_is_plain_lora(tmp_path):
    from lora_jax.config import DEFAULT_LORAPLUS_RATIO, preset
    from lora_jax.rundir import check_resumable

    assert DEFAULT_LORAPLUS_RATIO == 16
    assert TrainConfig().loraplus_lr_ratio == DEFAULT_LORAPLUS_RATIO
    for method in ("full", "adalora"):  # no B to speed up: the default must not refuse them
        cfg = TrainConfig(method=method)
        cfg.validate()
        assert cfg.loraplus_lr_ratio == 1.0
    assert TrainConfig(**preset("paper", "rte")).loraplus_lr_ratio == 1.0
    assert TrainConfig(loraplus_lr_ratio=1.0).to_dict()["loraplus_lr_ratio"] == 1.0
    # A run whose config.json predates the flag trained plain LoRA: resuming it with the new default
    # must be refused, and with --loraplus-lr-ratio 1 allowed.
    old = TrainConfig(task="mrpc").to_dict()
    del old["loraplus_lr_ratio"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    with pytest.raises(Exception, match="loraplus_lr_ratio"):
        check_resumable(tmp_path, TrainConfig(task="mrpc"))
    check_resumable(tmp_path, TrainConfig(task="mrpc", loraplus_lr_ratio=1.0))


def test_head_only_steps_hold_the_adapters_then_train_them():
    ups = _first_updates(TrainConfig(lr=1e-3, warmup_ratio=0.0, head_only_steps=3), 5)
    for i, u in enumerate(ups):
        assert u["params/classifier/kernel"] > 0
        held = i < 3
        assert (u["lora/q/kernel/a"] == 0 and u["lora/q/kernel/b"] == 0) == held, (i, u)


@pytest.mark.parametrize("bad, match", [(dict(loraplus_lr_ratio=0.0), "loraplus-lr-ratio must be > 0"),
                                        (dict(loraplus_lr_ratio=4.0, method="full"), "needs --method lora"),
                                        (dict(head_only_steps=-1), "head-only-steps must be >= 0"),
                                        (dict(head_only_steps=5, max_steps=5), "leaves none"),
                                        (dict(batching="sorted"), "--batching must be one of")])
def test_recipe_flags_refuse_bad_values(bad, match):
    from lora_jax.config import ConfigValueError
    with pytest.raises(ConfigValueError, match=match):
        TrainConfig(**bad).validate()


def test_resuming_a_run_from_before_packing_asks_for_its_batching(tmp_path):
    """A run's config.json written before --batching existed was trained on length-grouped batches:
    --resume must not continue it on packed ones."""
    from lora_jax.rundir import MARKER, RunError
    from lora_jax.rundir import check_resumable as _check_resumable

    old = {k: v for k, v in TrainConfig().to_dict().items() if k != "batching"}
    (tmp_path / "config.json").write_text(json.dumps(old))
    (tmp_path / MARKER).write_text("")
    with pytest.raises(RunError, match="batching \\(run: 'by-length', now: 'packed'\\)"):
        _check_resumable(tmp_path, TrainConfig())
    _check_resumable(tmp_path, TrainConfig(batching="by-length"))
