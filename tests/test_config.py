"""Typed configs: YAML plus command-line overrides, errors naming the file and key, resolved config saved."""

from pathlib import Path

import pytest
import yaml

from mmalign.config import ConfigError, parse_config, save_config
from mmalign.diffusion.dpo import Config


def test_yaml_then_flags_override(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump({"model": "m", "data": "d", "output": "o", "beta": 100, "max_steps": 7}))
    config = parse_config(Config, ["--config", str(cfg_file), "--beta", "2500", "--full"], prog="t")
    assert config.beta == 2500.0 and config.max_steps == 7 and config.full is True
    assert config.output == Path("o") and config.lora_rank == 8
    save_config(config, tmp_path / "resolved.yaml")
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text())["beta"] == 2500.0


def test_unknown_key_names_the_file(tmp_path):
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text("model: m\nbetta: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key\(s\) betta"):
        parse_config(Config, ["--config", str(cfg_file)], prog="t")


def test_ill_typed_value_names_key(tmp_path):
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text("model: m\ndata: d\noutput: o\nmax_steps: many\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: key 'max_steps': 'many'"):
        parse_config(Config, ["--config", str(cfg_file)], prog="t")
    cfg_file.write_text("mixed_precision: fp8\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: key 'mixed_precision': 'fp8' must be one of no, fp16, bf16"):
        parse_config(Config, ["--config", str(cfg_file)], prog="t")


def test_missing_required_and_invalid_values():
    with pytest.raises(ConfigError, match="--model"):
        parse_config(Config, ["--data", "d", "--output", "o"], prog="t")
    with pytest.raises(ConfigError, match="beta must be positive"):
        parse_config(Config, ["--model", "m", "--data", "d", "--output", "o", "--beta", "-1"], prog="t")
    with pytest.raises(SystemExit):
        parse_config(Config, ["--model", "m", "--loss", "nope"], prog="t")


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(Config, ["--config", "/nonexistent.yaml"], prog="t")
