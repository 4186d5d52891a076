"""Two-process data-parallel training on the CPU through `accelerate launch`."""

import json
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file


@pytest.mark.slow
def test_two_process_cpu_ddp_run(tiny_sd, pickapic, tmp_path, cpu_launch, config_launch):
    """A LoRA run on two CPU processes with DDP, then with FSDP2 (the shipped fsdp.yaml): the same losses and LoRA."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    data = shutil.copy(pickapic, tmp_path / "pairs.parquet")  # new to the fingerprint cache: it must be checked once
    run_args = ["-m", "mmalign", "diffusion", "dpo", "--model", str(tiny_sd), "--data", str(data), "--max-steps", "2",
                "--batch-size", "2", "--cpu", "--num-samples", "0", "--report-to", "none", "--learning-rate", "1e-3",
                "--adam-epsilon", "1e-4",  # Adam's m/sqrt(v) turns rounding into a +-lr step where a gradient is ~0
                "--no-channels-last"]  # FSDP shards contiguous parameters only: DDP on the same memory format
    result = subprocess.run([*cpu_launch, *run_args, "--output", str(tmp_path / "run")], env=env, capture_output=True,
                            text=True, timeout=300)
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

    sharded = subprocess.run([*config_launch("fsdp"), *run_args, "--output", str(tmp_path / "fsdp")], env=env,
                             capture_output=True, text=True, timeout=300)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    losses = [[json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
              for folder in (run, tmp_path / "fsdp")]
    # beta = 5000 multiplies the MSE differences: weights 5e-6 apart after one step move the loss by ~3e-4 relative
    assert losses[1] == pytest.approx(losses[0], rel=1e-3) and losses[0][1] < losses[0][0]
    lora, sharded_lora = (load_file(folder / "pytorch_lora_weights.safetensors") for folder in (run, tmp_path / "fsdp"))
    assert set(lora) == set(sharded_lora)
    for name, weight in lora.items():
        torch.testing.assert_close(sharded_lora[name], weight, rtol=0, atol=2e-5)  # 1/50 of one Adam step
