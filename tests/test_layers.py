"""Import layers, read from the source with ``ast`` (no imports run): every import runs down, never up.

The rule (docs/architecture.md shows the same table, and a test below keeps the two equal):
every module of ``nanochat/`` sits in exactly one layer of :data:`LAYERS`; a module may import
modules of its own layer or of a layer below it, never above. Lazy (function-level) and relative
imports count like top-level ones. Inside a layer, the packages of :data:`INDEPENDENT` do not
import each other either (training, evaluation and serving are three separate stages), and some
third-party packages belong to a few layers only (:data:`RESTRICTED`: the CLI alone parses
arguments; the model, engine and everything below Ray Data import neither Ray nor DeepSpeed).
A new module fails :func:`test_every_module_sits_in_exactly_one_layer` until it is placed.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nanochat"
ARCHITECTURE_DOC = ROOT / "docs" / "architecture.md"

# Top to bottom. An entry names a module, or a package and everything in it ("nanochat" itself is
# only the package's __init__: the version).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("cli", ("nanochat.cli", "nanochat.commands")),
    ("orchestration", ("nanochat.pipeline", "nanochat.tune")),
    ("stages", ("nanochat.train", "nanochat.rl", "nanochat.eval", "nanochat.serve", "nanochat.interop",
                "nanochat.report", "nanochat.ray_utils", "nanochat.ray_console", "nanochat.ray_stop",
                "nanochat.metrics_export")),
    ("data", ("nanochat.data",)),
    ("tasks", ("nanochat.tasks",)),
    ("tokenizer jobs", ("nanochat.tokenizer_train", "nanochat.tokenizer_eval")),
    ("sources", ("nanochat.sources",)),
    ("core", ("nanochat.model", "nanochat.kv_cache", "nanochat.losses", "nanochat.tokenizer", "nanochat.conversation",
              "nanochat.engine", "nanochat.engine_types", "nanochat.engine_seq", "nanochat.engine_decode",
              "nanochat.sampling", "nanochat.detok", "nanochat.prefix_cache", "nanochat.tools",
              "nanochat.checkpoint", "nanochat.config", "nanochat.stages")),
    ("common", ("nanochat", "nanochat.common", "nanochat.progress")),
)
# Packages of one layer that must not import each other (RL builds on training's optimizer and driver,
# so it is not in this list).
INDEPENDENT = ("nanochat.train", "nanochat.eval", "nanochat.serve")
CLI = ("nanochat.cli", "nanochat.commands")
ABOVE_DATA = tuple(entry for _, entries in LAYERS[: [n for n, _ in LAYERS].index("data") + 1] for entry in entries)
# An imported module (prefix) → the only modules (prefixes) that may import it.
RESTRICTED = {
    "argparse": CLI,
    "ray": ABOVE_DATA,
    "deepspeed": ("nanochat.train", "nanochat.rl"),  # the training stages: pretrain/mid/SFT and RL learners
    "fastapi": ("nanochat.serve",),
    "starlette": ("nanochat.serve",),
}
# (importer, imported) pairs allowed against the rule, each with its reason. Keep it empty: move code down.
EXEMPT: dict[tuple[str, str], str] = {}


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path, module: str) -> set[str]:
    """Every module an ``import`` anywhere in ``module``'s file names (function-level ones too), absolute."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from nanochat import commands`
    return names


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _entry_covers(entry: str, module: str) -> bool:
    return module == entry or (entry != "nanochat" and module.startswith(entry + "."))


def layers_of(module: str, layers=LAYERS) -> list[int]:
    """Indexes (0 = top) of the layers that place ``module``: one, when the table is right."""
    return [i for i, (_, entries) in enumerate(layers) if any(_entry_covers(e, module) for e in entries)]


