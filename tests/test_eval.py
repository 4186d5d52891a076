"""`mmalign eval`: the paired win rate and its bootstrap CI by hand, prompt sets, an end-to-end run on the tiny model
(base, the same pipeline again, a LoRA folder and the same LoRA as a run checkpoint), and bad input."""

import hashlib
import json
import math

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mmalign.cli import main
from mmalign.diffusion.eval.prompts import read_prompt_set
from mmalign.errors import DataError
from mmalign.stats import win_rate


def exact_bootstrap_quantiles(wins, q):
    """Quantiles of the bootstrap distribution of mean(wins) by hand: the sum of n draws from the empirical law."""
    n = len(wins)
    values, counts = np.unique(np.asarray(wins) * 2, return_counts=True)  # half-points as integers
    law = np.zeros(int(values.max()) + 1)
    law[values.astype(int)] = counts / n
    total = np.array([1.0])
    for _ in range(n):
        total = np.convolve(total, law)
    cdf = np.cumsum(total)
    return [np.searchsorted(cdf, p) / (2 * n) for p in q]


def test_paired_win_rate_counts_ties_half_and_its_bootstrap_ci_matches_the_exact_one():
    model = [3.0, 1.0, 2.0, 2.0, 5.0, 0.0, 4.0, 1.0]
    base = [1.0, 2.0, 2.0, 0.0, 4.0, 1.0, 4.0, 0.0]
    wins = [1, 0, 0.5, 1, 1, 0, 0.5, 1]
    result = win_rate(model, base, resamples=20000, seed=0)
    assert result["win_rate"] == pytest.approx(sum(wins) / 8) and result["n"] == 8
    low, high = exact_bootstrap_quantiles(wins, [0.025, 0.975])
    assert (result["ci_low"], result["ci_high"]) == (low, high) == (0.3125, 0.875)
    assert win_rate(model, model) == {"win_rate": 0.5, "ci_low": 0.5, "ci_high": 0.5, "n": 8}
    assert win_rate(model, base, seed=1)["ci_low"] <= result["win_rate"] <= result["ci_high"]
    with pytest.raises(ValueError, match="two equal-length samples"):
        win_rate([1.0, 2.0], [1.0])


def test_prompt_sets_from_text_csv_and_jsonl(tmp_path):
    (tmp_path / "p.csv").write_text('id,caption\n1,"a red circle"\n2,a blue square\n')
    assert read_prompt_set(tmp_path / "p.csv", "caption") == ["a red circle", "a blue square"]
    with pytest.raises(DataError, match=r"p.csv: no column 'prompt' \(its columns: id, caption\)"):
        read_prompt_set(tmp_path / "p.csv")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a red circle"}\n\n{"text": "x"}\n')
    with pytest.raises(DataError, match=r"p.jsonl: line 3 has no field 'prompt'"):
        read_prompt_set(tmp_path / "p.jsonl")
    (tmp_path / "q.jsonl").write_text('{"prompt": "a red circle"}\n{"prompt": 7}\n')
    with pytest.raises(DataError, match=r"q.jsonl: line 2, field 'prompt': 7 is not a non-empty text"):
        read_prompt_set(tmp_path / "q.jsonl")


@pytest.fixture(scope="module")
def aligned(tiny_sd, tmp_path_factory):
    """A random LoRA on the tiny model: as a LoRA folder, and as checkpoint 1 of a LoRA run (config.yaml beside it)."""
    from safetensors.torch import save_file

    from mmalign.diffusion.models import add_lora, load_pipeline, save_lora

    root = tmp_path_factory.mktemp("aligned")
    pipe = load_pipeline(tiny_sd)
    add_lora(pipe.unet, rank=4)
    torch.manual_seed(0)
    for name, param in pipe.unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    save_lora(pipe, pipe.unet, root / "lora")
    checkpoint = root / "run" / "checkpoints" / "checkpoint-1"
    checkpoint.mkdir(parents=True)
    save_file({n: p.detach().contiguous() for n, p in pipe.unet.named_parameters() if p.requires_grad},
              str(checkpoint / "trainable.safetensors"))
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 1}))
    (root / "run" / "config.yaml").write_text(yaml.safe_dump({"full": False, "lora_rank": 4, "lora_alpha": None}))
    return {"lora": root / "lora", "checkpoint": checkpoint}


