"""Held-out evaluation in the training loop (`mmalign.heldout`): its schedule, the best checkpoint, the early-stop
rule, exact resume, and the diffusion trainers' --eval-* options on the tiny SD pipeline."""

import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset, default_collate

from mmalign.cli import main
from mmalign.errors import ConfigError
from mmalign.heldout import Evaluation, HeldOut
from mmalign.state import load_state, save_state
from mmalign.trainer import TrainConfig, Trainer, checkpoints

X = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))
POINTS = TensorDataset(X, X @ torch.tensor([1.0, -2.0, 0.5]) + 0.3)  # a toy regression, y = x . (1, -2, 0.5) + 0.3


def step_fn(model, batch, generator):
    x, y = batch
    return (model(x).squeeze(-1) - y - 0.1 * torch.randn(y.shape, generator=generator)).pow(2).mean(), {}


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def closeness(target):
    """The toy's held-out score h = -(w_0 - target)^2: training moves w_0 from about 0 to 1 (the true coefficient), so h
    rises until w_0 passes `target`, then falls while the training loss still falls."""
    return Evaluation(lambda model: {"closeness": -(model.weight[0, 0].item() - target) ** 2,
                                     "w0": model.weight[0, 0].item()}, "closeness")


def fit(output, evaluation, **overrides):
    settings = dict(output=output, max_steps=6, batch_size=4, learning_rate=0.05, checkpoint_every=0,
                    report_to="none", seed=1, eval_every=2)
    settings.update(overrides)
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    return Trainer(TrainConfig(**settings)).fit(model, POINTS, default_collate, step_fn, evaluation=evaluation)


def test_the_early_stop_rule_by_hand(tmp_path):
    held = HeldOut(closeness(0.0), patience=2)
    assert held.update(0, 1.0) == (True, False)  # the baseline is the first best
    for loss in (5.0, 3.0):
        held.add_loss(loss)
    assert held.update(2, 0.5) == (False, False)  # L_1 = 4; one evaluation without a new best
    held.add_loss(3.0)
    assert held.update(4, 0.4) == (False, True)  # two, and L_2 = 3 < L_max(0, 1) = L_1 = 4: over-optimisation

    def decisions(patience, evaluations):
        held = HeldOut(closeness(0.0), patience)
        out = []
        for step, value, window in evaluations:  # window: the training losses since the last evaluation
            for loss in window:
                held.add_loss(loss)
            out.append(held.update(step, value))
        return held, out

    # the best is evaluation 1 (L_1 = 4); then the loss stalls (4.5, 4.0: mean 4.25 >= 4), then falls (mean 3.83)
    stalled, out = decisions(2, [(0, 0.0, []), (2, 1.0, [4.0]), (4, 0.9, [4.5]), (6, 0.8, [4.0]), (8, 0.7, [3.0])])
    assert out == [(True, False), (True, False), (False, False), (False, False), (False, True)]
    assert stalled.best == {"index": 1, "step": 2, "value": 1.0}
    # one noisy window above L_1 does not decide: the mean since the best, (2 + 5) / 2, is below 4
    _, out = decisions(2, [(0, 0.0, []), (2, 1.0, [4.0]), (4, 0.9, [2.0]), (6, 0.8, [5.0])])
    assert out[-1] == (False, True)

    save_state(stalled.state_dict(), tmp_path, "held_out")
    restored = HeldOut(closeness(0.0), patience=2)
    restored.load_state_dict(load_state(tmp_path, "held_out"))
    assert restored.state_dict() == stalled.state_dict()
    with pytest.raises(ValueError, match="not a finite number"):
        restored.update(10, float("nan"))


def test_schedule_best_checkpoint_and_curve(tmp_path):
    history = fit(tmp_path / "run", closeness(1.0), checkpoint_every=1, keep_checkpoints=1)
    logged = rows(tmp_path / "run")
    assert [r["step"] for r in logged if "eval/closeness" in r] == [0, 2, 4, 6]  # step 0 is the baseline
    assert [r["step"] for r in history] == [0, 1, 2, 3, 4, 5, 6] and "loss" not in logged[0]
    best = json.loads((tmp_path / "run" / "checkpoints" / "best.json").read_text())
    scores = {r["step"]: r["eval/closeness"] for r in logged if "eval/closeness" in r}
    assert best["step"] == max(scores, key=scores.get) and best["value"] == scores[best["step"]]
    assert best["folder"] == f"best-{best['step']}" and best["metric"] == "eval/closeness"
    folders = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert folders == [f"best-{best['step']}", "best.json", "checkpoint-6"]  # keep-last-1 spared the best
    assert (tmp_path / "run" / "held_out.png").is_file()


