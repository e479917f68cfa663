"""Project hygiene that a test can keep true: imports, dependencies, citations, and the README's option tables in step
with the registries."""

from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import implicit
from implicit.options import OPTION_NAMES

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "implicit"
README = (ROOT / "README.md").read_text()


def _imports(path: Path) -> set[str]:
    """Every module a source file imports (absolute names; ``from . import x`` as ``.x``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_importing_the_package_does_not_import_torchdiffeq_and_the_ode_solver_does():
    script = (
        "import sys, torch, implicit\n"
        "assert 'torchdiffeq' not in sys.modules, 'imported eagerly'\n"
        "implicit.solve(lambda z: 0.5 * z, torch.ones(1, 2), solver='ode', max_iter=50)\n"
        "assert 'torchdiffeq' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_torch_private_pytree_is_imported_only_by_implicit_pytree():
    importers = sorted(
        str(path.relative_to(ROOT))
        for path in PACKAGE.rglob("*.py")
        if {"torch.utils._pytree"} & _imports(path) or "torch.utils._pytree" in path.read_text()
    )
    assert importers == ["implicit/pytree.py"]


def test_the_engine_imports_no_model_family():
    families = ("torchvision", "timm", "transformers")
    for path in PACKAGE.rglob("*.py"):
        assert not any(name.split(".")[0] in families for name in _imports(path)), path


@pytest.mark.parametrize("folder", ["implicit", "tests", "benchmarks"])
def test_sources_cite_papers_not_notes_outside_the_repository(folder):
    # whole words: a module attribute that starts with "md" is no notes file
    pattern = re.compile(r"\b(algorithms|peers|adapters|style)\.md\b|shared/reference")
    files = [*(ROOT / folder).rglob("*.py"), *(ROOT / folder).rglob("*.md")]
    offenders = [
        f"{path.relative_to(ROOT)}:{i}"
        for path in files
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line) and path.name != "test_hygiene.py"
    ]
    assert not offenders


def test_every_runtime_dependency_is_used():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    used = set().union(
        *(
            _imports(path)
            for path in [
                *PACKAGE.rglob("*.py"),
                *(ROOT / "adapters").rglob("*.py"),
                *(ROOT / "integrations").rglob("*.py"),
            ]
        )
    )
    for requirement in project["dependencies"]:
        name = re.split(r"[<>=!~ \[]", requirement, maxsplit=1)[0]
        assert any(module.split(".")[0] == name for module in used), f"{name} is listed but never imported"


def _options_table() -> dict[str, str]:
    """``{option: row}`` of the README's options table (a row may name several options)."""
    section = README.split("## Options", 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            first = line.split("|")[1]
            for name in re.findall(r"`([a-z_]+)`", first):
                rows[name] = line
    return rows


def test_the_readme_options_table_lists_every_option():
    assert set(_options_table()) == set(OPTION_NAMES)


def _defaults(cls: type) -> dict[str, object]:
    parameters = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}


@pytest.mark.parametrize(
    ("registry", "rows"),
    [
        (implicit.SOLVERS, ("solver_options", "backward_solver_options")),
        (implicit.BACKWARD_MODES, ("backward_options",)),
    ],
    ids=["solvers", "backward modes"],
)
def test_the_readme_gives_every_registered_components_options_and_defaults(registry, rows):
    table = _options_table()
    text = " ".join(table[row] for row in rows)
    for name, cls in registry.items():
        for option, default in _defaults(cls).items():
            described = re.search(rf"{name}[^;|]*?`{option}` \(([^)]*)\)", text)
            assert described, f"{name}: option {option} missing from the README's {rows} row"
            if default is None:  # derived from other options; the text says from which
                continue
            numbers = [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", described.group(1))]
            given = default in numbers if isinstance(default, (int, float)) else f'"{default}"' in described.group(1)
            assert given, f"{name}: the default of {option} ({default!r}) is not in the README: {described.group(1)}"


def test_every_mutant_of_the_mutation_script_applies_to_the_current_code():
    """``python -m benchmarks.mutation`` rewrites one exact text per mutant; a refactor that changes that text makes
    the mutant unusable (the script refuses to run it), and the measured strength of the suite silently shrinks.
    Every target must occur exactly once in the current sources. (This test lives outside the mutants' test files:
    in a mutated copy the target is gone by design.)"""
    from benchmarks.mutation import MUTANTS, check_targets

    check_targets(ROOT, MUTANTS)  # UsageError naming each stale mutant
