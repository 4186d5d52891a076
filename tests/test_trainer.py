"""The shared training loop on a toy regression: exact resume, atomic checkpoints, NaN guard, logging."""

import json
import math
import shutil

import pytest
import torch
from torch import nn

from mmalign import trainer as trainer_module
from mmalign.errors import BadRow, DataError, RunFolderError
from mmalign.trainer import (
    EPOCH_SEED_STRIDE,
    EpochBatchSampler,
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    checkpoints,
    lr_lambda,
)


class Points(torch.utils.data.Dataset):
    def __init__(self, n=40):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def collate(items):
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def step_fn(model, batch, generator):
    noise = torch.randn(batch["y"].shape, generator=generator, device=batch["y"].device) * 0.1
    err = model(batch["x"]).squeeze(-1) - (batch["y"] + noise)
    return err.pow(2).mean(), {"abs_err": err.abs().mean()}


def fit(tmp_path, name="run", model=None, step=step_fn, **overrides):
    settings = dict(output=tmp_path / name, max_steps=6, batch_size=4, learning_rate=0.05, checkpoint_every=2,
                    report_to="none", seed=1)
    settings.update(overrides)
    torch.manual_seed(0)
    model = model or nn.Linear(3, 1)
    trainer = Trainer(TrainConfig(**settings))
    history = trainer.fit(model, Points(), collate, step)
    return history, model


def test_loss_decreases_and_metrics_jsonl_has_one_object_per_step(tmp_path):
    history, _ = fit(tmp_path, max_steps=30, checkpoint_every=0)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in lines] == list(range(1, 31))
    assert {"step", "loss", "lr", "abs_err", "grad_norm"} <= set(lines[0])
    assert lines[-1]["loss"] < 0.2 * lines[0]["loss"]
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_resume_continues_exactly(tmp_path):
    full, full_model = fit(tmp_path, "full", max_steps=6)
    fit(tmp_path, "split", max_steps=3, checkpoint_every=3)
    resumed, resumed_model = fit(tmp_path, "split", max_steps=6, checkpoint_every=3, resume="latest")
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in full[3:]], rel=0, abs=0)
    torch.testing.assert_close(resumed_model.weight, full_model.weight, rtol=0, atol=0)
    logged = [json.loads(x)["step"] for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6]


def test_resume_with_gradient_accumulation_matches(tmp_path):
    full, _ = fit(tmp_path, "full", max_steps=4, gradient_accumulation_steps=2, batch_size=2)
    fit(tmp_path, "split", max_steps=2, gradient_accumulation_steps=2, batch_size=2)
    resumed, _ = fit(tmp_path, "split", max_steps=4, gradient_accumulation_steps=2, batch_size=2, resume="latest")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[2:]]


def test_interrupted_checkpoint_write_leaves_last_one_loadable(tmp_path, monkeypatch):
    fit(tmp_path, max_steps=2, checkpoint_every=2)
    original = trainer_module.Trainer._write_state

    def crash(self, folder, *state):
        original(self, folder, *state)
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(trainer_module.Trainer, "_write_state", crash)
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path, max_steps=4, checkpoint_every=2, resume="latest")
    monkeypatch.setattr(trainer_module.Trainer, "_write_state", original)
    assert [p.name for p in checkpoints(tmp_path / "run")] == ["checkpoint-2"]
    resumed, _ = fit(tmp_path, max_steps=4, checkpoint_every=2, resume="latest")
    assert [r["step"] for r in resumed] == [3, 4]


def test_keeps_last_k_checkpoints(tmp_path):
    fit(tmp_path, max_steps=8, checkpoint_every=2, keep_checkpoints=2)
    assert [p.name for p in checkpoints(tmp_path / "run")] == ["checkpoint-6", "checkpoint-8"]
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path):
    def explodes(model, batch, generator):
        loss, metrics = step_fn(model, batch, generator)
        return (loss * float("nan") if explodes.calls >= 5 else loss), metrics

    explodes.calls = 0

    def counting(model, batch, generator):
        out = explodes(model, batch, generator)
        explodes.calls += 1
        return out

    with pytest.raises(NonFiniteLossError, match=r"optimizer step 6.*checkpoint-4"):
        fit(tmp_path, max_steps=10, checkpoint_every=2, step=counting)
    assert [p.name for p in checkpoints(tmp_path / "run")][-1] == "checkpoint-4"


def test_refuses_to_overwrite_an_existing_run(tmp_path):
    fit(tmp_path, max_steps=2)
    with pytest.raises(RunFolderError, match="--resume latest"):
        fit(tmp_path, max_steps=2)


