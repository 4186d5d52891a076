"""The robotics commands: registered in the CLI, and the configs shipped in assets/robotics parse into them."""

import importlib
from pathlib import Path

import pytest

from mmalign.cli import COMMANDS
from mmalign.config import parse_config

ASSETS = Path(__file__).parents[1] / "assets" / "robotics"


def test_every_robotics_command_is_registered():
    for name in ("collect", "label", "reward", "pearl", "rapl", "grape", "prefrl"):
        assert COMMANDS[f"robotics {name}"][0] == f"mmalign.robotics.{name}"


@pytest.mark.parametrize("command", ["pearl", "rapl", "grape"])
def test_the_shipped_configs_parse(command, tmp_path):
    module = importlib.import_module(f"mmalign.robotics.{command}")
    config = parse_config(module.Config, ["--config", str(ASSETS / f"{command}.yaml"), "--output", str(tmp_path)],
                          prog=command)
    assert config.output == tmp_path
