"""Every import of the project's own code in benchmarks/, scripts/ and launchers/ still resolves.

These scripts are not imported by the tests, so a function moved out of a module they import from
breaks them silently (benchmarks/checkpoint_size.py kept ``from train import resolve_ds_file`` after
``resolve_ds_file`` moved to vlscale.engine.deepspeed_config, and every row it measured failed).
Ruff's F rules do not follow imports across modules; this test does, statically, with ``ast``:

- ``import X`` / ``from X import a, b`` anywhere in a script (top level or inside a function), where X
  is a vlscale module or a file of benchmarks/ or launchers/ (the scripts put those folders, or the
  repository root for ``benchmarks.X``, on sys.path): X exists and each name is defined in it;
- ``alias.name`` where ``alias`` was bound by such an import of a module: ``name`` is defined in it.

A vlscale module is imported and looked up with ``hasattr`` (or as a submodule); a benchmarks/ or
launchers/ file is parsed, and a name counts as defined if a top-level def, class, assignment or
import binds it (also inside a top-level if/try/with). Third-party imports are not checked.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT_DIRS = ("benchmarks", "scripts", "launchers")
SIBLING_DIRS = ("benchmarks", "launchers")  # folders whose files the scripts import by bare name


def _scripts() -> list[Path]:
    return sorted(p for d in SCRIPT_DIRS for p in (ROOT / d).glob("*.py"))


def _top_level_names(tree: ast.Module) -> set[str]:
    """Names a module's top level binds: def, class, assignment targets, imports (also under if/try/with)."""
    names: set[str] = set()

    def targets(node):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, (ast.Tuple, ast.List)):
            for elt in node.elts:
                targets(elt)
        elif isinstance(node, ast.Starred):
            targets(node.value)

    def visit(body):
        for st in body:
            if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(st.name)
            elif isinstance(st, ast.Assign):
                for t in st.targets:
                    targets(t)
            elif isinstance(st, (ast.AnnAssign, ast.AugAssign)):
                targets(st.target)
            elif isinstance(st, ast.Import):
                names.update(a.asname or a.name.split(".")[0] for a in st.names)
            elif isinstance(st, ast.ImportFrom):
                names.update(a.asname or a.name for a in st.names)
            elif isinstance(st, ast.If):
                visit(st.body)
                visit(st.orelse)
            elif isinstance(st, ast.Try):
                visit(st.body)
                visit(st.orelse)
                visit(st.finalbody)
                for h in st.handlers:
                    visit(h.body)
            elif isinstance(st, (ast.With, ast.For, ast.While)):
                visit(st.body)
    visit(tree.body)
    return names


class _Module:
    """One of the project's modules, as a script imports it: an imported vlscale ``module``, or the ``path`` of a
    file (or folder) of the repository, read without running it."""

    def __init__(self, name: str, *, module=None, path: Path | None = None):
        self.name, self.module, self.path = name, module, path
        self._names = None

    def defines(self, attr: str) -> bool:
        if self.module is not None:
            if hasattr(self.module, attr):
                return True
            return self.submodule(attr) is not None  # a submodule the package has not imported
        if self.path.is_dir():  # a folder imported as a (namespace) package: its files, its __init__'s names
            if (self.path / f"{attr}.py").is_file():
                return True
            init = self.path / "__init__.py"
            return init.is_file() and _Module(f"{self.name}.__init__", path=init).defines(attr)
        if self._names is None:
            self._names = _top_level_names(ast.parse(self.path.read_text(), str(self.path)))
        return attr in self._names

    def submodule(self, attr: str) -> "_Module | None":
        """The module ``from self import attr`` binds, if ``attr`` is one."""
        if self.module is not None:
            found = _import(f"{self.name}.{attr}")
            return found if isinstance(found, _Module) else None
        if self.path.name == "__init__.py" or self.path.is_dir():
            folder = self.path if self.path.is_dir() else self.path.parent
            if (folder / f"{attr}.py").is_file():
                return _Module(f"{self.name}.{attr}", path=folder / f"{attr}.py")
        return None


def _import(dotted: str) -> "_Module | str":
    """The vlscale module ``dotted``, or a message if there is none. A module that exists but imports a missing
    third-party package is an error of the environment, raised as such."""
    try:
        return _Module(dotted, module=importlib.import_module(dotted))
    except ModuleNotFoundError as e:
        parts = dotted.split(".")
        if e.name not in {".".join(parts[:i]) for i in range(1, len(parts) + 1)}:
            raise
        return f"module {dotted!r} not found ({e})"


