"""Packaging guards: the modality folders install as mmalign.* only, and the README's commands are the real ones."""

import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODALITIES = {"diffusion": "mmalign.diffusion", "vision": "mmalign.vision", "robotics": "mmalign.robotics"}


def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def package_folders():
    """Every folder holding an __init__.py under the core and modality folders, as its installed package name."""
    found = set()
    for folder, package in {"mmalign": "mmalign", **MODALITIES}.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([package, *rel.parts]))
    return found


def test_every_package_folder_is_listed_and_mapped():
    tool = pyproject()["tool"]["setuptools"]
    assert set(tool["packages"]) == package_folders()
    for folder, package in MODALITIES.items():
        assert tool["package-dir"][package] == folder


def test_no_generic_top_level_names_and_lazy_core():
    neutral = dict(cwd="/", capture_output=True, text=True)
    for name in MODALITIES:
        result = subprocess.run([sys.executable, "-c", f"import {name}"], **neutral)
        assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr, name
    probe = "import sys, mmalign; print(sorted(m for m in sys.modules if m.startswith('mmalign.')))"
    assert subprocess.run([sys.executable, "-c", probe], **neutral).stdout.strip() == "[]"
    result = subprocess.run([sys.executable, "-c", "import mmalign.diffusion.dpo, mmalign.vision, mmalign.robotics"],
                            **neutral)
    assert result.returncode == 0, result.stderr


def test_layout_guards():
    assert not (ROOT / "tests" / "__init__.py").exists()
    for name in MODALITIES:
        assert not (ROOT / "mmalign" / name).exists(), f"mmalign/{name} would shadow the mapped package"
    assert "--import-mode=importlib" in pyproject()["tool"]["pytest"]["ini_options"]["addopts"]


def test_wheel_holds_modalities_under_mmalign_only(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("mmalign-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "mmalign/diffusion/dpo.py" in names and "mmalign/objectives.py" in names
    assert "mmalign/vision/__init__.py" in names and "mmalign/robotics/__init__.py" in names
    assert not [n for n in names if n.split("/")[0] in MODALITIES]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"```bash\n(pip install [^\n]+)\n```", readme)
    assert len(commands) == 2 and "mmalign demo" in commands[0]
    assert commands[1] in ci.splitlines()


def test_console_script_and_module_entry_points():
    assert pyproject()["project"]["scripts"]["mmalign"] == "mmalign.cli:main"
    result = subprocess.run([sys.executable, "-m", "mmalign", "--help"], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0 and "mmalign diffusion dpo" in result.stdout
