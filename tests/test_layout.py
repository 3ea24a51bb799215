"""The shape of the project, checked: module sizes, the import graph, no path hacks, the README's length,
links that resolve, and a results index that lists every folder. Each would drift silently otherwise."""

from __future__ import annotations

import ast
import re

import pytest

from .conftest import ROOT

PACKAGE = ROOT / "lora_jax"


def _imports(path) -> set[str]:
    """The lora_jax modules a module imports (relative or absolute, at any depth in the file)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module is None:
                names |= {a.name for a in node.names}
            elif node.level == 1:
                names.add(node.module.split(".")[0])
            elif node.module and node.module.startswith("lora_jax."):
                names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("lora_jax.")}
    return names


def test_no_module_is_over_400_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in PACKAGE.glob("*.py")}
    assert max(sizes.values()) <= 400, {k: v for k, v in sizes.items() if v > 400}


@pytest.mark.parametrize("module, forbidden", [
    ("model", {"lora", "adaptive", "train", "train_step"}),   # the encoder knows nothing of LoRA
    ("model_config", {"model", "lora"}),
    ("lora", {"model", "train", "adaptive", "weights"}),       # the transform knows no model
    ("lora_init", {"model", "train", "adaptive", "weights"}),
    ("compiler", {"model", "lora"}),
    ("quant", {"model", "lora", "adapter", "train", "train_step", "prepare"}),  # stored weights know no LoRA
    ("eva", {"model", "lora", "train", "train_step", "prepare"}),  # statistics and allocation; the run's loop is prepare's
    ("tree", set()),
    ("files", set()),
    ("evaluate", {"train", "train_step", "optim", "prepare"}),  # inference never imports training
    ("serve", {"train", "train_step", "optim", "prepare"}),
    ("mixed", {"train", "train_step", "optim", "prepare", "adapter", "serve"}),
    ("eval_step", {"train", "train_step", "optim", "prepare"}),
    ("export", {"train", "train_step", "optim", "prepare"}),
    ("combine", {"train", "train_step", "optim", "prepare", "model"}),  # factors in, factors out
    ("cli_adapters", {"train", "train_step", "optim", "prepare"}),
])
def test_imports_run_downwards(module, forbidden):
    imported = _imports(PACKAGE / f"{module}.py")
    assert not imported & forbidden, imported & forbidden
    if not forbidden:  # the bottom of the graph imports no lora_jax module at all
        assert not imported


def test_model_has_no_compiler_mechanics():
    text = (PACKAGE / "model.py").read_text()
    assert "custom_vjp" not in text and "_low_rank" not in text and "checkpoint_policies" not in text


def test_key_prefixes_are_spelled_in_one_module():
    """``params/`` and ``lora/`` keys are built and parsed by ``tree`` alone."""
    spelled = {p.name for p in PACKAGE.glob("*.py") if p.name != "tree.py"
               and re.search(r"""["']f?(params|lora)/""", p.read_text())}
    assert not spelled, spelled


def test_no_sys_path_edits_and_no_script_imports_another():
    for folder in ("lora_jax", "scripts", "benchmarks", "tests"):
        for p in (ROOT / folder).glob("*.py"):
            assert not re.search(r"sys\.path\.(insert|append|extend)|sys\.path\s*=", p.read_text()), p
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py")} | {p.stem for p in (ROOT / "scripts").glob("*.py")}
    for p in (ROOT / "benchmarks").glob("*.py"):
        tree = ast.parse(p.read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not (imported & scripts) - {"common"}, (p.name, imported & scripts)


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def _links(path) -> list[str]:
    return [m for m in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()) if "://" not in m]


def test_relative_links_resolve():
    pages = [ROOT / "README.md", ROOT / "results" / "README.md", *(ROOT / "docs").glob("*.md")]
    missing = [(p.relative_to(ROOT), link) for p in pages for link in _links(p) if not (p.parent / link).exists()]
    assert not missing, missing


def test_results_index_lists_every_folder():
    index = (ROOT / "results" / "README.md").read_text()
    folders = [p.name for p in (ROOT / "results").iterdir() if p.is_dir()]
    assert folders and not [f for f in folders if f"]({f}/" not in index], folders


def test_readme_install_block_is_what_setup_runs():
    """CI runs scripts/setup.sh; the README's install block must be the same pip commands, in its order."""
    block = re.search(r"## Install.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    readme = [line.split("#")[0].split() for line in block.splitlines() if line.strip()]
    setup = [["pip", *line.split()[1:]] for line in (ROOT / "scripts" / "setup.sh").read_text().splitlines()
             if line.startswith(".venv/bin/pip install") and "--upgrade" not in line]
    assert [[w for w in cmd if w != "-q"] for cmd in setup] == readme, (setup, readme)


def test_import_graph_has_no_cycle():
    """Every import, at module level or inside a function, runs one way: the modules can be ordered so that
    each imports only modules before it (the CLI last; tree, files, compiler first)."""
    graph = {p.stem: _imports(p) - {"__init__"} for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    done: set[str] = set()
    while len(done) < len(graph):
        ready = {m for m, deps in graph.items() if m not in done and deps <= done}
        assert ready, {m: sorted(d - done) for m, d in graph.items() if m not in done}  # what waits on what
        done |= ready
    assert "cli" not in set().union(*graph.values())  # nothing imports the CLI