def test_sampler_shards_one_permutation_across_processes():
    shards = [EpochBatchSampler(10, 2, 2, rank, seed=5) for rank in (0, 1)]
    first = [next(iter(s)) for s in shards]
    order = torch.randperm(10, generator=torch.Generator().manual_seed(5 * trainer_module.EPOCH_SEED_STRIDE)).tolist()
    assert first == [order[0:2], order[2:4]]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        EpochBatchSampler(3, 2, 2, 0, seed=0)


def test_lr_schedules():
    assert [lr_lambda("constant_with_warmup", 4, 10)(s) for s in (0, 2, 4, 9)] == [0, 0.5, 1, 1]
    assert lr_lambda("linear", 0, 10)(5) == 0.5
    assert lr_lambda("cosine", 0, 10)(10) == pytest.approx(0.0)
    assert lr_lambda("cosine", 0, 10)(5) == pytest.approx(0.5)
    assert lr_lambda("constant", 4, 10)(0) == 1.0
    assert math.isclose(lr_lambda("constant_with_warmup", 0, 10)(0), 1.0)


def test_config_validation():
    with pytest.raises(ValueError, match="max_steps must be at least 1"):
        TrainConfig(output="x", max_steps=0)
    with pytest.raises(ValueError, match="output"):
        TrainConfig()


def test_resume_purges_the_killed_runs_steps_from_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fit(tmp_path, max_steps=4, checkpoint_every=2, report_to="tensorboard")
    shutil.rmtree(checkpoints(tmp_path / "run")[-1])  # killed after step 4, before its checkpoint
    fit(tmp_path, max_steps=4, checkpoint_every=2, report_to="tensorboard", resume="latest")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]


def test_a_cut_off_last_metrics_line_does_not_block_resume(tmp_path):
    fit(tmp_path, max_steps=2, checkpoint_every=2)
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"loss": 0.5, "st')  # killed while writing step 3
    resumed, _ = fit(tmp_path, max_steps=3, resume="latest")
    assert [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_an_error_during_training_starts_on_a_line_of_its_own(tmp_path, capsys):
    def fails(model, batch, generator):
        raise RuntimeError("bad batch")

    with pytest.raises(RuntimeError):
        fit(tmp_path, step=fails)
    assert capsys.readouterr().err.endswith("\n")


class WithBadRow(Points):
    """Points whose rows `bad` cannot be loaded."""

    def __init__(self, bad):
        super().__init__()
        self.bad = bad

    def __getitem__(self, i):
        if i in self.bad:
            raise BadRow("points.parquet", i, "x", "cannot be read (truncated)")
        return super().__getitem__(i)


def test_a_bad_row_is_skipped_and_reported_or_stops_the_run_with_the_checkpoint_intact(tmp_path):
    bad = torch.randperm(40, generator=torch.Generator().manual_seed(1 * EPOCH_SEED_STRIDE))[13].item()  # step 4
    settings = dict(max_steps=6, batch_size=4, learning_rate=0.05, checkpoint_every=2, report_to="none", seed=1)
    history = Trainer(TrainConfig(output=tmp_path / "skip", bad_rows="skip", **settings)).fit(
        nn.Linear(3, 1), WithBadRow([bad]), collate, step_fn)
    assert [row["bad_rows"] for row in history] == [0, 0, 0, 1, 0, 0]
    report = [json.loads(line) for line in (tmp_path / "skip" / "bad_rows.jsonl").read_text().splitlines()]
    assert report == [{"step": 4, "file": "points.parquet", "index": bad, "field": "x",
                       "reason": "cannot be read (truncated)"}]
    trainer = Trainer(TrainConfig(output=tmp_path / "error", num_workers=1, **settings))
    with pytest.raises(DataError, match=f"points.parquet: record {bad}, field 'x': cannot be read \\(truncated\\); "
                                        "training stopped at optimizer step 4. The last checkpoint is .*checkpoint-2"):
        trainer.fit(nn.Linear(3, 1), WithBadRow([bad]), collate, step_fn)
    assert [c.name for c in checkpoints(tmp_path / "error")] == ["checkpoint-2"]
    assert len((tmp_path / "error" / "metrics.jsonl").read_text().splitlines()) == 3
    assert (tmp_path / "error" / "bad_rows.jsonl").read_text().count(f'"index": {bad}') == 1


def test_skipping_stops_when_no_row_loads(tmp_path):
    """A data set whose every row is bad (a moved images folder) stops the run under --bad-rows skip too."""
    trainer = Trainer(TrainConfig(output=tmp_path, bad_rows="skip", max_steps=2, batch_size=4, report_to="none"))
    with pytest.raises(DataError, match=r"No row tried in its place can be loaded either \(up to 100 rows"):
        trainer.fit(nn.Linear(3, 1), WithBadRow(bad=range(40)), collate, step_fn)
    assert {json.loads(line)["index"] for line in (tmp_path / "bad_rows.jsonl").read_text().splitlines()} == \
        set(range(40))
