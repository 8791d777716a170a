"""Files inside installed packages, found without importing the packages: Python packages by `find_spec`, Debian
packages by `dpkg -L`. Nothing is downloaded."""

from __future__ import annotations

import functools
import importlib.util
import shutil
import subprocess
from pathlib import Path


def package_dir(name: str) -> Path | None:
    """The folder of an installed Python package, found without importing it (None when not installed)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@functools.cache
def _deb_listing(package: str) -> tuple[str, ...]:
    if shutil.which("dpkg") is None:
        return ()
    result = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=False)
    return tuple(result.stdout.splitlines()) if result.returncode == 0 else ()


def deb_file(package: str, file_name: str) -> Path | None:
    """A file installed by a Debian package, found with `dpkg -L` (None when the package is absent)."""
    for line in _deb_listing(package):
        if line.endswith("/" + file_name) and Path(line).is_file():
            return Path(line)
    return None
