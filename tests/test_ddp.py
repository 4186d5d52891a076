"""Two-process data-parallel training on the CPU through `accelerate launch`."""

import json
import os
import shutil
import subprocess

import pytest


@pytest.mark.slow
def test_two_process_cpu_ddp_run(tiny_sd, pickapic, tmp_path, cpu_launch):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    data = shutil.copy(pickapic, tmp_path / "pairs.parquet")  # new to the fingerprint cache: it must be checked once
    command = [*cpu_launch, "-m", "mmalign", "diffusion", "dpo", "--model", str(tiny_sd), "--data", str(data),
               "--output", str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "2", "--cpu",
               "--num-samples", "0", "--report-to", "none", "--learning-rate", "1e-3"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("Pick-a-Pic records checked in") == 1, result.stderr[-3000:]  # by the main process
    run = tmp_path / "run"
    state = json.loads((run / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2
    files = {p.name for p in (run / "checkpoints" / "checkpoint-2").iterdir()}
    assert files == {"trainer_state.json", "trainable.safetensors", "optimizer.json", "optimizer.safetensors",
                     "scheduler.json", "scheduler.safetensors"}  # safetensors and JSON only: nothing is unpickled
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert (run / "pytorch_lora_weights.safetensors").is_file()
