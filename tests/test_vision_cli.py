"""`mmalign vision dpo` end to end on tiny LLaVA: saves a loadable adapter or model, resumes exactly, names bad rows."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from mmalign.cli import main
from mmalign.vision.data import write_rows
from mmalign.vision.world import preference_rows


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory):
    rows = preference_rows(8, seed=0)
    for i, row in enumerate(rows):
        row["retrieved_images"] = rows[(i + 1) % len(rows)]["images"]
    return write_rows(rows, tmp_path_factory.mktemp("rows") / "train.parquet")


def train(tiny_dir, data, output, *flags):
    return main(["vision", "dpo", "--model", str(tiny_dir), "--data", str(data), "--output", str(output),
                 "--batch-size", "2", "--learning-rate", "1e-2", "--report-to", "none", *map(str, flags)])


def metrics(output):
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def test_lora_run_saves_an_adapter_that_reloads(tiny_dir, rows_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = tmp_path / "run"
    assert train(tiny_dir, rows_file, out, "--max-steps", 3, "--visual-term", "retrieved", "--anchor-weight", 1) == 0
    logged = metrics(out)
    assert len(logged) == 3 and {"dpo_loss", "visual_loss", "anchor_loss", "implicit_acc"} <= set(logged[0])
    assert logged[0]["dpo_loss"] == pytest.approx(0.6931, abs=1e-3)  # the LoRA starts at zero
    assert (out / "adapter_config.json").is_file() and (out / "curves.png").is_file()
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_dir), out)
    AutoProcessor.from_pretrained(out)
    trained = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert trained and any(p.abs().sum() > 0 for p in trained)


def test_resume_equals_an_uninterrupted_run(tiny_dir, rows_file, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert train(tiny_dir, rows_file, whole, "--max-steps", 4, "--checkpoint-every", 2) == 0
    assert train(tiny_dir, rows_file, split, "--max-steps", 2, "--checkpoint-every", 2) == 0
    assert train(tiny_dir, rows_file, split, "--max-steps", 4, "--checkpoint-every", 2, "--resume", "latest") == 0
    assert [m["loss"] for m in metrics(split)] == pytest.approx([m["loss"] for m in metrics(whole)], rel=1e-5)
    a = load_file(whole / "checkpoints" / "checkpoint-4" / "trainable.safetensors")
    b = load_file(split / "checkpoints" / "checkpoint-4" / "trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_full_run_with_a_cached_reference(tiny_dir, rows_file, tmp_path):
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "full"
    assert train(tiny_dir, rows_file, out, "--max-steps", 2, "--full", "--reference", "cached", "--loss", "ipo") == 0
    assert (out / "reference_scores.safetensors").is_file()
    assert load_file(out / "reference_scores.safetensors")["scores"].shape == (8, 2)
    reloaded = AutoModelForImageTextToText.from_pretrained(out)
    base = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    changed = [n for (n, p), q in zip(reloaded.named_parameters(), base.parameters()) if not torch.equal(p, q)]
    assert changed and not any("vision_tower" in n or "multi_modal_projector" in n for n in changed)


def test_bad_rows_stop_before_training(tiny_dir, tmp_path, capsys):
    rows = preference_rows(4, seed=0)
    rows[3]["images"] = []
    data = write_rows(rows, tmp_path / "bad.parquet")
    assert train(tiny_dir, data, tmp_path / "run", "--max-steps", 1) == 1
    err = capsys.readouterr().err
    assert "bad.parquet" in err and "record 3, field 'prompt': has 1 <image> placeholder(s) for 0 image(s)" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_model_with_multi_axis_rotary_positions_is_refused(tiny_dir, rows_file, tmp_path, capsys):
    mrope = tmp_path / "mrope"
    shutil.copytree(tiny_dir, mrope)
    config = json.loads((mrope / "config.json").read_text())
    rope = config["text_config"].get("rope_parameters") or {"rope_type": "default", "rope_theta": 10000.0}
    config["text_config"]["rope_parameters"] = {**rope, "mrope_section": [1, 1, 2]}
    (mrope / "config.json").write_text(json.dumps(config))
    assert train(mrope, rows_file, tmp_path / "run", "--max-steps", 1) == 1
    assert "M-RoPE" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("mode", [[], ["--full", "--reference", "cached"]])
def test_two_process_cpu_ddp_run(tiny_dir, rows_file, tmp_path, mode, cpu_launch):
    import os
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    command = [*cpu_launch, "-m", "mmalign", "vision", "dpo", "--model", str(tiny_dir), "--data", str(rows_file),
               "--output", str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "2", "--cpu", "--report-to",
               "none", *mode]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(metrics(tmp_path / "run")) == 2
    state = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2


@pytest.mark.parametrize("objective", ["tdpo", "rrpo"])
def test_token_level_objectives_train_from_the_command_line(tiny_dir, rows_file, tmp_path, objective):
    out = tmp_path / objective
    assert train(tiny_dir, rows_file, out, "--max-steps", 2, "--token-objective", objective) == 0
    logged = metrics(out)
    assert logged[0]["dpo_loss"] == pytest.approx(0.6931, abs=1e-3)
    assert logged[0]["kl_chosen"] == pytest.approx(0, abs=1e-6)
    assert logged[1]["kl_chosen"] > 0


@pytest.mark.parametrize("command", ["dpo", "bdhs", "mia-dpo", "rdpo"])
def test_every_vision_command_prints_its_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        main(["vision", command, "--help"])
    assert done.value.code == 0 and "--model" in capsys.readouterr().out


def test_gradient_checkpointing_gives_the_same_run(tiny_dir, rows_file, tmp_path):
    plain, checkpointed = tmp_path / "plain", tmp_path / "gc"
    assert train(tiny_dir, rows_file, plain, "--max-steps", 3) == 0
    assert train(tiny_dir, rows_file, checkpointed, "--max-steps", 3, "--gradient-checkpointing") == 0
    assert [m["loss"] for m in metrics(checkpointed)] == pytest.approx([m["loss"] for m in metrics(plain)], rel=1e-5)
