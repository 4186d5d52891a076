"""`mmalign reward ...` from the command line: score, relabel, pairs and train, and their errors on bad input."""

import json
from pathlib import Path

import datasets
import pytest
import torch

from mmalign.cli import main
from mmalign.diffusion.data import PreferencePairs
from mmalign.diffusion.rewards import load_scorer, save_scorer
from mmalign.diffusion.rewards.relabel import ai_feedback_labels
from mmalign.diffusion.world import render

ARCH = Path(__file__).resolve().parents[1] / "assets" / "tiny-clip.json"


@pytest.fixture(scope="module")
def scorer_dir(tmp_path_factory):
    torch.manual_seed(1)
    return save_scorer(load_scorer(ARCH), tmp_path_factory.mktemp("scorer") / "tiny")


def run_cli(capsys, *argv):
    code = main(list(map(str, argv)))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_score_images_and_errors_naming_the_file(scorer_dir, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, x in enumerate((6, 16, 26)):
        render("a red circle", x, 16, 5).save(folder / f"{i}.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    code, out, err = run_cli(capsys, "reward", "score", "--scorer", scorer_dir, "--images", folder,
                             "--prompts", prompts, "--output", tmp_path / "scores.jsonl")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert [Path(r["image"]).name for r in rows] == ["0.png", "1.png", "2.png"] and "3 images, mean score" in out
    images = [render("a red circle", x, 16, 5) for x in (6, 16, 26)]
    expected = load_scorer(scorer_dir).score(images, ["a red circle"] * 3)
    torch.testing.assert_close(torch.tensor([r["score"] for r in rows]), expected)

    prompts.write_text("a red circle\na blue square\n")
    code, _, err = run_cli(capsys, "reward", "score", "--scorer", scorer_dir, "--images", folder, "--prompts", prompts)
    assert code == 1 and "has 2 prompts for 3 images" in err
    (folder / "3.png").write_bytes(b"\x89PNG not really")
    prompts.write_text("a red circle\n")
    code, _, err = run_cli(capsys, "reward", "score", "--scorer", scorer_dir, "--images", folder, "--prompts", prompts)
    assert code == 1 and "3.png cannot be read" in err
    code, _, err = run_cli(capsys, "reward", "score", "--scorer", scorer_dir, "--images", folder, "--prompts", prompts,
                           "--output", tmp_path / "scores.jsonl")
    assert code == 1 and "already exists" in err


def test_relabel_writes_a_new_dataset_and_reports_agreement(scorer_dir, pickapic, tmp_path, capsys):
    before = Path(pickapic).read_bytes()
    code, out, err = run_cli(capsys, "reward", "relabel", "--scorer", scorer_dir, "--data", pickapic,
                             "--output", tmp_path / "ai", "--batch-size", 7)
    assert code == 0, err
    assert Path(pickapic).read_bytes() == before, "the source dataset is never touched"
    new = datasets.Dataset.from_parquet(str(tmp_path / "ai" / "pairs.parquet"))
    old = datasets.Dataset.from_parquet(str(pickapic))
    assert new["jpg_0"] == old["jpg_0"] and new["label_0_original"] == old["label_0"]
    expected = ai_feedback_labels(torch.tensor(new["score_0"]), torch.tensor(new["score_1"]))
    assert new["label_0"] == expected.tolist()
    report = json.loads((tmp_path / "ai" / "report.json").read_text())
    agreement = report["agreement_with_original"]
    decided = [(a > b) == (y == 1) for a, b, y in zip(new["score_0"], new["score_1"], old["label_0"]) if y != 0.5]
    assert agreement["accuracy"] == pytest.approx(sum(decided) / len(decided))
    assert report["changed"] == sum(a != b for a, b in zip(new["label_0"], old["label_0"]))
    assert "agreement with the original labels: accuracy" in out
    assert len(PreferencePairs(tmp_path / "ai", resolution=32)) == len(new)  # trainable as it is

    code, _, err = run_cli(capsys, "reward", "relabel", "--scorer", scorer_dir, "--data", pickapic,
                           "--output", tmp_path / "ai")
    assert code == 1 and "is not empty" in err


def test_relabel_embeds_images_given_as_paths(scorer_dir, tmp_path, capsys):
    render("a red circle", 8, 16, 6).save(tmp_path / "left.png")
    render("a red circle", 24, 16, 6).save(tmp_path / "right.png")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"caption": "a red circle", "jpg_0": "left.png",
                                                      "jpg_1": "right.png", "label_0": 1}) + "\n")
    code, _, err = run_cli(capsys, "reward", "relabel", "--scorer", scorer_dir, "--data", tmp_path / "pairs.jsonl",
                           "--output", tmp_path / "out")
    assert code == 0, err
    new = datasets.Dataset.from_parquet(str(tmp_path / "out" / "pairs.parquet"))
    assert new["jpg_0"][0] == (tmp_path / "left.png").read_bytes()


