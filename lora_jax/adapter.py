"""Adapters on disk: our own format, and Hugging Face peft's.

lora-jax format (``DIR/adapter.safetensors`` + ``DIR/adapter_config.json``):
the trained leaves only (LoRA factors ``lora/<kernel path>/{a,b}`` with a
``(d_in, r)`` and b ``(r, d_out)``, and the head ``params/classifier/...``),
plus what is needed to rebuild the run: base model, its architecture hash,
LoRA config, task and label names.

peft format (``adapter_config.json`` + ``adapter_model.safetensors``): keys
``base_model.model.<bert|roberta>.<module>.lora_A.weight`` ``(r, in)`` and
``lora_B.weight`` ``(out, r)``, i.e. torch's ``(out, in)`` layout, DoRA's
``<module>.lora_magnitude_vector`` ``(out,)`` (config ``use_dora``), and the
head under ``base_model.model.classifier.*`` (peft's ``modules_to_save``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np

from . import lora, quant
from . import tree as tree_lib
from .files import write_bytes
from .model import ModelConfig

FORMAT = "lora-jax-adapter"
# Metadata of an adapter trained on a quantized base (quant.py): "int8" or "nf4". Loaders rebuild that base.
BASE_QUANTIZATION = "base_quantization"
FORMAT_VERSION = 1
WEIGHTS, CONFIG = "adapter.safetensors", "adapter_config.json"
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"


class AdapterError(ValueError):
    """An adapter directory that is missing, of another format, or does not fit the base."""


def _save_tensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    from safetensors.numpy import save

    blob = save({k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in tensors.items()}, metadata=metadata)
    write_bytes(path, blob)


def _load_tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"cannot read {path} (corrupted or not safetensors): {e}") from None


# ----------------------------------------------------------------------------- our format


def export(directory: Path, trainable: dict, *, mcfg: ModelConfig, lcfg: lora.LoraConfig, base_model: str,
           task: str, label_names: tuple[str, ...], max_seq_len: int | None = None,
           base_fingerprint: str | None = None, extra: dict | None = None) -> int:
    """Write the trained leaves and metadata; returns the adapter's size in bytes.

    ``base_fingerprint`` (``weights.fingerprint`` of the base it was trained on) lets a loader refuse
    another checkpoint of the same architecture (``check_base``). ``extra``: more metadata fields (how a
    combined adapter was made)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base_model": base_model,
        "architecture_hash": mcfg.architecture_hash(),
        "base_fingerprint": base_fingerprint,
        "model_config": dataclasses.asdict(mcfg),
        "lora": dataclasses.asdict(lcfg),
        "task": task,
        "label_names": list(label_names),
        "max_seq_len": max_seq_len,
        **(extra or {}),
    }
    _save_tensors(directory / WEIGHTS, {k: np.asarray(v) for k, v in trainable.items()})
    write_bytes(directory / CONFIG, (json.dumps(meta, indent=2) + "\n").encode())
    return size_bytes(directory)


def size_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in Path(directory).iterdir() if f.is_file())


