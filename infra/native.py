"""The core, compiled: mypyc turns the pure modules below into C extensions, and an import hook
loads them in place of their .py files, but only a build made from exactly the sources on disk.

Why: one processor spends most of its time in the core's Python (the profile in docs/capacity.md).
The compiled core is the same code and gives the same bytes; tests/test_native.py compares the
two on a run of random and hostile commands.

How it stays safe:
- A build lives in `<cache dir>/native/<key>/`. Its key hashes every .py file that mypy reads to
  compile the modules (`KEYED_SOURCES`), plus mypy's version and the interpreter.
- `activate` computes the key from the files on disk and installs the hook only when that key's
  build is complete. An edited source therefore runs as Python until `build` runs again; a stale
  extension never shadows it.
- Without a C compiler or Python's headers, `build` says so and everything runs as pure Python.
  The same happens when WALLET_NATIVE=0 is set.

`./dev` runs `wallet native build` (a no-op when the build is current). The build writes
a .pth file into the virtualenv, so every interpreter of the venv activates the hook at start-up,
the processes the stack spawns included.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import sys
import sysconfig
import time
from pathlib import Path
from typing import TYPE_CHECKING

from infra.settings import PROJECT_ROOT, Settings

if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType

NATIVE_MODULES = (
    "streams.core.currencies",
    "streams.core.errors",
    "streams.core.money",
    "streams.core.state",
    "streams.core.machine",
    "streams.core.admission",
    "schemas.codec",
    "schemas.leg_auth",
)
# Every project file mypy reads to compile NATIVE_MODULES (their imports stay inside these
# folders; tests/test_native.py checks it): a change to any of them changes the build's key.
KEYED_SOURCES = ("schemas", "streams/core")
GROUP_NAME = "streamwallet_native"  # the shared library: streamwallet_native__mypyc
COMPLETE_MARKER = "complete"
ENABLED_ENV = "WALLET_NATIVE"
PTH_FILE = "streamwallet_native.pth"
BUILDS_KEPT = 3  # older builds are removed; a running process keeps the files it mapped


def enabled() -> bool:
    return os.environ.get(ENABLED_ENV, "1") != "0"


def build_key() -> str:
    digest = hashlib.sha256()
    # The compiler's version decides the C code. Its version.py is read, not imported: importing
    # mypy would cost every interpreter start 10 ms.
    mypy_spec = importlib.util.find_spec("mypy")
    if mypy_spec is None or not mypy_spec.submodule_search_locations:
        raise ImportError("mypy (which carries mypyc) is not installed")
    digest.update((Path(next(iter(mypy_spec.submodule_search_locations))) / "version.py").read_bytes())
    for part in (sys.version, sysconfig.get_config_var("EXT_SUFFIX") or ""):
        digest.update(part.encode() + b"\0")
    digest.update(Path(__file__).read_bytes())  # the recipe itself
    for folder in KEYED_SOURCES:
        for source in sorted((PROJECT_ROOT / folder).glob("*.py")):
            digest.update(source.relative_to(PROJECT_ROOT).as_posix().encode() + b"\0")
            digest.update(source.read_bytes() + b"\0")
    return digest.hexdigest()[:32]


def builds_dir() -> Path:
    return Settings().cache_dir / "native"


class _NativeFinder:  # a meta path finder (importlib.abc.MetaPathFinder's protocol)
    """Serves NATIVE_MODULES and the shared library from one complete build."""

    def __init__(self, root: Path) -> None:
        self.root = root
        suffix = sysconfig.get_config_var("EXT_SUFFIX")
        self._files = {name: root / (name.replace(".", "/") + suffix) for name in NATIVE_MODULES}
        self._files[f"{GROUP_NAME}__mypyc"] = root / f"{GROUP_NAME}__mypyc{suffix}"

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        file = self._files.get(fullname)
        if file is None:
            return None
        loader = importlib.machinery.ExtensionFileLoader(fullname, str(file))
        return importlib.util.spec_from_file_location(fullname, file, loader=loader)


def active_build() -> Path | None:
    """The build the hook loads in this interpreter, None when it runs pure Python."""
    for finder in sys.meta_path:
        if isinstance(finder, _NativeFinder):
            return finder.root
    return None


def core_description() -> str:
    """'compiled (mypyc, build <key>)' or 'pure Python': what this interpreter runs the core as."""
    root = active_build()
    return f"compiled (mypyc, build {root.name})" if root else "pure Python"


def activate() -> None:
    """Installs the hook when the current sources have a complete build (called from the .pth)."""
    if not enabled() or active_build() is not None:
        return
    try:
        root = builds_dir() / build_key()
    except ImportError:  # mypy is not installed: nothing was built
        return
    if (root / COMPLETE_MARKER).exists():
        sys.meta_path.insert(0, _NativeFinder(root))


def toolchain_missing() -> str | None:
    import shutil

    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        return f"no C compiler ({compiler})"
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not headers.exists():
        return f"no Python headers ({headers}; on Debian: apt-get install python3-dev)"
    return None


def _write_pth() -> None:
    pth = Path(sysconfig.get_paths()["purelib"]) / PTH_FILE
    line = "import infra.native; infra.native.activate()\n"
    if not pth.exists() or pth.read_text() != line:
        pth.write_text(line)


def build() -> int:
    """Builds the current sources' extensions unless that build exists. Returns 0 also when it
    falls back to pure Python: a machine that cannot compile still runs everything."""
    if not enabled():
        print(f"native core: {ENABLED_ENV}=0, running pure Python", file=sys.stderr)
        return 0
    try:
        _build()
    except (Exception, SystemExit) as error:  # mypyc exits on a type error; gcc fails with CompileError
        print(f"native core: the build failed ({error!r}); running pure Python (slower, same results)", file=sys.stderr)
    return 0


def _build() -> None:
    _write_pth()
    key = build_key()
    target = builds_dir() / key
    if (target / COMPLETE_MARKER).exists():
        return
    missing = toolchain_missing()
    if missing:
        print(f"native core: {missing}; running pure Python (slower, same results)", file=sys.stderr)
        return
    # Imported here: activate() runs at every interpreter start and must stay light.
    import tempfile

    from mypyc.build import mypycify
    from setuptools import Distribution

    started_s = time.monotonic()
    print(
        f"native core: compiling {len(NATIVE_MODULES)} modules with mypyc (once per change of the core)…",
        file=sys.stderr,
    )
    builds_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=builds_dir(), prefix=".building-") as work:
        out = Path(work) / "out"
        sources = [str(PROJECT_ROOT / (name.replace(".", "/") + ".py")) for name in NATIVE_MODULES]
        cwd = os.getcwd()
        os.chdir(PROJECT_ROOT)  # mypy reads pyproject.toml's settings and resolves imports from here
        try:
            extensions = mypycify(sources, opt_level="3", group_name=GROUP_NAME, target_dir=str(Path(work) / "c"))
            distribution = Distribution({"name": GROUP_NAME, "ext_modules": extensions})
            distribution.script_args = [
                "-q",
                "build_ext",
                "--build-lib",
                str(out),
                "--build-temp",
                str(Path(work) / "o"),
            ]
            distribution.parse_command_line()
            distribution.run_commands()
        finally:
            os.chdir(cwd)
        (out / COMPLETE_MARKER).write_text(key + "\n")
        try:
            out.rename(target)
        except OSError:  # another build of the same key finished first: it is the same build
            if not (target / COMPLETE_MARKER).exists():
                raise
    _prune(keep=target)
    print(f"native core: built in {time.monotonic() - started_s:.1f} s into {target}", file=sys.stderr)


def _prune(keep: Path) -> None:
    import shutil

    builds = sorted(
        (path for path in builds_dir().iterdir() if path.is_dir() and not path.name.startswith(".")),
        key=lambda path: path.stat().st_mtime,
    )
    for old in [path for path in builds if path != keep][: max(0, len(builds) - BUILDS_KEPT)]:
        shutil.rmtree(old, ignore_errors=True)


def _status(_args: argparse.Namespace) -> int:
    root = active_build()
    print(f"core: compiled, loaded from {root}" if root else "core: pure Python (no current build, or WALLET_NATIVE=0)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    native = subparsers.add_parser(
        "native", help="the compiled core (mypyc): build it for the current sources, or say which one runs"
    )
    actions = native.add_subparsers(dest="native_command", metavar="ACTION", required=True)
    actions.add_parser(
        "build", help="compile the core unless a build of the current sources exists (./dev runs it)"
    ).set_defaults(handler=lambda _args: build())
    actions.add_parser(
        "status", help="print the build this interpreter loads, or that it runs pure Python"
    ).set_defaults(handler=_status)
