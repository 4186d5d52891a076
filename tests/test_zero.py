"""DeepSpeed ZeRO: what a launch is taken for, and a LoRA under ZeRO-2 on two CPU processes (DeepSpeed's CPU
accelerator, gloo; conftest's `launch`, without ACCELERATE_USE_CPU) against DDP on the same two processes (`test_fsdp`
says why DDP is the exact peer, and trains --full models, vision DPO and reward models under ZeRO-2/3 too)."""

from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from mmalign.errors import ConfigError

# float32 rounding: ZeRO reduces the gradients in buckets and clips with its own norm (`test_fsdp` says more)
LOSS_RTOL = 1e-4
WEIGHT_ATOL = 1e-4  # 1/10 of one Adam step at lr 1e-3
ADAM_EPSILON = 1e-4  # Adam's m/sqrt(v) turns rounding into a +-lr step where a gradient is ~0


@pytest.mark.long
def test_zero2_lora_diffusion_dpo(tiny_sd, pickapic, tmp_path, launch):
    """A LoRA under ZeRO-2: the losses equal DDP's, the run resumes exactly, and the LoRA written at the end (diffusers'
    format) is DDP's and loads into the pipeline."""
    from diffusers import StableDiffusionPipeline

    common = ["diffusion", "dpo", "--model", tiny_sd, "--data", pickapic, "--max-steps", 2, "--batch-size", 2,
              "--checkpoint-every", 1, "--learning-rate", 1e-3, "--adam-epsilon", ADAM_EPSILON, "--cpu",
              "--num-samples", 0, "--report-to", "none", "--no-channels-last"]
    zero, ddp = tmp_path / "zero2", tmp_path / "ddp"
    launch("zero2", *common, "--output", zero)
    launch("ddp", *common, "--output", ddp)
    assert launch.losses(zero) == pytest.approx(launch.losses(ddp), rel=LOSS_RTOL)
    assert launch.losses(zero)[1] != pytest.approx(launch.losses(zero)[0], rel=1e-2)
    resumed = launch.resumed("zero2", zero, *common)
    assert launch.losses(resumed) == launch.losses(zero)
    lora = load_file(zero / "pytorch_lora_weights.safetensors")
    assert lora.keys() == load_file(ddp / "pytorch_lora_weights.safetensors").keys()
    for name, weight in load_file(ddp / "pytorch_lora_weights.safetensors").items():
        torch.testing.assert_close(lora[name], weight, rtol=0, atol=WEIGHT_ATOL)
        assert torch.equal(lora[name], load_file(resumed / "pytorch_lora_weights.safetensors")[name])
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.load_lora_weights(zero)
    assert any("lora" in name for name, _ in pipe.unet.named_parameters())


def _deepspeed(stage, mixed_precision="no"):
    """What a DeepSpeed launch of `stage` looks like to `mmalign.sharding.kind`."""
    plugin = SimpleNamespace(zero_stage=stage)
    return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, mixed_precision=mixed_precision,
                           state=SimpleNamespace(deepspeed_plugin=plugin))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_are_kinds_of_sharding(stage):
    from mmalign.sharding import kind, runs_collective

    assert kind(_deepspeed(stage)) == f"zero{stage}"
    assert runs_collective(kind(_deepspeed(stage))) == (stage == 3)  # ZeRO-1/2 hold the whole model on each process


@pytest.mark.parametrize("launched, refused", [
    (_deepspeed(0), "stage 0 shards nothing"),
    (_deepspeed(2, "fp16"), "use bf16"),
])
def test_zero_launches_that_cannot_resume_are_refused(launched, refused):  # `launched`: not conftest's `launch`
    from mmalign.sharding import kind

    with pytest.raises(ConfigError, match=refused):
        kind(launched)


def test_a_deepspeed_launch_told_to_use_the_cpu_is_refused_not_run_as_ddp(monkeypatch):
    """accelerate turns a DeepSpeed launch with ACCELERATE_USE_CPU into plain DDP; mmalign stops and says so."""
    from mmalign.sharding import kind, options

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="drop that"):
        kind(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))
    if not torch.cuda.is_available():  # the Accelerator is then told: not the CPU, the gloo backend
        chosen = options(cpu=True)
        assert chosen["cpu"] is False and chosen["kwargs_handlers"][0].backend == "gloo"
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    assert options(cpu=True) == {"cpu": True}


@pytest.mark.long
def test_zero3_bf16_with_gradient_checkpointing_and_sample_grids(tiny_sd, pickapic, tmp_path, launch):
    """bf16 under ZeRO-3 (DeepSpeed casts the UNet it trains; torch's autocast joins it to the bf16 text encoder and
    VAE, and runs the grids before training): it trains, resumes exactly, draws both grids and writes fp32 weights."""
    common = ["diffusion", "dpo", "--model", tiny_sd, "--data", pickapic, "--full", "--max-steps", 2, "--batch-size", 2,
              "--checkpoint-every", 1, "--learning-rate", 1e-4, "--mixed-precision", "bf16",
              "--gradient-checkpointing", "--num-samples", 2, "--cpu", "--report-to", "none"]
    run = tmp_path / "zero3"
    launch("zero3", *common, "--output", run)
    assert launch.losses(run)[1] != pytest.approx(launch.losses(run)[0], rel=1e-2)
    assert launch.losses(launch.resumed("zero3", run, *common)) == launch.losses(run)
    assert (run / "samples_before.png").is_file() and (run / "samples_after.png").is_file()
    assert {w.dtype for path in (run / "unet").glob("*.safetensors") for w in load_file(path).values()} == {
        torch.float32}  # the master weights, not the bf16 copy the forward used
