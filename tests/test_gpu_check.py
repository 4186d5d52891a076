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
# the denoiser's size in the model card or paper (billions of numbers its checkpoint holds: SD3's count includes its
# position table; Wan 2.1's "1.3B" transformer holds 1.42B as released), and the text encoders' (CLIP-L text 123M,
# CLIP-G text 695M, the T5-XXL encoder 4.76B, the UMT5-XXL encoder 5.68B); cards round, so within 5%
PUBLISHED = {"sd15": (0.86, {"text_encoder": 0.123}), "sdxl": (2.57, {"text_encoder_2": 0.695}),
             "sd3-medium": (2.0, {"text_encoder_2": 0.695}),
             "sd35-medium": (2.5, {"text_encoder_3": 4.76}),
             "sd35-large": (8.1, {"text_encoder_3": 4.76}), "flux-dev": (12.0, {"text_encoder_2": 4.76}),
             "wan-1.3b": (1.42, {"text_encoder": 5.68})}


def checkpoint_size(module: torch.nn.Module) -> int:
    """Numbers a module's checkpoint holds: its parameters (tied ones once) and persistent buffers."""
    saved = module.state_dict()
    return (sum(p.numel() for p in module.parameters())
            + sum(b.numel() for name, b in module.named_buffers() if name in saved))


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arch", sorted(PUBLISHED))
def test_real_size_architectures_have_the_published_parameter_counts(gpu_check, arch):
    with torch.device("meta"):
        pipe = gpu_check.PIPELINES[arch]()
    denoiser, encoders = PUBLISHED[arch]
    denoiser_name = "unet" if arch in ("sd15", "sdxl") else "transformer"
    counts = {name: checkpoint_size(getattr(pipe, name)) / 1e9 for name in (denoiser_name, *encoders)}
    expected = {denoiser_name: denoiser, **encoders}
    assert counts == pytest.approx(expected, rel=0.05)


def test_qwen25_vl_7b_has_the_published_parameter_counts(gpu_check):
    """8.29B in all (the model card), 0.68B of them the vision tower."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from mmalign.vision.tiny import word_tokenizer

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(gpu_check.qwen25_vl_7b_config(word_tokenizer(video_token="<video>")))
    counts = [sum(p.numel() for p in m.parameters()) / 1e9 for m in (model, model.model.visual)]
    assert counts == pytest.approx([8.29, 0.677], rel=0.01)


def test_smoke_run_times_every_method(tmp_path):
    out = tmp_path / "results.json"
    # sd3-medium and sd35-large take the path of sd35-medium (each family is trained in tests/test_flow.py)
    subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--steps", "1", "2", "--batch-size", "4", "--arch", "sd15",
                    "sd35-medium", "flux-dev", "wan-1.3b", "llava-7b", "qwen2.5-vl-7b", "--output", str(out)],
                   check=True, capture_output=True)
    results = json.loads(out.read_text())
    assert [(r["arch"], r["method"]) for r in results] == [
        ("sd15", "Diffusion-DPO"), ("sd15", "InPO"), ("sd15", "SePPO"), ("sd35-medium", "Flow-DPO"),
        ("sd35-medium", "AC-Flow"), ("sd35-medium", "Flow-GRPO"), ("flux-dev", "Flow-DPO"), ("flux-dev", "AC-Flow"),
        ("wan-1.3b", "video DPO"), ("wan-1.3b", "Flow-GRPO"), ("llava-7b", "vision DPO"),
        ("qwen2.5-vl-7b", "vision DPO")]
    assert all(r["s_per_step"] > 0 and r["items_per_s"] == r["batch_size"] / r["s_per_step"] for r in results)
    assert {r["device"] for r in results} == {"cpu"}


@pytest.mark.long
@pytest.mark.parametrize("sharded", ["fsdp", "zero3"])
def test_sharded_smoke_run_reports_every_process(tmp_path, config_launch, launch, sharded):
    """Launched on two processes (the shipped accelerate config), the harness builds once into --workdir, runs the
    full fine-tunes that train sharded and reports each process's peak memory."""
    out = tmp_path / "results.json"
    subprocess.run([*config_launch(sharded), str(SCRIPT), "--smoke", "--full", "--steps", "1", "2", "--batch-size", "2",
                    "--arch", "sd15", "sdxl", "llava-7b", "--workdir", str(tmp_path / "work"), "--output", str(out)],
                   check=True, capture_output=True, env=launch.env(sharded))
    results = json.loads(out.read_text())
    assert [(r["arch"], r["method"]) for r in results] == [  # InPO and SePPO train with DDP only
        ("sd15", "Diffusion-DPO"), ("sdxl", "Diffusion-DPO"), ("llava-7b", "vision DPO")]
    assert all(r["full"] and r["processes"] == 2 and r["sharding"] == sharded for r in results)
    assert all(len(r["peak_gib_per_process"]) == 2 and r["items_per_s"] == 2 * 2 / r["s_per_step"] for r in results)
