"""The package layout's promises, checked so that they survive refactors.

- The library (``allora_trl`` with ``core``, ``trainers``, the integrations) works without the ``job`` extra, and the
  command then says which extra to install: users of the trainer should not need lm-eval, gguf or matplotlib.
- Imports point one way: ``core`` (the method on plain peft) knows nothing of TRL trainers, the job, the command or
  the integrations; ``trainers`` knows nothing of the job or the command; the installed package never imports the
  checkout-only ``benchmarks``; and neither the package nor the benchmarks has an import cycle.

The import checks read the source with ``ast`` (every import statement, also those inside functions, and
``importlib.import_module("...")`` with a literal name), so a lazy import cannot hide a dependency.
"""

from __future__ import annotations

import ast
import functools
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Source folders and the module names they install as (integrations/ installs as allora_trl.integrations).
SOURCE_PACKAGES = {"allora_trl": ROOT / "allora_trl", "allora_trl.integrations": ROOT / "integrations"}

# The job extra's modules (allora_trl.cli.JOB_MODULES). pyyaml is also a dependency of huggingface_hub, so it is
# installed even without the extra: for it the check is only that allora_trl's own code does not import it.
NOT_INSTALLED_WITHOUT_JOB = ["gguf", "lm_eval", "matplotlib"]
JOB_ONLY_FOR_ALLORA_TRL = ["yaml"]

# Run in a fresh interpreter: the job modules are made unimportable before allora_trl is imported.
NO_JOB_EXTRA_SCRIPT = textwrap.dedent(
    """
    import builtins, contextlib, io, json, sys

    root, absent, own_only = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    sys.path.insert(0, root)  # this checkout's allora_trl, whatever is installed
    for name in absent:
        sys.modules[name] = None  # as if not installed: `import` raises, importlib.util.find_spec returns None

    real_import = builtins.__import__

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        importer = (globals or {}).get("__name__") or ""
        if level == 0 and name.split(".")[0] in own_only and importer.split(".")[0] == "allora_trl":
            raise ImportError(f"{importer} imports {name}, a module of the job extra")
        return real_import(name, globals, locals, fromlist, level)

    builtins.__import__ = guarded_import

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import allora_trl
    import allora_trl.cli

    assert allora_trl.__file__.startswith(root), allora_trl.__file__
    assert allora_trl.ALLoRATrainer and allora_trl.ALLoRAConfig  # the lazily imported TRL layer

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=64,
    )
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    allora_trl.apply_allora(model, eta=2.0)
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = allora_trl.cli.main(["train"])
    print(json.dumps({"code": code, "stderr": stderr.getvalue()}))
    """
)


def test_library_works_without_the_job_extra():
    """Import, apply_allora, one backward and the command's answer, with the job extra's modules unavailable."""
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            NO_JOB_EXTRA_SCRIPT,
            str(ROOT),
            json.dumps(NOT_INSTALLED_WITHOUT_JOB),
            json.dumps(JOB_ONLY_FOR_ALLORA_TRL),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["code"] == 2
    assert "`job` extra" in outcome["stderr"] and "allora-trl[job]" in outcome["stderr"], outcome["stderr"]


def _module_name(path: Path) -> str:
    """The dotted name a source file imports as (``integrations/x.py`` -> ``allora_trl.integrations.x``)."""
    for package, folder in SOURCE_PACKAGES.items():
        if path.is_relative_to(folder):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            break
    else:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def _lazy_attributes() -> dict[str, str]:
    """``allora_trl.ALLoRATrainer`` and the like: names ``allora_trl.__getattr__`` serves from allora_trl.trainers."""
    import allora_trl

    return {f"allora_trl.{name}": "allora_trl.trainers" for name in allora_trl.__all__ if name not in vars(allora_trl)}


def _imported_names(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """Absolute names an import statement may load: the module and, for ``from X import y``, also ``X.y``."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = module.split(".")
        base = base[: len(base) - node.level + (1 if is_package else 0)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    return [source] + [f"{source}.{alias.name}" for alias in node.names if alias.name != "*"]


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import in a file, lazy ones and ``import_module("...")`` included."""
    module = _module_name(path)
    is_package = path.name == "__init__.py"
    lazy = _lazy_attributes()
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = _imported_names(node, module, is_package)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names = [node.args[0].value]
        else:
            continue
        found += [(node.lineno, lazy.get(name, name)) for name in names]
    return found


def _violations(folders: list[Path], forbidden: list[str]) -> list[str]:
    hits = []
    for folder in folders:
        for path in sorted(folder.rglob("*.py")):
            for line, name in imports_of(path):
                if any(name == f or name.startswith(f + ".") for f in forbidden):
                    hits.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return hits


@pytest.mark.parametrize(
    "folders, forbidden",
    [
        (
            ["allora_trl/core"],
            ["allora_trl.trainers", "allora_trl.job", "allora_trl.cli", "allora_trl.integrations"],
        ),
        (["allora_trl/trainers"], ["allora_trl.job", "allora_trl.cli"]),
        (["allora_trl", "integrations"], ["benchmarks"]),
    ],
    ids=["core", "trainers", "no-benchmarks"],
)
def test_import_direction(folders, forbidden):
    """Lower layers stay usable alone: core on peft only, trainers without the job's extra dependencies."""
    hits = _violations([ROOT / f for f in folders], forbidden)
    assert not hits, "imports against the layering:\n" + "\n".join(hits)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (or a self-import): Tarjan's algorithm."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def import_graph(folders: list[Path]) -> dict[str, set[str]]:
    """Module -> the modules of ``folders`` it imports (a package's own ``__init__`` not counted for its submodules,
    which import it implicitly; ``from . import x`` counts as importing ``x``)."""
    files = {_module_name(p): p for folder in folders for p in sorted(folder.rglob("*.py"))}
    graph = {}
    for module, path in files.items():
        targets = set()
        for _, name in imports_of(path):
            # `from . import x` yields both "pkg" and "pkg.x": keep the most specific known module.
            while name and name not in files:
                name = name.rpartition(".")[0]
            if name and name != module and not module.startswith(name + "."):
                targets.add(name)
        graph[module] = targets
    return graph


@pytest.mark.parametrize(
    "folders",
    [["benchmarks"], ["allora_trl", "integrations"]],
    ids=["benchmarks", "package"],
)
def test_no_import_cycles(folders):
    """A cycle, even through imports inside functions, means the modules cannot be read or tested apart."""
    cycles = _cycles(import_graph([ROOT / f for f in folders]))
    assert not cycles, f"import cycles in {folders}: " + "; ".join(" <-> ".join(c) for c in cycles)
