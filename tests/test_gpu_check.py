"""The GPU check harness (scripts/gpu_check.py) runs end to end on tiny models on the CPU, for every method."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def test_smoke_run_times_every_method(tmp_path):
    out = tmp_path / "results.json"
    subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--steps", "1", "2", "--batch-size", "4",
                    "--output", str(out)], check=True, capture_output=True)
    results = json.loads(out.read_text())
    assert [r["method"] for r in results] == ["Diffusion-DPO", "InPO", "SePPO", "Flow-DPO", "AC-Flow", "vision DPO"]
    assert all(r["s_per_step"] > 0 and r["items_per_s"] == r["batch_size"] / r["s_per_step"] for r in results)
    assert {r["device"] for r in results} == {"cpu"}
