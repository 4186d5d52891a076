"""Trackers: a Diffusion-DPO run reports its metrics and sample grids to W&B (offline) and TensorBoard; a resumed
run continues the same W&B run; a missing wandb package is refused before anything is written."""

import json
import sys

import pytest

from mmalign.diffusion import dpo
from mmalign.errors import MissingDependencyError
from mmalign.trackers import WANDB_ID_FILE
from mmalign.trainer import TrainConfig, Trainer


def run(tiny_sd, pickapic, output, **overrides):
    settings = dict(model=str(tiny_sd), data=str(pickapic), output=output, max_steps=2, batch_size=2, num_samples=1,
                    sample_steps=2, checkpoint_every=1, learning_rate=1e-3)
    return dpo.run(dpo.Config(**{**settings, **overrides}))


@pytest.fixture
def wandb_logs(monkeypatch):
    """Every `wandb.Run.log` call of the test as (data, step), the real logging still done (offline)."""
    from wandb.sdk.wandb_run import Run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    calls, original = [], Run.log

    def log(self, data, step=None, *args, **kwargs):
        calls.append((data, step))
        return original(self, data, step, *args, **kwargs)

    monkeypatch.setattr(Run, "log", log)
    return calls


def test_wandb_gets_the_metrics_and_grids_and_a_resume_continues_its_run(tiny_sd, pickapic, tmp_path, wandb_logs):
    output = tmp_path / "run"
    run(tiny_sd, pickapic, output, report_to="wandb")
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    scalars = [(data, step) for data, step in wandb_logs if "loss" in data]
    assert [step for _, step in scalars] == [1, 2]
    assert [data["loss"] for data, _ in scalars] == pytest.approx([m["loss"] for m in metrics])
    images = {(name, step) for data, step in wandb_logs for name in data if name.startswith("samples_")}
    assert images == {("samples_before", 0), ("samples_after", 2)}
    run_id = (output / WANDB_ID_FILE).read_text().strip()
    assert [p.name.endswith(run_id) for p in (output / "wandb").glob("offline-run-*")] == [True]

    run(tiny_sd, pickapic, output, report_to="wandb", max_steps=3, resume="latest")
    assert [step for data, step in wandb_logs if "loss" in data] == [1, 2, 3]
    assert {p.name.rsplit("-", 1)[1] for p in (output / "wandb").glob("offline-run-*")} == {run_id}


def test_tensorboard_gets_the_sample_grids(tiny_sd, pickapic, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(tiny_sd, pickapic, tmp_path / "run", report_to="tensorboard")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert [(tag, [e.step for e in events.Images(tag)]) for tag in sorted(events.Tags()["images"])] == [
        ("samples_after", [2]), ("samples_before", [0])]


def test_wandb_without_its_package_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'mmalign\[wandb\]'"):
        Trainer(TrainConfig(output=tmp_path / "run", report_to="wandb"))
    assert not (tmp_path / "run").exists()
