"""DeepSpeed ZeRO-2 and ZeRO-3 on two CPU processes (DeepSpeed's CPU accelerator, gloo), launched with the shipped
accelerate configs (conftest's `launch`, without ACCELERATE_USE_CPU), against DDP on the same two processes (`test_fsdp`
says why DDP is the exact peer)."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from mmalign.errors import ConfigError

pytest.importorskip("deepspeed")

# float32 rounding, nothing more: ZeRO reduces the gradients in buckets and clips with its own norm, ZeRO-3 gathers each
# layer's weights for its forward; DPO's beta (5000) turns a 1e-8 difference of the denoising errors into ~5e-5 of loss
LOSS_RTOL = 1e-4
WEIGHT_ATOL = 1e-4  # 1/10 of one Adam step at lr 1e-3
ADAM_EPSILON = 1e-4  # Adam's m/sqrt(v) turns rounding into a +-lr step where a gradient is ~0


def resumed_from_first(launch, config, run, common):
    """The run again from its checkpoint-1 (the later checkpoint, the model and the later metrics removed)."""
    again = run.parent / f"{run.name}-resumed"
    later = {"checkpoint-2", "unet", "pytorch_lora_weights.safetensors"}
    shutil.copytree(run, again, ignore=lambda folder, names: later & set(names)
                    if folder in (str(run), str(run / "checkpoints")) else set())
    (again / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    launch(config, *common, "--output", again, "--resume", "latest")
    return again


@pytest.fixture(scope="module")
def dpo_full(tiny_sd, pickapic, tmp_path_factory, launch):
    """(the launch's arguments, the DDP peer's run folder) of a 2-step Diffusion-DPO --full run."""
    common = ["diffusion", "dpo", "--model", tiny_sd, "--data", pickapic, "--full", "--max-steps", 2, "--batch-size", 2,
              "--checkpoint-every", 1, "--learning-rate", 1e-3, "--adam-epsilon", ADAM_EPSILON, "--cpu",
              "--num-samples", 0, "--report-to", "none"]
    ddp = tmp_path_factory.mktemp("zero") / "ddp"
    launch("ddp", *common, "--no-channels-last", "--output", ddp)  # ZeRO's memory format
    return common, ddp


@pytest.mark.slow
@pytest.mark.parametrize("stage", [pytest.param("zero2", marks=pytest.mark.slow),
                                   pytest.param("zero3", marks=pytest.mark.long)])
def test_zero_full_diffusion_dpo(dpo_full, tmp_path, launch, stage):
    """Diffusion-DPO --full under ZeRO-2 (the frozen reference whole on each process) and ZeRO-3 (the reference
    partitioned by its own engine): the losses equal DDP's, a checkpoint (safetensors, by parameter name) resumes to
    the same weights bit for bit, and the UNet written at the end loads with from_pretrained."""
    from diffusers import UNet2DConditionModel

    common, ddp = dpo_full
    run = tmp_path / stage
    launch(stage, *common, "--output", run)
    assert launch.losses(run) == pytest.approx(launch.losses(ddp), rel=LOSS_RTOL)
    assert launch.losses(run)[1] != pytest.approx(launch.losses(run)[0], rel=1e-2)  # moved off the reference
    last = run / "checkpoints" / "checkpoint-2"
    assert json.loads((last / "trainer_state.json").read_text())["sharding"] == stage
    assert not list(run.glob("checkpoints/*/*.pt")) and not list(run.glob("checkpoints/*/global_step*"))

    resumed = resumed_from_first(launch, stage, run, common)
    assert launch.losses(resumed) == launch.losses(run)

    unet = dict(UNet2DConditionModel.from_pretrained(run / "unet").named_parameters())
    again = dict(UNet2DConditionModel.from_pretrained(resumed / "unet").named_parameters())
    peer = dict(UNet2DConditionModel.from_pretrained(ddp / "unet").named_parameters())
    trainable = load_file(last / "trainable.safetensors")  # gathered whole: every parameter, unpartitioned
    assert set(trainable) == set(unet)
    for name, weight in unet.items():
        assert torch.equal(weight, again[name]) and torch.equal(weight, trainable[name]), name
        torch.testing.assert_close(weight, peer[name], rtol=0, atol=WEIGHT_ATOL)


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
    resumed = resumed_from_first(launch, "zero2", zero, common)
    assert launch.losses(resumed) == launch.losses(zero)
    lora = load_file(zero / "pytorch_lora_weights.safetensors")
    assert lora.keys() == load_file(ddp / "pytorch_lora_weights.safetensors").keys()
    for name, weight in load_file(ddp / "pytorch_lora_weights.safetensors").items():
        torch.testing.assert_close(lora[name], weight, rtol=0, atol=WEIGHT_ATOL)
        assert torch.equal(lora[name], load_file(resumed / "pytorch_lora_weights.safetensors")[name])
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.load_lora_weights(zero)
    assert any("lora" in name for name, _ in pipe.unet.named_parameters())


@pytest.mark.long
def test_zero3_vision_dpo_full(tiny_dir, tmp_path, launch):
    """Vision DPO --full on tiny LLaVA under ZeRO-3 (get_image_features gathering its layers, the frozen copy
    partitioned): the losses equal DDP's and the saved model loads with from_pretrained."""
    from transformers import AutoModelForImageTextToText

    from mmalign.vision.data import write_rows
    from mmalign.vision.world import preference_rows

    rows = write_rows(preference_rows(8, seed=0), tmp_path / "rows.parquet")
    common = ["vision", "dpo", "--model", tiny_dir, "--data", rows, "--full", "--max-steps", 2, "--batch-size", 2,
              "--learning-rate", 1e-2, "--adam-epsilon", ADAM_EPSILON, "--cpu", "--report-to", "none"]
    zero, ddp = tmp_path / "zero3", tmp_path / "ddp"
    launch("zero3", *common, "--output", zero)
    launch("ddp", *common, "--output", ddp)
    assert launch.losses(zero) == pytest.approx(launch.losses(ddp), rel=LOSS_RTOL)
    assert launch.losses(zero)[1] != pytest.approx(launch.losses(zero)[0], rel=1e-3)
    model = dict(AutoModelForImageTextToText.from_pretrained(zero).named_parameters())
    peer = dict(AutoModelForImageTextToText.from_pretrained(ddp).named_parameters())
    for name, weight in model.items():
        torch.testing.assert_close(weight, peer[name], rtol=0, atol=WEIGHT_ATOL)


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


@pytest.mark.parametrize("launch, refused", [
    (_deepspeed(0), "stage 0 shards nothing"),
    (_deepspeed(2, "fp16"), "use bf16"),
])
def test_zero_launches_that_cannot_resume_are_refused(launch, refused):
    from mmalign.sharding import kind

    with pytest.raises(ConfigError, match=refused):
        kind(launch)


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
