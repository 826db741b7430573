"""The package keeps the house of ``docs/parts.toml``: every import of every module of scale_ssl
(at the top of a file and inside functions alike, relative ones resolved) goes along an arrow the
parts file allows and along none it forbids. A failure names the file, the line, the import and
the rule it breaks."""

from __future__ import annotations

import ast
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "scale_ssl"
PARTS_FILE = ROOT / "docs" / "parts.toml"


@dataclass(frozen=True)
class Import:
    path: str
    line: int
    source_module: str
    target: str  # a dotted module name, ours or external


def module_name(path: Path) -> str:
    """``scale_ssl/trainer/module.py`` -> ``scale_ssl.trainer.module``; a package's
    ``__init__.py`` is the package itself, except the top one (``scale_ssl.__init__``)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 2:
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, source: str, module: str, known_modules: set[str]) -> list[Import]:
    """Every import statement of ``source``, anywhere in the file, as target module names. For
    ``from a.b import c`` the target is ``a.b.c`` when that is a module of ours, else ``a.b``."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    if module == "scale_ssl.__init__":
        package = "scale_ssl"
    found = []
    for node in ast.walk(ast.parse(source, filename=str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            for alias in node.names:
                candidate = f"{stem}.{alias.name}"
                targets.append(candidate if candidate in known_modules else stem)
        rel = str(path.relative_to(ROOT))
        found.extend(Import(rel, node.lineno, module, t) for t in dict.fromkeys(targets))
    return found


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def part_of(name: str, parts: dict) -> str | None:
    """The part whose module prefix is the longest one ``name`` falls under."""
    best, best_len = None, -1
    for part, spec in parts.items():
        for prefix in spec["modules"]:
            if _under(name, prefix) and len(prefix) > best_len:
                best, best_len = part, len(prefix)
    if best is None and name == "scale_ssl":  # `import scale_ssl` / `from scale_ssl import X`
        return "package"
    return best


def violations(imports: list[Import], house: dict) -> list[str]:
    parts, nevers = house["parts"], house.get("never", [])
    problems = []
    for imp in imports:
        for rule in nevers:
            if any(_under(imp.source_module, f) for f in rule["from"]) and any(_under(imp.target, t) for t in rule["to"]):
                problems.append(f"{imp.path}:{imp.line}: imports {imp.target}: never: {rule['why']}")
        if not _under(imp.target, "scale_ssl"):
            continue
        source_part, target_part = part_of(imp.source_module, parts), part_of(imp.target, parts)
        if source_part is None:
            problems.append(f"{imp.path}: module {imp.source_module} belongs to no part of docs/parts.toml; add it to one")
            continue
        if target_part is None:
            problems.append(f"{imp.path}:{imp.line}: imports {imp.target}, which belongs to no part of docs/parts.toml")
        elif target_part != source_part and target_part not in parts[source_part]["may_import"]:
            problems.append(
                f"{imp.path}:{imp.line}: imports {imp.target}: part {source_part!r} may not import part "
                f"{target_part!r} (it may import {parts[source_part]['may_import']}; docs/parts.toml)"
            )
    return problems


def load_house() -> dict:
    with open(PARTS_FILE, "rb") as f:
        return tomllib.load(f)


def package_imports() -> list[Import]:
    files = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(p) for p in files}
    out = []
    for path in files:
        out.extend(imports_of(path, path.read_text(), module_name(path), known))
    return out


def test_the_parts_file_is_consistent():
    house = load_house()
    parts = house["parts"]
    for name, spec in parts.items():
        unknown = set(spec["may_import"]) - set(parts)
        assert not unknown, f"part {name!r} may import unknown parts {sorted(unknown)}"
        assert name not in spec["may_import"], f"part {name!r} lists itself"
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    placed = {m.split(".")[1] for spec in parts.values() for m in spec["modules"] if m.count(".") >= 1}
    assert folders <= placed, f"folders of scale_ssl that are no part of docs/parts.toml: {sorted(folders - placed)}"
    for rule in house["never"]:
        assert rule["from"] and rule["to"] and rule["why"], rule


def test_every_module_belongs_to_a_part():
    parts = load_house()["parts"]
    orphans = sorted({m for m in (module_name(p) for p in PACKAGE.rglob("*.py")) if part_of(m, parts) is None})
    assert not orphans, f"modules in no part of docs/parts.toml: {orphans}"


def test_no_import_breaks_the_house():
    imports = package_imports()
    assert len(imports) > 300, "the import scan found too little: is it reading the package?"
    problems = violations(imports, load_house())
    assert not problems, "imports that break docs/parts.toml:\n" + "\n".join(problems)


@pytest.mark.parametrize("where, source, rule", [
    # a backend imported inside a function of the loop: found, with its file and line
    ("scale_ssl/trainer/fit_loop.py", "import os\n\ndef f():\n    from scale_ssl.strategies.ddp import DDPStrategy\n",
     "fit_loop.py:4: imports scale_ssl.strategies.ddp: never: the loop never imports a backend"),
    # a relative import resolves to the part it names
    ("scale_ssl/methods/simclr.py", "from ..eval import knn\n", "imports scale_ssl.eval.knn: never: methods never import eval"),
    ("scale_ssl/data/stream.py", "import torch.distributed as dist\n", "never: data never asks torch.distributed"),
    ("scale_ssl/checkpoint/reader.py", "from scale_ssl.strategies import deepspeed\n",
     "imports scale_ssl.strategies.deepspeed: never: the checkpoint format never imports"),
    # an arrow no part allows (losses -> optim), without a never-rule
    ("scale_ssl/losses/nt_xent.py", "from scale_ssl.optim import LARS\n", "part 'losses' may not import part 'optim'"),
])
def test_a_forbidden_import_is_reported(where, source, rule):
    path = ROOT / where
    known = {module_name(p) for p in PACKAGE.rglob("*.py")}
    problems = violations(imports_of(path, source, module_name(path), known), load_house())
    assert any(rule in p for p in problems), problems
