"""Packaging guards: the modality folders install as mmalign.* only, and the README's commands are the real ones."""

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
MODALITIES = {"diffusion": "mmalign.diffusion", "vision": "mmalign.vision", "robotics": "mmalign.robotics"}


def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_modality_folders_are_linked_into_the_package():
    """mmalign/<modality> is a relative symlink to the top-level folder, found by setuptools' package discovery."""
    for folder in MODALITIES:
        link = ROOT / "mmalign" / folder
        assert link.is_symlink() and link.readlink() == Path("..") / folder, link
    assert pyproject()["tool"]["setuptools"]["packages"]["find"]["include"] == ["mmalign*"]


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
    assert "--import-mode=importlib" in pyproject()["tool"]["pytest"]["ini_options"]["addopts"]


def test_wheel_holds_modalities_under_mmalign_only(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("mmalign-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "mmalign/diffusion/dpo.py" in names and "mmalign/objectives.py" in names
    assert "mmalign/vision/builders/__init__.py" in names and "mmalign/robotics/__init__.py" in names
    assert "mmalign/accelerate_configs/fsdp.yaml" in names  # the launch configs the README names
    assert not [n for n in names if n.split("/")[0] in MODALITIES]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"```bash\n(pip install [^\n]+)\n```", readme)
    assert len(commands) == 2 and "mmalign demo" in commands[0]
    assert commands[1] in ci.splitlines()
    assert '-m "not long"' in commands[1] and any(line.endswith("-m long") for line in ci.splitlines())


def test_console_script_and_module_entry_points():
    assert pyproject()["project"]["scripts"]["mmalign"] == "mmalign.cli:main"
    result = subprocess.run([sys.executable, "-m", "mmalign", "--help"], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0 and "mmalign diffusion dpo" in result.stdout
