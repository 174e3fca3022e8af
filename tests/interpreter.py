"""An interpreter another user can execute, for running zeusd really as that user (``user=``).

Ours may sit under a directory only root can enter (pyenv under ``/root``,
mode 0700): then ``nobody`` cannot even start it, and a test of the non-root
behaviour would have to skip or fake the switch. Instead, the first test that
needs it copies the base interpreter (binary, shared library, standard
library) to ``build/shared-python/`` in the repository, readable by everyone,
with one ``.pth`` line that adds this virtual environment's site-packages, so
the copy imports the same zeusd and dependencies. Later runs reuse the copy.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO / "build" / "shared-python"

#: Parts of the standard library no daemon imports: left out of the copy.
_SKIPPED = ("site-packages", "test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3")


def runs_as(user: int, python: str) -> subprocess.CompletedProcess[str]:
    """``python -c 'import zeusd'`` as ``user``, from /."""
    return subprocess.run(
        [python, "-c", "import zeusd"], user=user, cwd="/", capture_output=True, text=True, timeout=60
    )


@functools.cache
def python_for(user: int | None) -> str:
    """The interpreter that runs zeusd as ``user`` (None: as ourselves)."""
    if user is None:
        return sys.executable
    try:
        if runs_as(user, sys.executable).returncode == 0:
            return sys.executable
    except PermissionError:
        pass  # the interpreter itself cannot be executed by that user
    python = shared_copy()
    done = runs_as(user, python)
    if done.returncode != 0:
        raise RuntimeError(f"user {user} cannot run zeusd with {python} either:\n{done.stderr}")
    return python


def shared_copy() -> str:
    """Copy the base interpreter to ``build/shared-python/`` (once) and return its launcher."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    target = SHARED / f"{version}-{sys.hexversion:x}"
    launcher = target / "bin" / "python"
    if (target / ".complete").exists():
        return str(launcher)
    shutil.rmtree(target, ignore_errors=True)
    base = Path(sys.base_prefix)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    (target / "bin").mkdir(parents=True)
    shutil.copy2(Path(sys.executable).resolve(), target / "bin" / version)
    libdir = target / "lib"
    shutil.copytree(stdlib, libdir / version, ignore=shutil.ignore_patterns(*_SKIPPED, "config-*"))
    for shared_lib in (base / "lib").glob("libpython*.so*"):
        shutil.copy2(shared_lib, libdir / shared_lib.name)
    site_packages = libdir / version / "site-packages"
    site_packages.mkdir()
    ours = sysconfig.get_paths()["purelib"]  # this venv's: zeusd (editable) and its dependencies
    (site_packages / "zeusd-tests.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    # The binary may look for its shared library only under the original prefix: point the loader here.
    launcher.write_text(
        "#!/bin/sh\n"
        f'LD_LIBRARY_PATH="{libdir}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}" exec "{target / "bin" / version}" "$@"\n'
    )
    for directory, _, files in os.walk(SHARED):
        os.chmod(directory, 0o755)
        for name in files:
            path = os.path.join(directory, name)
            os.chmod(path, 0o755 if os.access(path, os.X_OK) else 0o644)
    launcher.chmod(0o755)
    (target / ".complete").touch()
    return str(launcher)
