"""The export seam: every target sub-package provides what targets.Target names, and the layers below targets/
(models/, the artifact modules) import nothing from it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from baseq_export import targets
from baseq_export.targets import TARGETS, Target, target

PACKAGE = Path(targets.__file__).resolve().parents[1]


def target_members() -> set[str]:
    """The names a target module must define: Target's attributes and methods."""
    return set(Target.__annotations__) | {n for n, v in vars(Target).items() if callable(v) and not n.startswith("_")}


@pytest.mark.parametrize("name", TARGETS)
def test_every_target_provides_the_protocol(name):
    module = target(name)
    missing = sorted(m for m in target_members() if not hasattr(module, m))
    assert not missing, f"targets/{name}/ lacks {missing}"
    assert module.NAME == name and module.BACKENDS
    for m in target_members() - set(Target.__annotations__):
        assert callable(getattr(module, m)), m


def imported_modules(path: Path) -> set[str]:
    """Absolute names (within baseq_export) of everything a module imports, at any depth of its code."""
    package = ["baseq_export", *path.relative_to(PACKAGE).with_suffix("").parts]
    if package[-1] == "__init__":
        package.pop()
    here = package[:-1] if path.name != "__init__.py" else package
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


@pytest.mark.parametrize("lower", ["models", "artifact.py", "artifact_tensors.py", "reference.py", "tensor_files.py",
                                   "gguf_file.py"])
def test_lower_layers_import_nothing_from_targets(lower):
    files = sorted((PACKAGE / lower).rglob("*.py")) if (PACKAGE / lower).is_dir() else [PACKAGE / lower]
    for f in files:
        upward = sorted(m for m in imported_modules(f) if m == "baseq_export.targets" or m.startswith("baseq_export.targets."))
        assert not upward, f"{f.relative_to(PACKAGE)} imports {upward}"
