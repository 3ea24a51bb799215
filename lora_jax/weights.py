"""Hugging Face checkpoints -> our parameter tree, and back.

``from_pretrained`` takes a local directory or a Hub id (through
``huggingface_hub``'s cache; ``HF_HUB_OFFLINE=1`` is respected) holding a
``config.json`` and either ``model.safetensors`` (PyTorch names, Linear weights
``(out, in)``, transposed here to Flax ``(in, out)``; torch is not needed) or
``flax_model.msgpack`` (HF Flax names, already ``(in, out)``).

Every assigned tensor is shape-checked against the tree the config implies;
all disagreements are collected and raised together.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from . import files, lora
from . import tree as tree_lib
from .model import DTYPES, ConfigError, ModelConfig, init_params, param_shapes

log = logging.getLogger(__name__)

SAFETENSORS, MSGPACK = "model.safetensors", "flax_model.msgpack"
_PREFIXES = ("bert/", "roberta/")
# Buffers and heads of other tasks that a classification model never uses: not worth a warning.
_IGNORED = (r"embeddings/position_ids", r"embeddings/token_type_ids")


class WeightsError(RuntimeError):
    """A checkpoint that cannot be found, read or fitted to its config."""


@dataclass
class LoadReport:
    """What loading did: the source, the fresh (randomly initialised) and the unused tensors."""

    source: str
    missing: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    fingerprint: str = ""  # of the tensors read from the checkpoint (see ``fingerprint``)

    def summary(self) -> str:
        lines = [f"loaded {self.source}"]
        if self.missing:
            head = all(tree_lib.is_new_for_task(p) for p in self.missing)
            what = "a new classification head (normal for fine-tuning)" if head else "parameters"
            lines.append(f"initialised {len(self.missing)} tensors randomly, {what}: {', '.join(self.missing)}")
        if self.unused:
            lines.append(f"unused checkpoint tensors ({len(self.unused)}): {', '.join(self.unused[:8])}"
                         + (" ..." if len(self.unused) > 8 else ""))
        return "\n".join(lines)


# ----------------------------------------------------------------------------- locating files


def resolve(name_or_path: str) -> Path:
    """A local directory, or a Hub id downloaded (or found in the cache) by huggingface_hub."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise WeightsError(f"{name_or_path} is a file; --model takes a checkpoint directory")
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local:
        raise WeightsError(f"model directory {name_or_path} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    patterns = ["config.json", SAFETENSORS, MSGPACK, "tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json"]
    try:
        return Path(snapshot_download(name_or_path, allow_patterns=patterns))
    except HFValidationError as e:
        raise WeightsError(f"{name_or_path!r} is neither a directory nor a valid Hub id: {e}") from None
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
        raise WeightsError(
            f"model {name_or_path!r} is not in the Hugging Face cache and {why}; "
            "pass --model PATH with a local checkpoint directory"
        ) from None
    except Exception as e:  # network errors come in many classes; the advice is the same
        raise WeightsError(
            f"could not fetch model {name_or_path!r} from the Hugging Face Hub ({type(e).__name__}); "
            "pass --model PATH with a local checkpoint directory"
        ) from None


def read_config(directory: Path, **overrides) -> ModelConfig:
    file = directory / "config.json"
    if not file.is_file():
        raise WeightsError(f"{directory} has no config.json")
    try:
        hf = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise WeightsError(f"{file} is not valid JSON: {e}") from None
    except (UnicodeDecodeError, OSError) as e:
        raise WeightsError(f"cannot read {file} ({type(e).__name__})") from None
    if not isinstance(hf, dict):
        raise WeightsError(f"{file} holds {type(hf).__name__}, not a model config object")
    try:
        return ModelConfig.from_hf(hf, **overrides)
    except (ConfigError, TypeError) as e:
        raise WeightsError(f"{file}: {e}") from None


# ----------------------------------------------------------------------------- name conversion


def torch_to_flax_name(name: str, ndim: int) -> tuple[str, bool]:
    """A PyTorch state-dict key -> (our path, transpose?).

    ``encoder.layer.3.attention.self.query.weight`` -> ``encoder/layer/3/attention/self/query/kernel``
    (transposed); LayerNorm ``weight``/``gamma`` -> ``scale``; ``*_embeddings.weight`` -> ``embedding``.
    """
    parts = name.split(".")
    leaf, module = parts[-1], parts[:-1]
    owner = module[-1] if module else ""
    if owner == "LayerNorm":
        leaf = {"weight": "scale", "gamma": "scale", "beta": "bias"}.get(leaf, leaf)
    elif owner.endswith("_embeddings") and leaf == "weight":
        leaf = "embedding"
    elif leaf == "weight" and ndim == 2:
        return "/".join(module + ["kernel"]), True
    return "/".join(module + [leaf]), False


def flax_to_torch_name(path: str) -> tuple[str, bool]:
    """Inverse of :func:`torch_to_flax_name` for our own paths: (state-dict key, transpose?)."""
    *module, leaf = path.split("/")
    if leaf == "kernel":
        return ".".join(module + ["weight"]), True
    if leaf in ("scale", "embedding"):
        return ".".join(module + ["weight"]), False
    return ".".join(module + [leaf]), False


def _strip_prefix(path: str) -> str:
    for p in _PREFIXES:
        if path.startswith(p):
            return path[len(p):]
    return path


def _read_safetensors(file: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    out = {}
    try:
        # numpy (bfloat16 through ml_dtypes, which JAX brings): host arrays, and .T a view, not a copy.
        with safe_open(str(file), framework="numpy") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                path, transpose = torch_to_flax_name(key, tensor.ndim)
                out[_strip_prefix(path)] = tensor.T if transpose else tensor
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"cannot read {file} (corrupted or not a safetensors file): {e}") from None
    return out


def _read_msgpack(file: Path) -> dict[str, np.ndarray]:
    from flax.serialization import msgpack_restore

    try:
        tree = msgpack_restore(file.read_bytes())
    except Exception as e:  # msgpack raises several unrelated classes on bad bytes
        raise WeightsError(f"cannot read {file} (corrupted or not a Flax msgpack file): {e}") from None
    return {_strip_prefix(p): v for p, v in tree_lib.flatten(tree).items()}


# ----------------------------------------------------------------------------- loading


def host_device() -> jax.Device:
    """This process's CPU device, where weights are built and cast before going to an accelerator once
    (``jax.devices("cpu")[0]`` would be process 0's in a multi-process run)."""
    return jax.local_devices(backend="cpu")[0]


def fingerprint(tensors: dict[str, np.ndarray]) -> str:
    """A short hash that tells one checkpoint's weights from another's of the same architecture.

    It covers the first 64 values of every tensor, rounded to bfloat16 first, so that a bfloat16 copy of
    a base (``--param-dtype bfloat16``) has the fingerprint of its float32 original. Adapters record it
    and refuse another base (``--force-base`` overrides).
    """
    h = hashlib.blake2b(digest_size=8)
    for path in sorted(tensors):
        head = np.asarray(np.ravel(tensors[path])[:64])
        if np.issubdtype(head.dtype, np.floating) or head.dtype == jnp.bfloat16:
            head = head.astype(np.float32).astype(jnp.bfloat16)
        h.update(path.encode())
        h.update(head.tobytes())
    return h.hexdigest()


def load_params(
    directory: Path, cfg: ModelConfig, *, key: jax.Array | None = None, param_dtype: str = "float32"
) -> tuple[dict, LoadReport]:
    """Read the checkpoint in ``directory`` into the tree ``cfg`` implies.

    Parameters absent from the checkpoint (typically the task head) are
    initialised as HF does, from ``key``. ``param_dtype`` casts the base
    floating-point parameters (e.g. a bfloat16 frozen base).
    """
    # Everything is read, assembled and cast on the host, then each leaf goes to the device once: an
    # accelerator never holds the throwaway initialisation (a whole model, for a missing head) or
    # a float32 copy of a bfloat16 base, so its peak memory is what training needs.
    cpu = host_device()
    with jax.default_device(cpu):
        if (directory / SAFETENSORS).is_file():
            file, tensors = directory / SAFETENSORS, _read_safetensors(directory / SAFETENSORS)
        elif (directory / MSGPACK).is_file():
            file, tensors = directory / MSGPACK, _read_msgpack(directory / MSGPACK)
        else:
            raise WeightsError(f"{directory} has no weights file ({SAFETENSORS} or {MSGPACK})")

    expected = tree_lib.flatten(param_shapes(cfg))
    report = LoadReport(source=str(file))
    errors = []
    loaded = {}
    for path, spec in expected.items():
        if path not in tensors:
            report.missing.append(path)
            continue
        t = tensors[path]
        if tuple(t.shape) != tuple(spec.shape):
            errors.append(f"{path}: checkpoint {tuple(t.shape)} vs config {tuple(spec.shape)}")
        loaded[path] = t
    if errors:
        raise WeightsError(
            f"{file} does not fit {directory / 'config.json'}: " + "; ".join(errors)
        )
    report.unused = sorted(p for p in tensors if p not in expected and not any(re.fullmatch(i, p) for i in _IGNORED))
    if not loaded:
        raise WeightsError(f"{file} holds no tensor of a {cfg.model_type} model")

    flat = {}
    if report.missing:
        with jax.default_device(cpu):
            key = jax.device_put(key if key is not None else jax.random.key(0), cpu)
            fresh = tree_lib.flatten(init_params(cfg, key))
            flat.update({p: np.asarray(fresh[p]) for p in report.missing})
            del fresh
    flat.update({p: np.asarray(v) for p, v in loaded.items()})
    del tensors, loaded
    report.fingerprint = fingerprint({p: flat[p] for p in expected if p not in report.missing})
    dtype = DTYPES[param_dtype]
    out = {}
    for p in expected:  # one leaf at a time: the host copy goes as its device copy comes
        v = flat.pop(p)
        out[p] = jnp.asarray(v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v)
    return tree_lib.unflatten(out), report



def from_pretrained(
    name_or_path: str,
    *,
    num_labels: int = 2,
    key: jax.Array | None = None,
    param_dtype: str = "float32",
    **config_overrides,
) -> tuple[ModelConfig, dict, LoadReport]:
    """Config, parameters and a load report for a local directory or Hub id."""
    directory = resolve(name_or_path)
    cfg = read_config(directory, num_labels=num_labels, **config_overrides)
    params, report = load_params(directory, cfg, key=key, param_dtype=param_dtype)
    return cfg, params, report


def save_safetensors(params: dict, file: Path, *, prefix: str = "") -> None:
    """Write ``params`` with PyTorch names and ``(out, in)`` Linear weights (atomically)."""
    from safetensors.numpy import save_file

    tensors = {}
    for path, value in tree_lib.flatten(params).items():
        name, transpose = flax_to_torch_name(path)
        if not tree_lib.is_head(path):
            name = prefix + name
        arr = np.asarray(jnp.asarray(value, jnp.float32))
        tensors[name] = np.ascontiguousarray(arr.T if transpose else arr)
    files.write_via(Path(file), lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
