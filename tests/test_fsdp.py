"""Sharded training (accelerate's FSDP2; DeepSpeed ZeRO-3 where a test names it, more in test_zero) on two CPU
processes, launched with the shipped accelerate configs (conftest's `launch`).

The peer is DDP on the same two processes: each process trains on the same share of every global batch with the same
noise and timesteps (`mmalign.trainer`), so only sharding differs. A one-process run of the same global batch draws
other noise (the draws are seeded per process) and is no exact peer."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from torch import nn

from mmalign.errors import ConfigError

TINY_CLIP = Path(__file__).resolve().parents[1] / "assets" / "tiny-clip.json"
# float32 rounding, nothing more: reduce-scatter and all-reduce sum the gradients in other orders, ZeRO clips with its
# own norm and ZeRO-3 gathers each layer for its forward; DPO's beta (5000) turns a 1e-8 difference of the denoising
# errors into ~5e-5 of loss
LOSS_RTOL = 1e-4
WEIGHT_ATOL = 1e-4  # 1/10 of one Adam step at lr 1e-3
ADAM_EPSILON = 1e-4  # Adam's m/sqrt(v) turns rounding into a +-lr step where a gradient is ~0


@pytest.fixture(scope="module")
def dpo_full(tiny_sd, pickapic, tmp_path_factory, launch):
    """(the launch's arguments, the DDP peer's run folder) of a 2-step Diffusion-DPO --full run."""
    common = ["diffusion", "dpo", "--model", tiny_sd, "--data", pickapic, "--full", "--max-steps", 2, "--batch-size", 2,
              "--checkpoint-every", 1, "--learning-rate", 1e-3, "--adam-epsilon", ADAM_EPSILON, "--cpu",
              "--num-samples", 0, "--report-to", "none"]
    ddp = tmp_path_factory.mktemp("sharded") / "ddp"
    # FSDP and ZeRO shard contiguous parameters only: DDP on the same memory format
    launch("ddp", *common, "--no-channels-last", "--output", ddp)
    return common, ddp


@pytest.mark.slow
@pytest.mark.parametrize("sharded", ["fsdp", "zero2", pytest.param("zero3", marks=pytest.mark.long)])
def test_sharded_full_diffusion_dpo(dpo_full, tmp_path, launch, sharded):
    """Diffusion-DPO --full under FSDP2 (policy and frozen reference sharded), ZeRO-2 (the reference whole on each
    process) and ZeRO-3 (the reference partitioned by its own engine): the losses equal DDP's, a checkpoint
    (safetensors, the state by parameter name) resumes to the same weights bit for bit (a ZeRO-3 one under FSDP to
    the same losses), and the UNet written at the end loads with from_pretrained."""
    from diffusers import UNet2DConditionModel

    common, ddp = dpo_full
    run = tmp_path / sharded
    launch(sharded, *common, "--output", run)
    assert launch.losses(run) == pytest.approx(launch.losses(ddp), rel=LOSS_RTOL)
    assert launch.losses(run)[1] != pytest.approx(launch.losses(run)[0], rel=1e-2)  # moved off the reference
    last = run / "checkpoints" / "checkpoint-2"
    assert json.loads((last / "trainer_state.json").read_text())["sharding"] == sharded
    assert {p.suffix for p in last.iterdir()} == {".json", ".safetensors"}  # no pickle, no DeepSpeed folders

    resumed = launch.resumed(sharded, run, *common)
    assert launch.losses(resumed) == launch.losses(run)
    if sharded == "zero3":  # the same layout as FSDP's checkpoints
        assert launch.losses(launch.resumed("fsdp", run, *common)) == pytest.approx(launch.losses(run), rel=LOSS_RTOL)

    unet = dict(UNet2DConditionModel.from_pretrained(run / "unet").named_parameters())
    again = dict(UNet2DConditionModel.from_pretrained(resumed / "unet").named_parameters())
    peer = dict(UNet2DConditionModel.from_pretrained(ddp / "unet").named_parameters())
    trainable = load_file(last / "trainable.safetensors")  # gathered whole: every parameter, unsharded
    assert set(trainable) == set(unet)
    for name, weight in unet.items():
        assert torch.equal(weight, again[name]) and torch.equal(weight, trainable[name]), name
        torch.testing.assert_close(weight, peer[name], rtol=0, atol=WEIGHT_ATOL)


@pytest.mark.slow
@pytest.mark.parametrize("sharded", [pytest.param("fsdp", marks=pytest.mark.slow),
                                     pytest.param("zero3", marks=pytest.mark.long)])
def test_sharded_vision_dpo_full(tiny_dir, tmp_path, launch, sharded):
    """Vision DPO --full on tiny LLaVA under FSDP2 (decoder and vision layers as shard units) and ZeRO-3
    (get_image_features gathering like forward, the frozen copy sharded too): the losses equal DDP's and the saved
    model loads with from_pretrained."""
    from transformers import AutoModelForImageTextToText

    from mmalign.vision.data import write_rows
    from mmalign.vision.world import preference_rows

    rows = write_rows(preference_rows(8, seed=0), tmp_path / "rows.parquet")
    common = ["vision", "dpo", "--model", tiny_dir, "--data", rows, "--full", "--max-steps", 2, "--batch-size", 2,
              "--learning-rate", 1e-2, "--adam-epsilon", ADAM_EPSILON, "--cpu", "--report-to", "none"]
    run, ddp = tmp_path / sharded, tmp_path / "ddp"
    launch(sharded, *common, "--output", run)
    launch("ddp", *common, "--output", ddp)
    assert launch.losses(run) == pytest.approx(launch.losses(ddp), rel=LOSS_RTOL)
    assert launch.losses(run)[1] != pytest.approx(launch.losses(run)[0], rel=1e-3)
    model = dict(AutoModelForImageTextToText.from_pretrained(run).named_parameters())
    peer = dict(AutoModelForImageTextToText.from_pretrained(ddp).named_parameters())
    for name, weight in model.items():
        torch.testing.assert_close(weight, peer[name], rtol=0, atol=WEIGHT_ATOL)


@pytest.mark.slow
@pytest.mark.parametrize("sharded", [pytest.param("fsdp", marks=pytest.mark.slow),
                                     pytest.param("zero3", marks=pytest.mark.long)])
def test_sharded_reward_models(pickapic, button_press, tmp_path, launch, sharded):
    """Reward-model training (an aesthetic head on open_clip) and a robotics reward ensemble under FSDP2 and ZeRO-3: the
    losses equal DDP's and the model written at the end is the one DDP writes."""
    from mmalign.robotics import label
    from mmalign.robotics.reward_models import load_reward_model
    from mmalign.robotics.trajectories import Trajectories

    labelled = tmp_path / "labels"
    label.run(label.Config(data=str(button_press / "train.npz"), output=labelled, teacher="oracle", segment_length=20,
                           segments=100, pairs=200))
    commands = {
        "reward": ["reward", "train", "--scorer", TINY_CLIP, "--kind", "aesthetic", "--tune", "head", "--data",
                   pickapic, "--eval-fraction", 0.25, "--batch-size", 2],
        "robotics": ["robotics", "reward", "--data", labelled, "--members", 2, "--hidden", 32, "--layers", 2,
                     "--batch-size", 8, "--eval-data", button_press / "eval.npz", "--eval-pairs", 50]}
    for name, command in commands.items():
        runs = {launcher: tmp_path / f"{name}-{launcher}" for launcher in ("ddp", sharded)}
        for launcher, run in runs.items():
            launch(launcher, *command, "--max-steps", 3, "--learning-rate", 1e-3, "--adam-epsilon",
                   ADAM_EPSILON, "--cpu", "--report-to", "none", "--output", run)
        assert launch.losses(runs[sharded]) == pytest.approx(launch.losses(runs["ddp"]), rel=LOSS_RTOL)
        assert launch.losses(runs[sharded])[-1] != pytest.approx(launch.losses(runs[sharded])[0], rel=1e-3)
    for written in ("aesthetic_head.safetensors", "open_clip_model.safetensors"):  # the CLIP's logit scale a scalar
        scorer = {launcher: load_file(tmp_path / f"reward-{launcher}" / written) for launcher in ("ddp", sharded)}
        assert scorer[sharded].keys() == scorer["ddp"].keys()
        for name, weight in scorer[sharded].items():
            torch.testing.assert_close(weight, scorer["ddp"][name], rtol=0, atol=WEIGHT_ATOL)
    segments = Trajectories.load(button_press / "eval.npz")
    returns = [load_reward_model(tmp_path / f"robotics-{launcher}").returns(segments) for launcher in ("ddp", sharded)]
    torch.testing.assert_close(torch.as_tensor(returns[1]), torch.as_tensor(returns[0]), rtol=1e-4, atol=1e-4)


