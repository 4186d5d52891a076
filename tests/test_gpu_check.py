"""The GPU check harness (scripts/gpu_check.py) runs end to end on tiny models on the CPU, for every method; its
real-size architectures have the published parameter counts (built on the meta device)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
# the denoiser's parameter count in the model card or paper (billions), and the text encoders' (CLIP-L text 123M,
# CLIP-G text 695M, the T5-XXL encoder 4.76B)
PUBLISHED = {"sd15": (0.86, {"text_encoder": 0.123}), "sd3-medium": (2.0, {"text_encoder_2": 0.695}),
             "sd35-large": (8.1, {"text_encoder_3": 4.76}), "flux-dev": (12.0, {"text_encoder_2": 4.76})}


@pytest.mark.parametrize("arch", sorted(PUBLISHED))
def test_real_size_architectures_have_the_published_parameter_counts(arch):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    with torch.device("meta"):
        pipe = gpu_check.PIPELINES[arch]()
    denoiser, encoders = PUBLISHED[arch]
    counts = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) / 1e9
              for name in ("unet" if arch == "sd15" else "transformer", *encoders)}
    expected = {"unet" if arch == "sd15" else "transformer": denoiser, **encoders}
    assert counts == pytest.approx(expected, rel=0.03)


def test_smoke_run_times_every_method(tmp_path):
    out = tmp_path / "results.json"
    # sd35-large takes the path of sd3-medium (the SD3.5 family itself is trained in tests/test_flow.py)
    subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--steps", "1", "2", "--batch-size", "4", "--arch", "sd15",
                    "sd3-medium", "flux-dev", "llava-7b", "--output", str(out)], check=True, capture_output=True)
    results = json.loads(out.read_text())
    assert [(r["arch"], r["method"]) for r in results] == [
        ("sd15", "Diffusion-DPO"), ("sd15", "InPO"), ("sd15", "SePPO"), ("sd3-medium", "Flow-DPO"),
        ("sd3-medium", "AC-Flow"), ("flux-dev", "Flow-DPO"), ("flux-dev", "AC-Flow"), ("llava-7b", "vision DPO")]
    assert all(r["s_per_step"] > 0 and r["items_per_s"] == r["batch_size"] / r["s_per_step"] for r in results)
    assert {r["device"] for r in results} == {"cpu"}
