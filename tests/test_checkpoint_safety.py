"""Checkpoints are safetensors and JSON only: states round-trip exactly, and nothing in a checkpoint is unpickled."""

import json
import os
import pickle

import pytest
import torch
from torch import nn

from mmalign.errors import RunFolderError
from mmalign.reference import Snapshots
from mmalign.state import StateFormatError, load_state, save_state
from mmalign.trainer import TrainConfig, Trainer, checkpoints


def test_optimizer_schedule_and_snapshot_states_round_trip(tmp_path):
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.95))
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5)
    pool = Snapshots(model, keep=2, every=1)
    pool.tick(model)
    for name, state in {"optimizer": optimizer.state_dict(), "scheduler": schedule.state_dict(),
                        "pool": pool.state_dict()}.items():
        save_state(state, tmp_path, name)
        loaded = load_state(tmp_path, name)
        assert repr(loaded) == repr(state)  # same keys (ints stay ints), tuples stay tuples, tensors equal
    restored = torch.optim.AdamW(model.parameters(), lr=0.1)
    restored.load_state_dict(load_state(tmp_path, "optimizer"))
    assert restored.param_groups[0]["betas"] == (0.8, 0.95)
    torch.testing.assert_close(restored.state[model.weight]["exp_avg"], optimizer.state[model.weight]["exp_avg"])


def test_a_state_that_is_not_data_is_refused_when_saved(tmp_path):
    with pytest.raises(StateFormatError, match=r"state\.hook: a builtin_function_or_method cannot be saved"):
        save_state({"hook": print}, tmp_path, "state")
    with pytest.raises(StateFormatError, match="not valid JSON"):
        (tmp_path / "bad.json").write_text("{")
        (tmp_path / "bad.safetensors").write_bytes(b"")
        load_state(tmp_path, "bad")


class Payload:
    """Unpickling this creates a file: the proof that a pickle was executed."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def fit(output, **overrides):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    data = [{"x": torch.randn(3), "y": torch.randn(())} for _ in range(16)]
    settings = dict(output=output, max_steps=4, batch_size=4, learning_rate=0.05, checkpoint_every=2,
                    report_to="none")
    settings.update(overrides)
    trainer = Trainer(TrainConfig(**settings))

    def step(m, batch, generator):
        return (m(batch["x"]).squeeze(-1) - batch["y"]).pow(2).mean(), {}

    return trainer.fit(model, data, torch.utils.data.default_collate, step), model


def test_crafted_pickles_in_a_checkpoint_are_never_executed(tmp_path):
    full, full_model = fit(tmp_path / "full")
    fit(tmp_path / "run", max_steps=2)
    checkpoint = checkpoints(tmp_path / "run")[-1]
    marker = tmp_path / "pwned"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin", "scaler.pt"):
        (checkpoint / name).write_bytes(pickle.dumps(Payload(str(marker))))
    resumed, model = fit(tmp_path / "run", resume="latest")
    assert not marker.exists()
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[2:]]
    torch.testing.assert_close(model.weight, full_model.weight, rtol=0, atol=0)


def test_a_checkpoint_in_the_pickled_format_is_refused_with_its_reason(tmp_path):
    fit(tmp_path / "run", max_steps=2)
    checkpoint = checkpoints(tmp_path / "run")[-1]
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    (checkpoint / "trainer_state.json").write_text(json.dumps({k: v for k, v in state.items() if k != "format"}))
    with pytest.raises(RunFolderError, match="never unpickles a checkpoint.*trainable.safetensors"):
        fit(tmp_path / "run", resume="latest")


def test_a_damaged_checkpoint_is_named(tmp_path):
    fit(tmp_path / "run", max_steps=2)
    checkpoint = checkpoints(tmp_path / "run")[-1]
    (checkpoint / "optimizer.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(RunFolderError, match=f"checkpoint {checkpoint} cannot be resumed.*optimizer.safetensors"):
        fit(tmp_path / "run", resume="latest")


def test_checkpoint_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        fit(tmp_path / "run", max_steps=2)
    finally:
        os.umask(old)
    run = tmp_path / "run"
    for path in [run / "metrics.jsonl", run / "config.yaml", *checkpoints(run)[-1].iterdir()]:
        assert oct(path.stat().st_mode & 0o777) == oct(0o644), path
