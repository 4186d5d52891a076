"""The command line: bad data and bad configs stop with one clear message; sample writes fixed-seed images."""

import json

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
    rows[2]["jpg_0"] = b"\x89PNG broken"
    data = write_pickapic(rows, tmp_path / "bad.parquet")
    code, err = run_cli(capsys, "diffusion", "dpo", "--model", tiny_sd, "--data", data, "--output", tmp_path / "run",
                        "--max-steps", 1, "--report-to", "none")
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
    (other / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"]}))
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
        assert (torch.tensor(list(Image.open(f).getdata())) == torch.tensor(list(Image.open(tmp_path / "b" / f.name).getdata()))).all()