def test_pairs_from_a_pipeline_train_diffusion_dpo_directly(tiny_sd, scorer_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    args = ["reward", "pairs", "--model", tiny_sd, "--scorer", scorer_dir, "--prompts", prompts, "--steps", 2,
            "--num-per-prompt", 3, "--batch-size", 6, "--strategy", "margin"]
    code, out, err = run_cli(capsys, *args, "--output", tmp_path / "pairs")
    assert code == 0, err
    rows = datasets.Dataset.from_parquet(str(tmp_path / "pairs" / "pairs.parquet"))
    report = json.loads((tmp_path / "pairs" / "report.json").read_text())
    assert len(rows) == report["pairs"] and 0 < len(rows) <= 9 and set(rows["label_0"]) == {1.0}
    assert all(a > b for a, b in zip(rows["score_0"], rows["score_1"]))
    assert report["samples"] == 9 and report["images_per_second"]["score"] > 0
    assert (tmp_path / "pairs" / "ranked.png").is_file()

    code, _, err = run_cli(capsys, *args, "--output", tmp_path / "pairs")
    assert code == 1 and "is not empty" in err
    code, _, err = run_cli(capsys, *args, "--output", tmp_path / "none", "--margin", 1e6)
    assert code == 1 and "no pair passed the filters" in err

    code, _, err = run_cli(capsys, "diffusion", "dpo", "--model", tiny_sd, "--data", tmp_path / "pairs",
                           "--output", tmp_path / "dpo", "--max-steps", 1, "--batch-size", 1, "--num-samples", 0,
                           "--report-to", "none")
    assert code == 0, err
    assert (tmp_path / "dpo" / "pytorch_lora_weights.safetensors").is_file()


def test_train_writes_a_scorer_folder_that_loads_back(pickapic, tmp_path, capsys):
    run = tmp_path / "rm"
    code, out, err = run_cli(capsys, "reward", "train", "--scorer", ARCH, "--data", pickapic, "--output", run,
                             "--max-steps", 2, "--batch-size", 4, "--eval-fraction", 0.25, "--learning-rate", 1e-3,
                             "--report-to", "none", "--kind", "aesthetic", "--tune", "head")
    assert code == 0, err
    result = json.loads((run / "eval.json").read_text())
    assert result["before"]["pairs"] == 6 and "held-out after:" in out
    scorer = load_scorer(run)
    assert scorer.kind == "aesthetic" and (run / "checkpoints" / "checkpoint-2").is_dir()
    assert len(json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])) > 0

    code, _, err = run_cli(capsys, "reward", "train", "--scorer", ARCH, "--data", pickapic, "--output", tmp_path / "x",
                           "--tune", "head", "--report-to", "none")
    assert code == 1 and "--tune head trains an aesthetic head" in err
    code, _, err = run_cli(capsys, "reward", "score", "--scorer", ARCH,
                           "--pretrained", run / "aesthetic_head.safetensors", "--data", pickapic)
    assert code == 1 and "does not match the open_clip architecture" in err
