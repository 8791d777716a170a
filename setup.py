"""Packages and package data (the rest of the metadata is in pyproject.toml).

The repository's `configs/` (presets, stage, pipeline, prepare and sweep configs: the folder users edit) ships
inside the wheel as `medplib/configs`, where `medplib.model.config.configs_dir()` finds it after a plain
`pip install .`; a checkout reads `configs/` itself. The HTTP client `client/medplib_client` is its own
distribution (`pip install ./client`) and ships in this one too, so `from medplib_client import ...` works in both.
"""

from setuptools import find_namespace_packages, setup

setup(
    packages=find_namespace_packages(
        include=["medplib*", "medplib_datasets*", "workflows*", "serve*"], exclude=["*__pycache__"]
    )
    + ["medplib.configs", "medplib_client"],
    package_dir={"medplib.configs": "configs", "medplib_client": "client/medplib_client"},
    package_data={
        "medplib": ["py.typed"],
        "medplib.configs": ["**/*.yaml"],
        "medplib_client": ["py.typed"],
        "serve": [
            "*.yaml",
            "static/*",
        ],  # the serve defaults (config.yaml, config.gpu.yaml) and the demo page
    },
)