def read_json(file: Path) -> dict:
    """A JSON object from ``file``; anything else (unreadable, not UTF-8, not JSON, not an object) is an
    AdapterError naming the file."""
    try:
        value = json.loads(Path(file).read_text(encoding="utf-8"))
    except OSError as e:
        raise AdapterError(f"cannot read {file}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise AdapterError(f"{file} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise AdapterError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise AdapterError(f"{file} holds {type(value).__name__}, not a JSON object")
    return value


# What a lora-jax adapter's metadata must hold, and the type of each.
_META_FIELDS = {"base_model": str, "architecture_hash": str, "model_config": dict, "lora": dict, "task": str,
                "label_names": list}


def read_meta(directory: Path) -> dict:
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError(f"adapter directory {directory} does not exist")
    file = directory / CONFIG
    if not file.is_file():
        raise AdapterError(f"{directory} has no {CONFIG}: not an adapter directory")
    meta = read_json(file)
    if meta.get("format") != FORMAT:
        hint = " (it is a peft adapter: pass --peft)" if "peft_type" in meta else ""
        raise AdapterError(f"{directory} is not a lora-jax adapter{hint}")
    if not isinstance(meta.get("format_version"), int) or meta["format_version"] > FORMAT_VERSION:
        raise AdapterError(f"{directory} has adapter format version {meta.get('format_version')!r}; "
                           f"this lora-jax reads up to {FORMAT_VERSION}: upgrade it")
    bad = [k for k, t in _META_FIELDS.items() if not isinstance(meta.get(k), t)]
    if bad or not isinstance(meta["model_config"].get("num_labels"), int):
        raise AdapterError(f"{file} lacks {', '.join(bad) or 'model_config.num_labels'} (or has the wrong type): "
                           "a damaged adapter")
    lora_config(meta, file)  # raises on fields that do not make a LoRA config
    return meta


def check_base(meta: dict, fingerprint: str, base: str, where: str, *, force: bool = False,
               force_flag: str | None = "--force-base") -> None:
    """Refuse a base whose weights are not the ones the adapter was trained on (same architecture, other
    checkpoint: the numbers would be wrong without any error). ``force`` (the command's ``force_flag``)
    lets it through; adapters written before fingerprints (no ``base_fingerprint``) are not checked."""
    want = meta.get("base_fingerprint")
    if want and fingerprint != want and not force:
        hint = f"; pass {force_flag} to use it anyway" if force_flag else ""
        raise AdapterError(f"{where} was trained on other base weights ({meta.get('base_model')}, fingerprint "
                           f"{want}) than {base} ({fingerprint}){hint}")


def lora_config(meta: dict, where: Path | str = "the adapter") -> lora.LoraConfig:
    try:
        fields = dict(meta["lora"])
        for k in ("targets", "trainable"):
            fields[k] = tuple(fields[k])
        return lora.LoraConfig(**fields)
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterError(f"{where}: its LoRA settings are damaged ({type(e).__name__}: {e})") from None


def base_as_trained(params: dict, meta: dict) -> dict:
    """The base an adapter was trained on: for a quantized run, the dequantization of the same codes."""
    kind = meta.get(BASE_QUANTIZATION)
    if kind is None:
        return params
    if kind not in quant.QUANTIZED:
        raise AdapterError(f"the adapter's {BASE_QUANTIZATION} {kind!r} is not one of "
                           f"{', '.join(quant.QUANTIZED)}: a damaged adapter or a newer lora-jax")
    return quant.round_trip(params, kind)


def load(directory: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata, trained leaves) of a lora-jax adapter directory."""
    meta = read_meta(directory)
    if not (Path(directory) / WEIGHTS).is_file():
        raise AdapterError(f"{directory} has no {WEIGHTS}")
    return meta, _load_tensors(Path(directory) / WEIGHTS)


def check_fits(trainable: dict, params: dict, where: str) -> None:
    """Every adapter leaf must name a base kernel and agree with its shape; every head leaf likewise."""
    flat = tree_lib.flatten(params)
    errors = []
    for key, value in trainable.items():
        if tree_lib.is_param(key):
            rest = tree_lib.param_path(key)
            if rest not in flat:
                errors.append(f"{rest} is not in the base model")
            elif tuple(np.shape(flat[rest])) != tuple(value.shape):
                errors.append(f"{rest}: adapter {tuple(value.shape)} vs base {tuple(np.shape(flat[rest]))}")
        elif tree_lib.is_adapter(key):
            path, factor = tree_lib.adapter_path(key)
            if path not in flat:
                errors.append(f"adapted kernel {path} is not in the base model")
                continue
            d_in, d_out = int(np.prod(np.shape(flat[path])[:-1])), int(np.shape(flat[path])[-1])
            if factor == lora.MAGNITUDE:
                if tuple(value.shape) != (d_out,):
                    errors.append(f"{path}: DoRA magnitude of shape {tuple(value.shape)} does not fit "
                                  f"a ({d_in}, {d_out}) kernel")
                continue
            dim = value.shape[0] if factor == "a" else value.shape[1]
            if value.ndim != 2 or dim != (d_in if factor == "a" else d_out):
                errors.append(f"{path}: LoRA {factor} of shape {tuple(value.shape)} does not fit "
                              f"a ({d_in}, {d_out}) kernel")
        else:
            errors.append(f"unexpected tensor {key}")
    if errors:
        raise AdapterError(f"{where} does not fit the base model: " + "; ".join(errors[:5])
                           + (f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""))


# ----------------------------------------------------------------------------- peft interop

_PEFT_UNSUPPORTED = {
    "lora_bias": (False, None),
    "bias": ("none", None),
    "fan_in_fan_out": (False, None),
    "layers_to_transform": (None,),
    "layer_replication": (None,),
    "use_qalora": (False, None),
}


# DoRA's magnitude in a saved peft adapter (the module's ``lora_magnitude_vector.<name>.weight`` in memory).
_PEFT_MAGNITUDE = "lora_magnitude_vector"

# peft initialisations that change the base weights: an adapter saved without conversion needs that residual.
_RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq")


def _torch_module(path: str, mcfg: ModelConfig) -> str:
    """Our kernel path -> the module name in HF's *ForSequenceClassification (``roberta.encoder...``)."""
    module = path.rsplit("/", 1)[0].replace("/", ".")
    return module if module.startswith(tree_lib.HEAD) else f"{mcfg.model_type}.{module}"


def export_peft(directory: Path, trainable: dict, *, mcfg: ModelConfig, lcfg: lora.LoraConfig,
                base_model: str) -> int:
    """Write a peft LoRA adapter (task SEQ_CLS, head in ``modules_to_save``); returns its size in bytes."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, modules = {}, []
    rank_pattern, alpha_pattern = {}, {}
    for key, value in trainable.items():
        value = np.asarray(value, np.float32)
        if tree_lib.is_adapter(key):
            path, factor = tree_lib.adapter_path(key)
            module = _torch_module(path, mcfg)
            if factor == "a":
                modules.append(module)
                r = value.shape[1]
                if r != lcfg.rank:  # adaptive-rank adapters: per-module rank, the same scale everywhere
                    rank_pattern[module] = r
                    alpha_pattern[module] = lcfg.scale * (math.sqrt(r) if lcfg.rslora else r)
            if factor == lora.MAGNITUDE:
                tensors[f"base_model.model.{module}.{_PEFT_MAGNITUDE}"] = value
                continue
            name = "lora_A" if factor == "a" else "lora_B"
            tensors[f"base_model.model.{module}.{name}.weight"] = value.T
        else:
            *mod, leaf = tree_lib.param_path(key).split("/")
            transpose = leaf == "kernel"
            tensors[f"base_model.model.{'.'.join(mod)}.{'weight' if transpose else leaf}"] = value.T if transpose else value
    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "base_model_name_or_path": base_model,
        "r": lcfg.rank,
        "lora_alpha": lcfg.alpha,
        "lora_dropout": lcfg.dropout,
        "use_rslora": lcfg.rslora,
        "use_dora": lcfg.dora,
        # Exact module names: peft matches list entries by name or dotted suffix.
        "target_modules": sorted(modules),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": [tree_lib.HEAD],
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    _save_tensors(directory / PEFT_WEIGHTS, tensors, metadata={"format": "pt"})
    write_bytes(directory / PEFT_CONFIG, (json.dumps(config, indent=2) + "\n").encode())
    return size_bytes(directory)


def _kernel_path(module: str, mcfg: ModelConfig) -> str:
    """A peft module name (``roberta.encoder...query``) -> our kernel path (``encoder/.../query/kernel``)."""
    if module.startswith(mcfg.model_type + "."):
        module = module[len(mcfg.model_type) + 1:]
    return module.replace(".", "/") + "/kernel"


def import_peft(directory: Path, params: dict, mcfg: ModelConfig) -> tuple[lora.LoraConfig, dict[str, np.ndarray]]:
    """Read a peft LoRA adapter for this base into (LoraConfig, trained leaves in our layout)."""
    directory = Path(directory)
    file = directory / PEFT_CONFIG
    if not file.is_file():
        raise AdapterError(f"{directory} has no {PEFT_CONFIG}: not a peft adapter directory")
    cfg = read_json(file)
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{directory}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    bad = [f"{k}={cfg[k]!r}" for k, ok in _PEFT_UNSUPPORTED.items() if k in cfg and cfg[k] not in ok]
    if bad:
        raise AdapterError(f"{directory}: unsupported peft options: {', '.join(bad)}")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_RESIDUAL_INITS):
        raise AdapterError(f"{directory} was saved by peft with init_lora_weights={init!r}: its factors apply to "
                           "a residual base, not to the pretrained one. Save it from peft with "
                           "path_initial_model_for_weight_conversion= (a plain adapter), then load that")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not (isinstance(r, int) and r > 0 and isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise AdapterError(f"{file}: r and lora_alpha must be a positive integer and a positive number, "
                           f"got r={r!r}, lora_alpha={alpha!r}")
    for k in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(k) or {}, dict):
            raise AdapterError(f"{file}: {k} must be an object, got {cfg[k]!r}")
    if not (directory / PEFT_WEIGHTS).is_file():
        raise AdapterError(f"{directory} has no {PEFT_WEIGHTS}")
    tensors = _load_tensors(directory / PEFT_WEIGHTS)
    prefix = "base_model.model."
    flat_params = tree_lib.flatten(params)
    trainable: dict[str, np.ndarray] = {}
    paths = []
    for key, value in tensors.items():
        if not key.startswith(prefix):
            raise AdapterError(f"{directory}: unexpected tensor {key}")
        name = key[len(prefix):].replace(".modules_to_save.default", "")
        m = re.fullmatch(rf"(.+)\.(lora_A|lora_B|{_PEFT_MAGNITUDE})(?:\.default)?(?:\.weight)?", name)
        if m and m.group(2) == _PEFT_MAGNITUDE:
            trainable[tree_lib.adapter_key(_kernel_path(m.group(1), mcfg), lora.MAGNITUDE)] = value
        elif m:
            path = _kernel_path(m.group(1), mcfg)
            factor = "a" if m.group(2) == "lora_A" else "b"
            trainable[tree_lib.adapter_key(path, factor)] = value.T
            if factor == "a":
                paths.append(path)
        else:
            *mod, leaf = name.split(".")
            if mod and mod[0] == mcfg.model_type:
                mod = mod[1:]
            base_path = "/".join(mod + [leaf])
            if leaf == "weight":
                kernel = "/".join(mod + ["kernel"])
                base_path = kernel if kernel in flat_params else "/".join(mod + ["scale"])
                value = value.T if base_path.endswith("/kernel") else value
            trainable[tree_lib.param_key(base_path)] = value
    if not paths:
        raise AdapterError(f"{directory} holds no LoRA tensors")
    dora = bool(cfg.get("use_dora", False))
    magnitudes = {tree_lib.adapter_path(k)[0] for k in trainable if k.endswith("/" + lora.MAGNITUDE)}
    if magnitudes != (set(paths) if dora else set()):
        raise AdapterError(f"{directory}: use_dora is {str(dora).lower()} but {len(magnitudes)} of its "
                           f"{len(paths)} adapted modules have a {_PEFT_MAGNITUDE}")
    rslora = bool(cfg.get("use_rslora", False))

    def scale(alpha: float, r: int) -> float:
        return alpha / (math.sqrt(r) if rslora else r)

    def pattern(patterns: dict, module: str, default):
        # peft's rule: a key matches a module name that equals it or ends with "." + key.
        for key, value in (patterns or {}).items():
            if re.fullmatch(rf"(.*\.)?{key}", module):
                return value
        return default

    for path in paths:
        module = _torch_module(path, mcfg)
        a = trainable[tree_lib.adapter_key(path, "a")]
        want = int(pattern(cfg.get("rank_pattern"), module, cfg["r"]))
        if a.shape[1] != want:
            raise AdapterError(f"{directory}: {module} has LoRA rank {a.shape[1]} but its config says {want}")
        alpha = float(pattern(cfg.get("alpha_pattern"), module, cfg["lora_alpha"]))
        # One scale per adapter here: fold a module's own scale into its A.
        trainable[tree_lib.adapter_key(path, "a")] = a * (scale(alpha, want) / scale(float(cfg["lora_alpha"]), int(cfg["r"])))
    heads = sorted({tree_lib.param_path(k).split("/")[0] for k in tree_lib.base_only(trainable)})
    lcfg = lora.LoraConfig(
        rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout") or 0.0),
        rslora=rslora, dora=dora,
        targets=tuple(re.escape(p) for p in sorted(paths)),
        trainable=tuple(f"{re.escape(h)}/.*" for h in heads) or (rf"{tree_lib.HEAD}/.*",),
    )
    check_fits(trainable, params, str(directory))
    return lcfg, trainable
