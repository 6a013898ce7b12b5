"""Packaging: every package folder is listed in pyproject.toml, and `import r1v` stays torch-free."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

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
        "import sys, r1v, r1v.converters, r1v.converters.inspect, r1v.runtime.image, r1v.runtime.files.plan, "
        "r1v.runtime.files.registry, r1v.cli, r1v.testing\n"
        "heavy = [m for m in ('torch', 'transformers', 'safetensors', 'llama_cpp') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# What the wheel must carry besides the modules: the data files the code reads through its package folders.
WHEEL_DATA = ("r1v/models.yaml", "r1v/converters/chat_templates/chatml-think.jinja",
              "r1v/converters/chat_templates/deepseek-r1-think.jinja", "r1v/apps/viewer.html", "r1v/micro/demo.png")


@pytest.mark.slow
def test_the_built_wheel_carries_models_yaml_and_the_registry_reads_it(tmp_path):
    """Build the wheel from a copy of the source tree and run the registry from the unpacked wheel: the
    top-level models.yaml must travel (as r1v/models.yaml) and be the file `load_registry` reads there."""
    import shutil
    import zipfile

    src = tmp_path / "src"
    skip = shutil.ignore_patterns(".git", ".venv", ".whl", "build", "dist", "out", "*.egg-info", "__pycache__",
                                  ".pytest_cache", "tests")
    shutil.copytree(ROOT, src, ignore=skip)
    build = "from setuptools import build_meta; print(build_meta.build_wheel({!r}))".format(str(tmp_path / "dist"))
    done = subprocess.run([sys.executable, "-c", build], cwd=src, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    wheel = tmp_path / "dist" / done.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert set(WHEEL_DATA) <= names, sorted(set(WHEEL_DATA) - names)
        assert z.read("r1v/models.yaml") == (ROOT / "models.yaml").read_bytes()
        assert not any(n.endswith("models.yaml") and n != "r1v/models.yaml" for n in names)
        z.extractall(tmp_path / "site")
    # PYTHONPATH comes before the editable install's finder, so `r1v` is the unpacked wheel's.
    code = (
        "import r1v, r1v.runtime.files.registry as reg\n"
        "from r1v.converters.resources import chat_template\n"
        f"assert r1v.__file__.startswith({str(tmp_path / 'site')!r}), r1v.__file__\n"
        f"assert reg.MODELS_YAML == __import__('pathlib').Path({str(tmp_path / 'site' / 'r1v' / 'models.yaml')!r})\n"
        "assert 'skywork-r1v3-38b' in reg.load_registry() and chat_template('chatml-think')\n"
    )
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path / "site")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path)  # not the checkout
