"""Packaging: every package folder is listed in pyproject.toml, and `import r1v` stays torch-free."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folder_of = {pkg: Path(folder) for pkg, folder in config["package-dir"].items()}
    found = set()
    for pkg, folder in folder_of.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([pkg, *rel.parts]))
    assert found == set(config["packages"])


def test_import_r1v_and_the_gguf_side_do_not_import_torch():
    code = (
        "import sys, r1v, r1v.converters, r1v.converters.inspect, r1v.runtime.image, r1v.runtime.plan, "
        "r1v.registry, r1v.cli, r1v.testing\n"
        "heavy = [m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
