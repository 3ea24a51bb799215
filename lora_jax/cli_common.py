"""What every ``lora-jax`` subcommand shares: a parser that fails in one line, the user-error types
that end in one line and exit status 2, logging, and the check that an output can be written."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .config import ConfigValueError


# Errors that are the user's input, not our bug: one line, no traceback.
def user_errors():
    from .adapter import AdapterError
    from .adaptive import AdaptiveError
    from .checkpoint import CheckpointError
    from .data import DataError
    from .lora import LoraError
    from .model import ConfigError
    from .parallel import ParallelError
    from .rundir import RunError
    from .weights import WeightsError
    from .combine import CombineError
    from .export import ExportError
    from .eva import EvaError

    return (ConfigValueError, DataError, LoraError, ConfigError, RunError, WeightsError, AdapterError,
            CheckpointError, ParallelError, AdaptiveError, ExportError, CombineError, EvaError)


def setup_logging(level: int) -> None:
    """Our messages at ``level``; the libraries' (orbax, absl, jax's TPU probe) only when they are errors."""
    logging.basicConfig(level=logging.ERROR, format="%(message)s")
    logging.getLogger("lora_jax").setLevel(level)


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (not the whole usage block), exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def check_writable_file(path: Path, flag: str) -> None:
    """Fail now, not after the work, if ``path`` cannot be written: its directory must exist and take a
    new file (``report.check_writable``); an existing directory at ``path`` is refused too."""
    from .files import check_writable

    if path.is_dir():
        raise ConfigValueError(f"{flag} {path} is a directory")
    try:
        check_writable(path.parent)
    except OSError as e:
        raise ConfigValueError(f"cannot write {flag} {path}: {e.strerror or e}") from None


def named_dirs(specs: list[str], flag: str = "--adapter") -> dict[str, str]:
    """``NAME=DIR`` flag values -> {name: directory}, in order; a malformed or repeated name is an error."""
    named: dict[str, str] = {}
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not sep or not name or not directory:
            raise ConfigValueError(f"{flag} takes NAME=DIR, got {spec!r}")
        if name in named:
            raise ConfigValueError(f"{flag} {name}= is given twice ({named[name]} and {directory})")
        named[name] = directory
    return named