def test_meta_twin_takes_the_gathered_weights():
    """The unsharded copy costs no memory until the gathered state dict is loaded; then it computes as the model does,
    its non-persistent buffers copied as they were."""
    from mmalign.sharding import meta_twin

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.frozen = nn.Linear(3, 2), nn.Linear(2, 2).requires_grad_(False)
            self.register_buffer("scale", torch.tensor(2.0), persistent=False)

        def forward(self, x):
            return self.frozen(self.linear(x)) * self.scale

    model = Net()
    twin = meta_twin(model)
    assert all(t.is_meta for t in twin.state_dict().values()) and twin.scale.item() == 2.0
    assert [p.requires_grad for p in twin.parameters()] == [p.requires_grad for p in model.parameters()]
    twin.load_state_dict(model.state_dict(), assign=True)
    x = torch.randn(4, 3)
    torch.testing.assert_close(twin(x), model(x))


def test_lifted_scalars_compute_the_same_and_are_written_as_scalars():
    """fully_shard refuses 0-dimensional parameters (CLIP's logit scale): lifted to 1-element vectors the model
    computes what it did, and the twin that is written at the end gets them back as scalars."""
    from mmalign.sharding import lift_scalars, load_twin, meta_twin

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.logit_scale = nn.Linear(3, 2), nn.Parameter(torch.tensor(2.5), requires_grad=False)

        def forward(self, x):
            return self.linear(x) * self.logit_scale.exp()

    model, x = Net(), torch.randn(4, 3)
    expected, twin = model(x), meta_twin(model)
    lift_scalars(model)
    assert model.logit_scale.shape == (1,) and not model.logit_scale.requires_grad
    torch.testing.assert_close(model(x), expected)
    load_twin(twin, model.state_dict())
    assert twin.logit_scale.shape == () and twin.logit_scale.item() == 2.5
    torch.testing.assert_close(twin(x), expected)


