"""A saved adapter out to other tools: a merged Hugging Face checkpoint, or a peft adapter directory.

``lora-jax export --adapter DIR --merged OUT`` writes W + ΔW and the head as a plain
``*ForSequenceClassification`` checkpoint (``transformers`` loads it with no LoRA code and no
extra latency); ``--peft OUT`` writes the adapter in peft's layout for ``PeftModel`` on the original
base. The adapter may be ours or peft's (told apart by its ``adapter_config.json``).
"""

from __future__ import annotations

from pathlib import Path

from . import adapter as adapter_lib
from . import tree as tree_lib
from .evaluate import load_for_eval
from .files import write_dir
from .serve import export_merged, merged_params


class ExportError(ValueError):
    """An export that cannot be written (no output named, an output that exists, the adapter itself)."""


def is_peft_dir(directory: Path) -> bool:
    """Whether ``directory`` holds a peft adapter (its config names a ``peft_type``), not ours."""
    file = Path(directory) / adapter_lib.PEFT_CONFIG
    return file.is_file() and "peft_type" in adapter_lib.read_json(file)


def check_output(out: Path, flag: str, inputs, overwrite: bool) -> None:
    """Refuse, before any work, an output directory that would overwrite something: one inside (or equal
    to) an input directory, one that exists (without ``overwrite``), a file, or one whose parent is missing."""
    for src in map(Path, inputs):
        if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
            raise ExportError(f"{flag} {out} is inside the adapter directory {src}: choose another")
    if out.exists() and not overwrite:
        raise ExportError(f"{flag} {out} already exists: choose a new directory, or pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{flag} {out} is a file, not a directory")
    if not out.parent.is_dir():
        raise ExportError(f"{flag} {out}: its parent directory {out.parent} does not exist")


def export_adapter(adapter_dir: str, *, merged: str | None = None, peft: str | None = None,
                   model: str | None = None, force_base: bool = False, overwrite: bool = False) -> dict[str, Path]:
    """Write the adapter in ``adapter_dir`` as a merged checkpoint (``merged``) and/or a peft adapter
    (``peft``); returns {"merged" | "peft": directory written}. Each output directory appears whole or
    not at all (``files.write_dir``), and an existing one is replaced only with ``overwrite``."""
    directory = Path(adapter_dir)
    if merged is None and peft is None:
        raise ExportError("name at least one output: --merged OUT and/or --peft OUT")
    outs = {k: Path(v) for k, v in (("merged", merged), ("peft", peft)) if v is not None}
    if len(outs) == 2 and outs["merged"].resolve() == outs["peft"].resolve():
        raise ExportError(f"--merged and --peft name the same directory {merged}")
    for kind, out in outs.items():
        check_output(out, f"--{kind}", [directory], overwrite)
    from_peft = directory.is_dir() and is_peft_dir(directory)
    mcfg, lcfg, trained, frozen, model_dir, meta = load_for_eval(str(directory), model=model, peft=from_peft,
                                                                  force_base=force_base)
    if "merged" in outs:
        params = tree_lib.unflatten({tree_lib.param_path(k): v for k, v in frozen.items()})
        tree = merged_params(params, trained, lcfg)
        labels = tuple(meta.get("label_names") or ())
        write_dir(outs["merged"], lambda tmp: export_merged(tmp, tree, mcfg, labels), overwrite=overwrite)
    if "peft" in outs:
        if not lcfg.targets:
            raise ExportError(f"the adapter in {directory} has no LoRA factors (full fine-tuning?): "
                              "export it with --merged")
        base = model or meta.get("base_model") or meta.get("base_model_name_or_path") or model_dir
        write_dir(outs["peft"], lambda tmp: adapter_lib.export_peft(tmp, trained, mcfg=mcfg, lcfg=lcfg,
                                                                    base_model=base), overwrite=overwrite)
    return outs
