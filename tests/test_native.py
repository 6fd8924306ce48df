"""The compiled core (infra/native.py): it gives the pure core's bytes, and it is never stale.

- Equal bytes: the same hostile programs are played once by the compiled core and once by the
  pure one. The digests of everything they decide must be equal.
- Never stale: a build is loaded only under the key of the sources on disk. The key must change
  with any file mypy reads to compile the core, and a cache without that key's build must run
  pure Python.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from infra import native
from infra.settings import PROJECT_ROOT

PROGRAMS = 100
PROJECT_PACKAGES = ("infra", "wallet", "schemas", "streams", "producers", "consumers", "benchmarks", "tests")


def _run(code_or_module: list[str], **env: str) -> str:
    completed = subprocess.run(
        [sys.executable, *code_or_module],
        cwd=PROJECT_ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return completed.stdout


def _source_of(module: str) -> Path:
    path = PROJECT_ROOT / module.replace(".", "/")
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _project_imports(source: Path) -> set[str]:
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text())):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        imported.update(name for name in names if name.split(".")[0] in PROJECT_PACKAGES)
    return imported


def test_what_the_native_modules_import_is_inside_the_keyed_sources() -> None:
    keyed = {PROJECT_ROOT / folder for folder in native.KEYED_SOURCES}
    seen: set[str] = set()
    waiting = list(native.NATIVE_MODULES)
    while waiting:
        module = waiting.pop()
        if module in seen:
            continue
        seen.add(module)
        source = _source_of(module)
        assert source.parent in keyed, f"{module} ({source}) is read to compile the core but not in KEYED_SOURCES"
        waiting.extend(_project_imports(source))
    assert {"schemas.commands", "schemas.events", "streams.core.machine"} <= seen


def test_the_compiled_and_the_pure_core_decide_the_same_bytes() -> None:
    compiled = json.loads(_run(["-m", "tests.support.native_digest", str(PROGRAMS)]))
    if compiled["build"] is None:
        missing = native.toolchain_missing()
        if os.environ.get("CI") and missing is None and native.enabled():
            pytest.fail("CI has gcc and Python's headers but loads no compiled core: `wallet native build` failed")
        pytest.skip(f"no native build here ({missing or 'not built, or WALLET_NATIVE=0'})")
    pure = json.loads(_run(["-m", "tests.support.native_digest", str(PROGRAMS)], WALLET_NATIVE="0"))
    assert pure["build"] is None
    assert compiled["programs"] == pure["programs"] == PROGRAMS
    assert pure["records"] > 10 * PROGRAMS and pure["dead_letters"] > 0  # real histories, attacks refused
    assert compiled == {**pure, "build": compiled["build"]}


def test_every_keyed_source_is_in_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for folder in native.KEYED_SOURCES:
        shutil.copytree(PROJECT_ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(native, "PROJECT_ROOT", tmp_path)
    key = native.build_key()
    monkeypatch.setattr(native, "PROJECT_ROOT", PROJECT_ROOT)
    assert key == native.build_key()  # the copy is the sources: same key
    monkeypatch.setattr(native, "PROJECT_ROOT", tmp_path)
    for folder in native.KEYED_SOURCES:
        for source in sorted((tmp_path / folder).glob("*.py")):
            text = source.read_bytes()
            source.write_bytes(text + b"\n")
            assert native.build_key() != key, f"{source.name} changed, the key did not"
            source.write_bytes(text)
    assert native.build_key() == key


def test_a_cache_without_the_current_build_runs_pure_python(tmp_path: Path) -> None:
    where = _run(
        ["-c", "import streams.core.machine as m, infra.native as n; print(m.__file__, n.active_build())"],
        WALLET_CACHE_DIR=str(tmp_path),
    ).split()
    assert where == [str(PROJECT_ROOT / "streams/core/machine.py"), "None"]