def _package_of(name: str, modules: set[str]) -> str | None:
    """The module of ours an imported name refers to (``nanochat.tokenizer.Tokenizer`` → ``nanochat.tokenizer``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _only(indexes: list[int]) -> int | None:
    return indexes[0] if len(indexes) == 1 else None


def layer_violations(modules: dict[str, Path], layers=LAYERS, independent=INDEPENDENT, exempt=EXEMPT) -> list[str]:
    """Every import of one of our modules that runs up a layer, or across :data:`INDEPENDENT` packages."""
    found = []
    names = set(modules)
    for module, path in modules.items():
        mine = _only(layers_of(module, layers))
        for name in sorted(imported_names(path, module)):
            target = _package_of(name, names) if name.startswith("nanochat") else None
            if target is None or target == module or (module, target) in exempt:
                continue
            theirs = _only(layers_of(target, layers))
            if mine is None or theirs is None:
                continue  # reported by test_every_module_sits_in_exactly_one_layer
            if theirs < mine:
                found.append(f"{module} ({layers[mine][0]}) imports {target} ({layers[theirs][0]}): up a layer")
            own = [p for p in independent if _under(module, (p,))]
            other = [p for p in independent if _under(target, (p,))]
            if own and other and own != other:
                found.append(f"{module} imports {target}: {own[0]} and {other[0]} are independent")
    return sorted(set(found))


def restricted_violations(modules: dict[str, Path], restricted=RESTRICTED) -> list[str]:
    found = []
    for module, path in modules.items():
        for name in sorted(imported_names(path, module)):
            for package, allowed in restricted.items():
                if _under(name, (package,)) and not _under(module, allowed):
                    found.append(f"{module} imports {name} (only {', '.join(allowed)} may)")
    return found


def test_the_scanner_sees_lazy_relative_and_from_imports(tmp_path):
    pkg = tmp_path / "sub"
    pkg.mkdir()
    (pkg / "mod.py").write_text("def f():\n    import argparse\n    from .. import commands\n    from . import x\n")
    names = imported_names(pkg / "mod.py", "nanochat.sub.mod")
    assert {"argparse", "nanochat.commands", "nanochat.sub.x"} <= names


def test_an_import_up_a_layer_or_across_independent_stages_is_caught(tmp_path):
    files = {
        "nanochat.low": "def f():\n    from nanochat.high import thing\n",  # lazy, and up
        "nanochat.high": "import nanochat.low\n",  # down: fine
        "nanochat.a.x": "from nanochat.b import y\n",  # sideways across independent packages
        "nanochat.b": "from nanochat.low import f\n",
    }
    modules = {}
    for name, text in files.items():
        path = tmp_path / f"{name}.py"
        path.write_text(text)
        modules[name] = path
    layers = (("top", ("nanochat.high", "nanochat.a", "nanochat.b")), ("bottom", ("nanochat.low",)))
    found = layer_violations(modules, layers, independent=("nanochat.a", "nanochat.b"), exempt={})
    assert found == [
        "nanochat.a.x imports nanochat.b: nanochat.a and nanochat.b are independent",
        "nanochat.low (bottom) imports nanochat.high (top): up a layer",
    ]


def test_every_module_sits_in_exactly_one_layer():
    placed = {module: layers_of(module) for module in _modules()}
    assert {m: [LAYERS[i][0] for i in where] for m, where in placed.items() if len(where) != 1} == {}


def test_every_layer_entry_names_an_existing_module():
    modules = set(_modules())
    stale = [e for _, entries in LAYERS for e in entries if not any(_entry_covers(e, m) for m in modules)]
    assert stale == []


def test_imports_run_down_the_layers_only():
    assert layer_violations(_modules()) == []


def test_only_the_cli_parses_arguments_and_ray_deepspeed_fastapi_stay_in_their_layers():
    assert restricted_violations(_modules()) == []


def test_no_exemption_is_stale():
    modules = _modules()
    live = {(m, t) for m, p in modules.items() for n in imported_names(p, m) if (t := _package_of(n, set(modules)))}
    assert [pair for pair in EXEMPT if pair not in live] == []


def test_only_common_reads_the_artifacts_root_from_the_environment():
    # Entry points resolve the root once (nanochat.common.base_dir) and pass it down; nothing reads
    # the variable itself or writes it to steer code below (Ray workers get it in their config).
    found = [
        _module_name(path)
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != PACKAGE / "common.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Constant) and node.value == "NANOCHAT_BASE_DIR"
    ]
    assert found == []


def _documented_layers() -> list[tuple[str, list[str]]]:
    """The table between the ``layers`` markers of docs/architecture.md: ``name | `module` `module` ...``."""
    text = ARCHITECTURE_DOC.read_text(encoding="utf-8")
    block = text.split("<!-- layers:begin -->", 1)[1].split("<!-- layers:end -->", 1)[0]
    rows = []
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0] and not set(cells[0]) <= {"-", ":"} and cells[0] != "layer":
            rows.append((cells[0], re.findall(r"`([\w.]+)`", cells[1])))
    return rows


def test_the_architecture_doc_shows_the_same_layers():
    assert _documented_layers() == [(name, list(entries)) for name, entries in LAYERS]
