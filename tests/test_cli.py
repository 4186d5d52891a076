"""The command line: bad data and bad configs stop with one clear message; sample writes fixed-seed images."""

import json

import pytest
import torch
from PIL import Image

from mmalign.cli import main
from mmalign.diffusion.data import write_pickapic
from mmalign.diffusion.world import preference_pairs


def run_cli(capsys, *argv):
    code = main(list(map(str, argv)))
    return code, capsys.readouterr().err


def test_bad_data_names_the_record_and_trains_nothing(tiny_sd, tmp_path, capsys):
    rows = preference_pairs(4, seed=1)
    rows[2].update(jpg_0=b"\x89PNG broken", label_0=1.0)  # found when the first batch, every usable pair, loads
    data = write_pickapic(rows, tmp_path / "bad.parquet")
    usable = sum(row["label_0"] != 0.5 for row in rows)
    code, err = run_cli(capsys, "diffusion", "dpo", "--model", tiny_sd, "--data", data, "--output", tmp_path / "run",
                        "--max-steps", 1, "--batch-size", usable, "--report-to", "none")
    assert code == 1
    assert "bad.parquet" in err and "record 2, field 'jpg_0': cannot be read" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_bad_config_and_unknown_pipeline(tiny_sd, pickapic, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("beta: -5\n")
    code, err = run_cli(capsys, "diffusion", "dpo", "--config", cfg, "--model", tiny_sd, "--data", pickapic,
                        "--output", tmp_path / "r")
    assert code == 1 and "beta must be positive" in err

    other = tmp_path / "not-sd"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline",
                                                        "unet": ["diffusers", "UNet2DModel"]}))
    code, err = run_cli(capsys, "diffusion", "dpo", "--model", other, "--data", pickapic, "--output", tmp_path / "r2",
                        "--report-to", "none")
    assert code == 1 and "pipeline class DDPMPipeline is not supported" in err

    code, err = run_cli(capsys, "diffusion", "dpo", "--model", tmp_path / "missing", "--data", pickapic,
                        "--output", tmp_path / "r3", "--report-to", "none")
    assert code == 1 and "missing" in err


def test_unknown_command_lists_commands(capsys):
    assert main(["diffusion", "nope"]) == 2
    assert "mmalign diffusion dpo" in capsys.readouterr().err


def test_sample_writes_fixed_seed_images(tiny_sd, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    args = ["diffusion", "sample", "--model", tiny_sd, "--prompts", prompts, "--num", 3, "--seed", 5, "--steps", 3]
    assert run_cli(capsys, *args, "--output", tmp_path / "a", "--batch-size", 6)[0] == 0
    assert run_cli(capsys, *args, "--output", tmp_path / "b", "--batch-size", 4)[0] == 0
    files = sorted((tmp_path / "a").glob("sample_*.png"))
    assert len(files) == 6 and (tmp_path / "a" / "grid.png").is_file()
    for f in files:
        first, second = Image.open(f), Image.open(tmp_path / "b" / f.name)
        assert (torch.tensor(list(first.getdata())) == torch.tensor(list(second.getdata()))).all()


def test_a_hub_model_that_cannot_be_had_fails_at_once(monkeypatch):
    """Offline (HF_HUB_OFFLINE, set for the tests) and not cached: refused without a request. Online without a network:
    one request, no retries. Cached: no request at all (the libraries read the cache)."""
    import huggingface_hub

    from mmalign.diffusion.models import pipeline_class
    from mmalign.errors import ConfigError
    from mmalign.hub import unreachable

    calls = []

    def no_network(self, repo_id, **kwargs):
        calls.append(repo_id)
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", no_network)
    with pytest.raises(ConfigError, match="--model someone/some-model: no such file or folder here, and the hub "
                                          "model of that name cannot be had: HF_HUB_OFFLINE is set"):
        pipeline_class("someone/some-model")
    assert calls == []
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ConfigError, match=r"the hub cannot be reached \(ConnectionError: Name or service not known\)"):
        pipeline_class("someone/some-model")
    assert calls == ["someone/some-model"]
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo_id, filename, **kwargs: f"/cache/{repo_id}/{filename}")
    assert unreachable("someone/some-model", cached=("model_index.json",)) is None and len(calls) == 1