def _resolve(dotted: str, script: Path) -> "_Module | None | str":
    """The project module ``dotted`` names, seen from ``script``; None if it is third-party; a message if it is
    the project's and does not exist."""
    top = dotted.split(".")[0]
    if top == "vlscale":
        return _import(dotted)
    if top in SCRIPT_DIRS:  # ``from benchmarks import adapter_kernel``: the repository root on sys.path
        parts = dotted.split(".")
        path = ROOT.joinpath(*parts)
        if path.with_suffix(".py").is_file():
            return _Module(dotted, path=path.with_suffix(".py"))
        if path.is_dir():
            return _Module(dotted, path=path)
        return f"module {dotted!r} not found (no {path.relative_to(ROOT)}.py)"
    # A bare name: a file beside the script first, then in the other folder put on sys.path.
    if "." in dotted:
        return None
    folders = [script.parent] + [ROOT / d for d in SIBLING_DIRS if ROOT / d != script.parent]
    for folder in folders:
        if (folder / f"{dotted}.py").is_file():
            return _Module(dotted, path=folder / f"{dotted}.py")
    return None  # third-party


def _problems(script: Path, source: str | None = None) -> list[str]:
    """What in ``script`` (or in ``source``, read as if it were that file) imports something that is not there."""
    rel = script.relative_to(ROOT)
    tree = ast.parse(script.read_text() if source is None else source, str(script))
    problems: list[str] = []
    aliases: dict[str, _Module] = {}  # a name bound to one of the project's modules -> that module

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                mod = _resolve(a.name, script)
                if isinstance(mod, str):
                    problems.append(f"{rel}:{node.lineno}: import {a.name}: {mod}")
                elif mod is not None and a.asname:
                    aliases[a.asname] = mod
                elif mod is not None and "." not in a.name:
                    aliases[a.name] = mod
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mod = _resolve(node.module, script)
            if isinstance(mod, str):
                problems.append(f"{rel}:{node.lineno}: from {node.module} import ...: {mod}")
                continue
            if mod is None:
                continue
            for a in node.names:
                if a.name == "*":
                    continue
                if not mod.defines(a.name):
                    where = mod.path.relative_to(ROOT) if mod.path is not None else mod.name
                    problems.append(f"{rel}:{node.lineno}: from {node.module} import {a.name}: "
                                    f"{a.name!r} is not defined in {where}")
                    continue
                sub = mod.submodule(a.name)
                if sub is not None:
                    aliases[a.asname or a.name] = sub

    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and isinstance(node.ctx, ast.Load)):
            mod = aliases[node.value.id]
            if not mod.defines(node.attr):
                where = mod.path.relative_to(ROOT) if mod.path is not None else mod.name
                problems.append(f"{rel}:{node.lineno}: {node.value.id}.{node.attr}: "
                                f"{node.attr!r} is not defined in {where}")
    return problems


@pytest.mark.parametrize("script", _scripts(), ids=lambda p: str(p.relative_to(ROOT)))
def test_a_scripts_imports_of_the_project_resolve(script):
    problems = _problems(script)
    assert not problems, "\n".join(problems)


def test_the_check_catches_a_name_moved_out_of_a_launcher():
    """The breakage this test exists for (a benchmark importing from launchers/train.py a function that had moved),
    a sibling module's attribute that is not there, and a vlscale submodule that does not exist."""
    source = ("import sys\n"
              "def worker():\n    from train import resolve_ds_file\n    import step_time as st\n"
              "    st.no_such_function()\n    st.parse_args([])\n"
              "    from vlscale.engine.deepspeed_config import resolve_ds_file\n"
              "    from vlscale.engine import no_such_module, trainer\n    import vlscale.no_such\n")
    problems = _problems(ROOT / "benchmarks" / "probe.py", source)
    assert len(problems) == 4, problems
    assert "benchmarks/probe.py:3: from train import resolve_ds_file" in problems[0]
    assert "'resolve_ds_file' is not defined in launchers/train.py" in problems[0]
    assert "from vlscale.engine import no_such_module" in problems[1]
    assert "vlscale.no_such" in problems[2]
    assert "st.no_such_function" in problems[3] and "benchmarks/step_time.py" in problems[3]