@pytest.fixture(scope="module")
def reward_files(tmp_path_factory):
    from mmalign.diffusion.tiny import save_tiny_scorers

    return save_tiny_scorers(tmp_path_factory.mktemp("reward"))


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_eval_end_to_end_through_the_cli(tiny_sd, aligned, reward_files, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"text": p}) + "\n" for p in ["a red circle", "a blue square",
                                                                          "a green triangle"]))
    spec = f"openclip={reward_files['open_clip']},aesthetic={reward_files['aesthetic']}@{reward_files['open_clip']}:0.5"
    out = tmp_path / "eval"
    code = main(["eval", "--base", str(tiny_sd), "--models", f"same={tiny_sd}", f"lora={aligned['lora']}",
                 str(aligned["checkpoint"]), "--prompts", str(prompts), "--prompt-column", "text", "--scorer", spec,
                 "--output", str(out), "--per-prompt", "2", "--steps", "2", "--grid-prompts", "2",
                 "--bootstrap-resamples", "1000"])
    assert code == 0
    result = json.loads((out / "eval.json").read_text())
    assert set(result["summary"]) == {f"openclip={reward_files['open_clip']}",
                                      f"aesthetic={reward_files['aesthetic']}", "weighted"}
    assert list(result["models"]) == ["base", "same", "lora", "checkpoints/checkpoint-1"]
    weighted = result["summary"]["weighted"]
    # the same pipeline on the same seeds draws the same images: every sample a tie, win rate exactly 0.5
    assert weighted["against_base"]["same"]["win_rate"] == {"win_rate": 0.5, "ci_low": 0.5, "ci_high": 0.5, "n": 6}
    assert weighted["against_base"]["same"]["gain"]["mean"] == 0
    # the LoRA folder and the run checkpoint holding the same LoRA score alike; the LoRA changed the images
    lora, checkpoint = (weighted["against_base"][m] for m in ("lora", "checkpoints/checkpoint-1"))
    assert lora["win_rate"]["win_rate"] == checkpoint["win_rate"]["win_rate"]
    assert lora["gain"]["mean"] == pytest.approx(checkpoint["gain"]["mean"], abs=1e-6)
    assert lora["gain"]["mean"] != 0
    row = result["per_prompt"][0]  # the weighted sum is the weighted sum of the terms, prompt by prompt
    terms = [row["mean"][name]["lora"] for name in list(result["summary"])[:2]]
    assert row["mean"]["weighted"]["lora"] == pytest.approx(terms[0] + 0.5 * terms[1], rel=1e-6)
    assert result["reward"]["weights"] == {f"openclip={reward_files['open_clip']}": 1.0,
                                           f"aesthetic={reward_files['aesthetic']}": 0.5}
    # reproducibility: sampler, seeds, resolution and the sha256 of every weight file
    sampler = result["models"]["base"]["sampler"]
    assert sampler["scheduler"] == "DDIMScheduler" and sampler["pipeline"] == "StableDiffusionPipeline"
    assert sampler["scheduler_config"]["num_train_timesteps"] > 0
    assert result["sampling"]["seed"] == 1000 and result["sampling"]["steps"] == 2 and result["sampling"]["height"] > 0
    unet = str(tiny_sd / "unet" / "diffusion_pytorch_model.safetensors")
    assert result["models"]["base"]["files"][unet] == sha256(unet)
    ckpt = str(aligned["checkpoint"] / "trainable.safetensors")
    assert result["models"]["checkpoints/checkpoint-1"]["files"] == {ckpt: sha256(ckpt)}
    assert result["reward"]["files"][str(reward_files["aesthetic"])] == sha256(reward_files["aesthetic"])
    assert len(result["reward"]["files"]) == 2
    table = (out / "eval.md").read_text()
    assert "| model | mean (95% CI) | win rate vs base (95% CI) | gain (95% CI) |" in table
    assert "| `same` |" in table and "0.500 (0.500 .. 0.500)" in table and "ties counting half" in table
    side = result["sampling"]["width"]
    scale = max(1, 128 // side)
    for which in ("best", "worst"):
        grid = Image.open(out / "grids" / f"lora_{which}.png")
        assert grid.size == (4 * side * scale, 2 * side * scale)  # base then model, 2 seeds each; 2 prompts
    assert len(list((out / "samples" / "lora").glob("*.png"))) == 6
    assert len((out / "per_prompt.jsonl").read_text().splitlines()) == 3
    assert math.isfinite(result["summary"]["weighted"]["mean"]["base"]["mean"])


def test_bad_input_is_refused_naming_the_file_and_field(tiny_sd, aligned, refused, tmp_path):
    prompts = tmp_path / "p.csv"
    prompts.write_text("caption\na red circle\n")
    out = tmp_path / "out"
    common = ["eval", "--base", tiny_sd, "--models", aligned["lora"], "--output", out]
    assert f"prompts file {prompts}: no column 'prompt'" in refused(*common, "--prompts", prompts, "--scorer",
                                                                    "openclip=x", output=out)
    assert "term 'pickscor': unknown scorer 'pickscor'" in refused(*common, "--prompts", prompts, "--prompt-column",
                                                                   "caption", "--scorer", "pickscor", output=out)
    assert "term 'pickscore:high': weight 'high' is not a finite number" in refused(
        *common, "--prompts", prompts, "--prompt-column", "caption", "--scorer", "pickscore:high", output=out)
    assert "each model needs a name of its own, not 'base'" in refused(
        "eval", "--base", tiny_sd, "--models", f"base={aligned['lora']}", "--output", out, "--prompts", prompts,
        "--prompt-column", "caption", "--scorer", "pickscore", output=out)
    assert "--models nowhere: no such file or folder" in refused(
        "eval", "--base", tiny_sd, "--models", "nowhere", "--output", out, "--prompts", prompts, "--prompt-column",
        "caption", "--scorer", "pickscore", output=out)
