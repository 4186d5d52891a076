"""One run per output folder: concurrent runs, folders that are not runs, launches whose processes did not join."""

import os
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from mmalign import run_folder
from mmalign.errors import ConfigError, RunFolderError
from mmalign.trainer import TrainConfig, Trainer

TOY = """
import os, sys, time, torch
from torch import nn
from mmalign.trainer import TrainConfig, Trainer
output, resume, hold = sys.argv[1], None if sys.argv[2] == "-" else sys.argv[2], sys.argv[3]
torch.manual_seed(0)
data = [{"x": torch.randn(3), "y": torch.randn(())} for _ in range(16)]
def step(m, b, g):
    while os.path.exists(output + "/metrics.jsonl") and os.path.exists(hold):  # held after its first step
        time.sleep(0.1)
    return (m(b["x"]).squeeze(-1) - b["y"]).pow(2).mean(), {}
trainer = Trainer(TrainConfig(output=output, max_steps=8, batch_size=2, report_to="none", resume=resume))
trainer.fit(nn.Linear(3, 1), data, torch.utils.data.default_collate, step)
"""


def toy(tmp_path, output, resume="-", hold="-", launcher=(), env=None, wait=True):
    """The toy regression trained by `python toy.py` (through `launcher`); it pauses after its first step while the
    file `hold` exists."""
    script = tmp_path / "toy.py"
    script.write_text(TOY)
    command = [sys.executable, *launcher, str(script), str(output), resume, str(hold)]
    env = {k: v for k, v in {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}.items() if v is not None}
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_a_second_run_on_a_folder_in_use_stops_and_the_first_is_untouched(tmp_path):
    output, hold = tmp_path / "run", tmp_path / "hold"
    hold.touch()
    first = toy(tmp_path, output, hold=hold, wait=False)
    deadline = time.time() + 120
    while not (output / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    fresh = toy(tmp_path, output)
    resumed = toy(tmp_path, output, resume="latest")
    hold.unlink()
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert fresh.returncode != 0 and "is not empty" in fresh.stderr
    assert resumed.returncode != 0 and "is in use by another run (pid" in resumed.stderr
    assert len((output / "metrics.jsonl").read_text().splitlines()) == 8
    assert toy(tmp_path, output, resume="latest").returncode == 0  # the lock went with the first run


def test_a_folder_that_is_not_a_run_is_neither_trained_into_nor_changed(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("my own notes\n")
    with pytest.raises(RunFolderError, match="is not empty .*metrics.jsonl"):
        Trainer(TrainConfig(output=folder, report_to="none"))
    with pytest.raises(RunFolderError, match="no mmalign run"):
        Trainer(TrainConfig(output=folder, report_to="none", resume="latest"))
    assert sorted(p.name for p in folder.iterdir()) == ["metrics.jsonl"]
    assert (folder / "metrics.jsonl").read_text() == "my own notes\n"
    with pytest.raises(RunFolderError, match="is a file"):
        Trainer(TrainConfig(output=folder / "metrics.jsonl", report_to="none"))


def test_creating_a_trainer_writes_nothing_and_a_failed_claim_leaves_nothing(tmp_path):
    Trainer(TrainConfig(output=tmp_path / "a" / "run", report_to="none"))
    assert not (tmp_path / "a").exists()
    with pytest.raises(KeyError):
        with run_folder.claim(tmp_path / "b" / "run", resuming=False):
            assert (tmp_path / "b" / "run" / run_folder.LOCK_FILE).is_file()
            raise KeyError("stopped before writing")
    assert not (tmp_path / "b").exists()
    with run_folder.claim(tmp_path / "c", resuming=False):
        (tmp_path / "c" / "data").mkdir()
        model = nn.Linear(3, 1)  # a stage trains inside the claimed folder: it belongs to the run
        data = [{"x": torch.randn(3), "y": torch.randn(())} for _ in range(4)]
        Trainer(TrainConfig(output=tmp_path / "c", max_steps=1, batch_size=2, report_to="none")).fit(
            model, data, torch.utils.data.default_collate, lambda m, b, g: (m(b["x"]).pow(2).mean(), {}))
    assert (tmp_path / "c" / "config.yaml").is_file() and (tmp_path / "c" / "data").is_dir()
    assert not run_folder.held(tmp_path / "c")


def test_processes_that_did_not_join_one_run_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="launcher started 2 processes .* ACCELERATE_USE_CPU=1"):
        Trainer(TrainConfig(output=tmp_path / "run", report_to="none"))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_multi_gpu_launch_on_a_machine_without_gpus_is_refused(tmp_path, cpu_launch):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = toy(tmp_path, tmp_path / "run", launcher=tuple(cpu_launch[1:]), env={"ACCELERATE_USE_CPU": None})
    assert result.returncode != 0 and "did not join one run" in result.stderr
    assert not (tmp_path / "run").exists()


def test_only_the_first_process_of_a_launch_claims_the_folder(tmp_path, monkeypatch):
    """A command's own claim (robotics reward, pearl) is taken by RANK 0; the launch's other processes write into the
    folder it holds, and creating nothing, leave nothing when it fails."""
    run = tmp_path / "run"
    with run_folder.claim(run, resuming=False):
        monkeypatch.setenv("RANK", "1")
        with monkeypatch.context() as other_process:
            other_process.setattr(run_folder, "_held", {})  # holding nothing of its own, it would meet the lock
            with run_folder.claim(run, resuming=False) as other:
                assert other.handle is None
    with run_folder.claim(tmp_path / "absent", resuming=False):  # still RANK 1
        pass
    assert not (tmp_path / "absent").exists()