def test_fsdp_version_1_is_refused():
    from mmalign.sharding import kind

    launch = SimpleNamespace(distributed_type=DistributedType.FSDP,
                             state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=1)))
    with pytest.raises(ConfigError, match="FSDP version 1 is not supported") as err:
        kind(launch)
    assert "fsdp.yaml" in str(err.value)  # what to use instead


@pytest.mark.parametrize("method, flags, refused", [
    ("seppo", {}, "launch it with DDP"),
    ("inpo", {}, "inverts to its own timestep"),
    ("acflow", {"prompts": "unread.txt"}, "critic as one container"),
    ("dpo", {"full": True, "offload_reference": True}, "drop --offload-reference"),
])
def test_references_that_cannot_be_sharded_are_refused(tiny_sd, pickapic, tmp_path, method, flags, refused):
    """Under FSDP, SePPO's snapshot reference (whole copies of the trained weights), InPO's per-process inversion (a
    different number of forwards on each process), AC-Flow's actor-critic container and an offloaded frozen copy stop
    before training, naming what to use instead."""
    import importlib

    from mmalign.diffusion.base import prepare
    from mmalign.trainer import Trainer

    module = importlib.import_module(f"mmalign.diffusion.{method}")
    data = {} if method == "acflow" else {"data": str(pickapic)}  # an online method: prompts, no pairs
    config = module.Config(model=str(tiny_sd), output=tmp_path / "run", report_to="none", **data, **flags)
    trainer = Trainer(config)
    trainer.sharding = "fsdp"  # what `mmalign.sharding.kind` reports for an FSDP launch
    factory = module.snapshots(config) if method == "seppo" else None
    with pytest.raises(ConfigError, match=refused):
        prepare(config, trainer, factory)
    assert not (tmp_path / "run").exists()


def test_8bit_adam_and_online_bdhs_are_refused_under_fsdp(tiny_dir, tmp_path, monkeypatch):
    """8-bit AdamW cannot step sharded parameters; online BDHS runs a different number of forwards on each process."""
    from mmalign import sharding
    from mmalign.trainer import TrainConfig, Trainer
    from mmalign.vision import dpo

    monkeypatch.setattr(sharding, "kind", lambda accelerator: "fsdp")  # what an FSDP launch reports
    with pytest.raises(ConfigError, match="drop --use-8bit-adam"):
        Trainer(TrainConfig(output=tmp_path / "run", use_8bit_adam=True, report_to="none"))
    config = dpo.Config(model=str(tiny_dir), data="unread.parquet", output=tmp_path / "run", online_bdhs=True,
                        report_to="none")
    with pytest.raises(ConfigError, match="launch it with DDP"):
        dpo.prepare(config, Trainer(config), processor=None)
    assert not (tmp_path / "run").exists()


def test_shard_units_are_the_declared_blocks_the_model_has():
    """LLaVA declares CLIPTextEmbeddings beside a vision-only CLIP: only the blocks present become units, and a class
    list named in the launch config is left as it is."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    from mmalign.sharding import declare_blocks

    class Block(nn.Linear):
        pass

    model = nn.Sequential(Block(2, 2), nn.Linear(2, 2))
    model._no_split_modules = ["Block", "CLIPTextEmbeddings"]
    for named, expected in ((None, ["Block"]), (["Linear"], ["Linear"])):
        plugin = SimpleNamespace(fsdp_version=2, auto_wrap_policy=transformer_auto_wrap_policy,
                                 transformer_cls_names_to_wrap=named)
        launch = SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace(fsdp_plugin=plugin))
        declare_blocks(launch, model)
        assert plugin.transformer_cls_names_to_wrap == expected


def test_a_sharded_checkpoint_is_refused_by_a_launch_without_sharding(tmp_path):
    """Its optimizer state is keyed by parameter name, not position: refused before the run folder is touched."""
    from mmalign.errors import RunFolderError
    from mmalign.trainer import TrainConfig, Trainer

    folder = tmp_path / "run" / "checkpoints" / "checkpoint-1"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"format": 2, "step": 1, "seed": 0, "num_processes": 2,
                                                           "sharding": "fsdp"}))
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    with pytest.raises(RunFolderError, match=r"written by a sharded \(FSDP or ZeRO\) launch and this one runs without"):
        Trainer(TrainConfig(output=tmp_path / "run", resume="latest", report_to="none"))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before