def test_early_stop_near_the_best_and_resume_decides_the_same(tmp_path):
    history = fit(tmp_path / "full", closeness(0.3), max_steps=30, early_stop_patience=2)
    logged = rows(tmp_path / "full")
    w0 = [r["eval/w0"] for r in logged if "eval/w0" in r]
    assert w0[0] < 0.3 < w0[-1]  # the objective pulls w_0 up, past the held-out optimum 0.3
    best = json.loads((tmp_path / "full" / "checkpoints" / "best.json").read_text())
    # seeded: the best is at step 14 (w_0 = 0.29, its window's loss 2.72); no later evaluation beats it, and the mean
    # loss since step 14 is 3.62, 3.07, 2.80, 2.81 at steps 18 to 24 (noisy batches of 4), then 2.43 < 2.72 at 26
    assert best["step"] == 14 and history[-1]["step"] == 26
    assert [c.name for c in checkpoints(tmp_path / "full")] == ["checkpoint-26"]

    fit(tmp_path / "part", closeness(0.3), max_steps=16, early_stop_patience=2)
    fit(tmp_path / "part", closeness(0.3), max_steps=30, early_stop_patience=2, resume="latest")
    assert rows(tmp_path / "part") == logged
    assert (tmp_path / "part" / "checkpoints" / "best.json").read_text() == \
        (tmp_path / "full" / "checkpoints" / "best.json").read_text()


def test_eval_options_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="--eval-every: this trainer was given nothing held out"):
        fit(tmp_path / "a", None)
    with pytest.raises(ValueError, match="early_stop_patience needs eval_every"):
        TrainConfig(output=tmp_path / "b", early_stop_patience=2)


def test_dpo_logs_the_held_out_reward_every_step(tiny_sd, pickapic, tmp_path, capsys):
    prompts = tmp_path / "held_out.txt"
    prompts.write_text("a red circle\na blue square\n")
    code = main([str(a) for a in (
        "diffusion", "dpo", "--model", tiny_sd, "--data", pickapic, "--output", tmp_path / "run", "--max-steps", 3,
        "--batch-size", 2, "--num-samples", 0, "--report-to", "none", "--checkpoint-every", 0,
        "--eval-every", 1, "--eval-prompts", prompts, "--eval-reward", "mmalign.diffusion.world:colour_match",
        "--eval-per-prompt", 2, "--eval-steps", 2, "--learning-rate", 1e-3)])
    assert code == 0, capsys.readouterr().err
    logged = [r for r in rows(tmp_path / "run") if "eval/reward" in r]
    assert [r["step"] for r in logged] == [0, 1, 2, 3]
    assert all(r["eval/reward_ci_low"] <= r["eval/reward"] <= r["eval/reward_ci_high"] for r in logged)
    best = json.loads((tmp_path / "run" / "checkpoints" / "best.json").read_text())
    assert (tmp_path / "run" / "checkpoints" / best["folder"] / "trainable.safetensors").is_file()
    assert (tmp_path / "run" / "held_out.png").is_file()


def test_bad_eval_options_name_the_option(tiny_sd, pickapic, tmp_path, refused):
    prompts = tmp_path / "held_out.txt"
    prompts.write_text("a red circle\n")
    args = ("diffusion", "dpo", "--model", tiny_sd, "--data", pickapic, "--output", tmp_path / "run",
            "--report-to", "none")
    assert "--eval-every needs --eval-prompts" in refused(*args, "--eval-every", 1, output=tmp_path / "run")
    assert "--eval-reward nope:fn: cannot import" in refused(
        *args, "--eval-every", 1, "--eval-prompts", prompts, "--eval-reward", "nope:fn", output=tmp_path / "run")
    assert "--eval-prompts: prompts file" in refused(
        *args, "--eval-every", 1, "--eval-prompts", tmp_path / "missing.txt", "--eval-reward",
        "mmalign.diffusion.world:reward", output=tmp_path / "run")


def test_vision_dpo_logs_held_out_accuracy(tiny_dir, tmp_path, capsys):
    from mmalign.vision import models
    from mmalign.vision.data import write_rows
    from mmalign.vision.evaluate import correct
    from mmalign.vision.world import preference_rows, qa_rows

    questions = qa_rows(8, seed=3)
    qa = write_rows([{"images": [r["image"]], "question": r["question"], "answer": r["answer"]} for r in questions],
                    tmp_path / "qa.parquet")
    data = write_rows(preference_rows(4, seed=0), tmp_path / "train.parquet")
    code = main([str(a) for a in (
        "vision", "dpo", "--model", tiny_dir, "--data", data, "--output", tmp_path / "run", "--batch-size", 2,
        "--max-steps", 2, "--learning-rate", 1e-2, "--report-to", "none", "--checkpoint-every", 0,
        "--eval-every", 1, "--eval-data", qa)])
    assert code == 0, capsys.readouterr().err
    logged = [r for r in rows(tmp_path / "run") if "eval/accuracy" in r]
    assert [r["step"] for r in logged] == [0, 1, 2]
    model, processor = models.load(tiny_dir)
    base = correct(model, processor, questions)  # `mmalign vision eval`'s measure, before training
    assert logged[0]["eval/accuracy"] == pytest.approx(sum(base) / len(base))
    best = json.loads((tmp_path / "run" / "checkpoints" / "best.json").read_text())
    assert best["metric"] == "eval/accuracy" and (tmp_path / "run" / "checkpoints" / best["folder"]).is_dir()
