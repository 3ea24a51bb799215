"""Checkpoint loading: both formats, the load report, and every bad input named clearly."""

import json
import shutil

import jax
import numpy as np
import pytest
from flax.serialization import msgpack_serialize

from lora_jax import lora, weights
from lora_jax.weights import WeightsError

from .conftest import write_tiny_checkpoint


def test_safetensors_round_trip_and_report(tmp_path):
    cfg = write_tiny_checkpoint(tmp_path, "roberta", seed=3)
    loaded_cfg, params, report = weights.from_pretrained(str(tmp_path), num_labels=cfg.num_labels)
    assert loaded_cfg.model_type == "roberta" and loaded_cfg.layer_norm_eps == 1e-5
    assert sorted(report.missing) == sorted(p for p in lora.flatten(params) if p.startswith("classifier/"))
    assert "new classification head" in report.summary()
    from lora_jax.model import init_params
    ref = lora.flatten(init_params(loaded_cfg, jax.random.key(3)))
    for p, v in lora.flatten(params).items():
        if not p.startswith("classifier/"):
            np.testing.assert_array_equal(v, ref[p], err_msg=p)


def test_flax_msgpack_with_model_prefix(tmp_path):
    write_tiny_checkpoint(tmp_path / "src", "bert", seed=1)
    _, params, _ = weights.from_pretrained(str(tmp_path / "src"))
    d = tmp_path / "flax"
    d.mkdir()
    shutil.copy(tmp_path / "src" / "config.json", d)
    # HF Flax task models nest the encoder under "bert/"; extra MLM tensors are unused.
    tree = {"bert": {k: v for k, v in params.items() if k != "classifier"},
            "cls": {"predictions": {"bias": np.zeros(3, np.float32)}}}
    (d / weights.MSGPACK).write_bytes(msgpack_serialize(jax.tree.map(np.asarray, tree)))
    _, again, report = weights.from_pretrained(str(d))
    assert report.unused == ["cls/predictions/bias"]
    for p, v in lora.flatten(params).items():
        if not p.startswith("classifier/"):
            np.testing.assert_array_equal(v, lora.flatten(again)[p])


def test_param_dtype_casts_the_base(tmp_path):
    write_tiny_checkpoint(tmp_path, "bert")
    _, params, _ = weights.from_pretrained(str(tmp_path), param_dtype="bfloat16")
    assert {str(v.dtype) for v in lora.flatten(params).values()} == {"bfloat16"}


def test_torch_names_map_both_ways():
    cases = {
        "encoder.layer.3.attention.self.query.weight": ("encoder/layer/3/attention/self/query/kernel", True),
        "embeddings.LayerNorm.gamma": ("embeddings/LayerNorm/scale", False),
        "embeddings.LayerNorm.weight": ("embeddings/LayerNorm/scale", False),
        "embeddings.word_embeddings.weight": ("embeddings/word_embeddings/embedding", False),
        "classifier.out_proj.bias": ("classifier/out_proj/bias", False),
    }
    for torch_name, (path, transpose) in cases.items():
        assert weights.torch_to_flax_name(torch_name, 2) == (path, transpose)
    assert weights.flax_to_torch_name("encoder/layer/3/attention/self/query/kernel") == (
        "encoder.layer.3.attention.self.query.weight", True)


# ----------------------------------------------------------------------------- bad input


def test_missing_directory():
    with pytest.raises(WeightsError, match="does not exist"):
        weights.from_pretrained("./no/such/model/dir")


def test_no_weights_file(tmp_path):
    write_tiny_checkpoint(tmp_path, "bert")
    (tmp_path / weights.SAFETENSORS).unlink()
    with pytest.raises(WeightsError, match="no weights file"):
        weights.from_pretrained(str(tmp_path))


def test_no_config(tmp_path):
    write_tiny_checkpoint(tmp_path, "bert")
    (tmp_path / "config.json").unlink()
    with pytest.raises(WeightsError, match="no config.json"):
        weights.from_pretrained(str(tmp_path))


def test_unsupported_model_type(tmp_path):
    write_tiny_checkpoint(tmp_path, "bert")
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(WeightsError, match="unsupported model_type 'gpt2'"):
        weights.from_pretrained(str(tmp_path))


def test_shapes_disagree_with_config(tmp_path):
    write_tiny_checkpoint(tmp_path, "bert")
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 48}))
    with pytest.raises(WeightsError, match=r"intermediate/dense/kernel: checkpoint \(32, 64\) vs config \(32, 48\)"):
        weights.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupted_safetensors(tmp_path, damage):
    write_tiny_checkpoint(tmp_path, "bert")
    f = tmp_path / weights.SAFETENSORS
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 20)
    with pytest.raises(WeightsError, match="corrupted"):
        weights.from_pretrained(str(tmp_path))


def test_hub_id_offline_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(WeightsError, match=r"not in the Hugging Face cache and HF_HUB_OFFLINE is set.*--model PATH"):
        weights.from_pretrained("roberta-base")


def test_checkpoint_is_read_as_host_views(tmp_path):
    """The checkpoint is read as numpy arrays, its kernels transposed as views: no device arrays, no
    transposed copies (they held about 270 MiB of the process's memory for MiniLM, results/memory/)."""
    write_tiny_checkpoint(tmp_path, "bert")
    tensors = weights._read_safetensors(tmp_path / weights.SAFETENSORS)
    assert all(type(v) is np.ndarray for v in tensors.values())
    kernel = tensors["encoder/layer/0/attention/self/query/kernel"]
    assert kernel.base is not None and kernel.flags["F_CONTIGUOUS"] and not kernel.flags["C_CONTIGUOUS"]
    params, _ = weights.load_params(tmp_path, weights.read_config(tmp_path, num_labels=2))
    np.testing.assert_array_equal(np.asarray(params["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"]), kernel)
