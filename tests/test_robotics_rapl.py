"""RAPL: the OT reward by hand, triplets ranked by return, the triplet loss as the core Bradley-Terry, and alignment."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmalign.cli import main
from mmalign.data import DataError
from mmalign.errors import RunFolderError
from mmalign.robotics import rapl
from mmalign.robotics.trajectories import Trajectories
from mmalign.robotics.visual import VisualEncoder, make_backbone


def test_ot_reward_by_hand():
    # frames e1, e2 against demo frames e1, e2: cosine costs C = [[0, 1], [1, 0]]; by symmetry the entropic
    # plan is K = exp(-C / reg) scaled to marginals 1/2: P = [[p, q], [q, p]], p / q = e^(1 / reg), p + q = 1/2
    frames = torch.tensor([[[1.0, 0.0], [0.0, 3.0]]])
    demo = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])
    reg = 0.5
    q = 0.5 / (1.0 + math.exp(1.0 / reg))
    torch.testing.assert_close(rapl.ot_rewards(frames, demo, reg), torch.tensor([[-q, -q]]), atol=1e-5, rtol=1e-5)
    # r(tau) = -<P*, C> summed over frames; against two demos the better one counts
    far = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])  # the same frames in the opposite order: costs 1 on the diagonal
    rewards = rapl.trajectory_rewards(frames, torch.cat([far, demo]), reg)
    torch.testing.assert_close(rewards, torch.tensor([-2 * q]), atol=1e-5, rtol=1e-5)


def test_ot_reward_gradient_is_minus_the_plan():
    torch.manual_seed(0)
    frames, demo = torch.randn(1, 4, 3, requires_grad=True), torch.randn(1, 5, 3)
    cost = 1 - F.normalize(frames, dim=-1) @ F.normalize(demo, dim=-1).transpose(-1, -2)
    cost.retain_grad()
    rapl.ot_rewards_from_cost(cost, 0.2).sum().backward()
    plan = -cost.grad[0]
    np.testing.assert_allclose(plan.sum(1).numpy(), np.full(4, 1 / 4), atol=1e-4)
    np.testing.assert_allclose(plan.sum(0).numpy(), np.full(5, 1 / 5), atol=1e-4)


def test_triplets_are_ordered_by_true_return():
    returns = np.array([3.0, 1.0, 4.0, 1.5, 9.0, 2.6])
    triplets = rapl.rank_triplets(returns, 50, seed=0)
    assert triplets.shape == (50, 3)
    assert all(len(set(t)) == 3 for t in triplets.tolist())
    assert (returns[triplets[:, 0]] >= returns[triplets[:, 1]]).all()
    assert (returns[triplets[:, 1]] >= returns[triplets[:, 2]]).all()
    with pytest.raises(ValueError, match="at least 3 trajectories"):
        rapl.rank_triplets(returns[:2], 1, seed=0)


def test_triplet_loss_is_the_core_bradley_terry_on_ot_rewards():
    torch.manual_seed(0)
    encoder = VisualEncoder(*make_backbone("small-cnn"), embed_dim=8)
    frames = torch.randint(0, 256, (2, 3, 4, 16, 16, 3), dtype=torch.uint8)
    loss, metrics = rapl.triplet_step(encoder, frames, torch.Generator(), reg=0.1)
    positive, neutral, negative = encoder(frames).unbind(1)
    r_neutral = rapl.ot_rewards(neutral, positive, 0.1).sum(-1)
    r_negative = rapl.ot_rewards(negative, positive, 0.1).sum(-1)
    torch.testing.assert_close(loss, -F.logsigmoid(r_neutral - r_negative).mean())
    assert metrics["triplet_acc"] == (r_neutral > r_negative).float().mean()


def growing_squares(progress: np.ndarray, distractor: np.ndarray, frames: int) -> np.ndarray:
    """Frames [N, F, 16, 16, 3] on grey: a red square growing at the speed `progress` (what the return rewards)
    in one corner, a blue one growing at the unrelated speed `distractor` in the opposite corner."""
    out = np.full((len(progress), frames, 16, 16, 3), 100, np.uint8)
    for i, (p, d) in enumerate(zip(progress, distractor)):
        for f in range(frames):
            red, blue = (2 + int(round(speed * 12 * f / (frames - 1))) for speed in (p, d))
            out[i, f, :red, :red] = (255, 0, 0)
            out[i, f, 16 - blue:, 16 - blue:] = (0, 0, 255)
    return out


def synthetic_file(path, n: int, seed: int) -> str:
    """A trajectory file whose true return is the red square's speed in its frames."""
    progress, distractor = np.random.default_rng(seed).random((2, n))
    steps, every = 16, 4
    trajs = Trajectories("drawer-open-v3", np.zeros((n, steps, 39)), np.zeros((n, steps, 4)),
                         np.repeat(progress[:, None], steps, 1), np.zeros((n, steps), bool),
                         frames=growing_squares(progress, distractor, steps // every), meta={"frame_every": every})
    trajs.save(path)
    return str(path)


@pytest.mark.slow
def test_aligning_lowers_the_triplet_loss(tmp_path):
    train = Trajectories.load(synthetic_file(tmp_path / "train.npz", 24, seed=0))
    config = rapl.Config(data="unused", eval_data="unused", output=tmp_path / "run", triplets=64, max_steps=60,
                         batch_size=8, embed_dim=8, eval_every=0, report_to="none")
    torch.manual_seed(0)
    encoder = VisualEncoder(*make_backbone("small-cnn"), embed_dim=8)
    triplets = torch.from_numpy(train.frames[rapl.rank_triplets(train.returns(), 64, config.seed)])
    with torch.no_grad():
        before = rapl.triplet_step(encoder.eval(), triplets, torch.Generator(), config.ot_reg)[0].item()
    frozen = {k: v.clone() for k, v in encoder.backbone.state_dict().items()}
    rapl.align(config, encoder, train)
    with torch.no_grad():
        after = rapl.triplet_step(encoder, triplets, torch.Generator(), config.ot_reg)[0].item()
    assert after < before - 0.05, (before, after)
    assert all(torch.equal(frozen[k], v) for k, v in encoder.backbone.state_dict().items()), "backbone stays frozen"


@pytest.mark.slow
def test_rapl_command_raises_the_spearman_of_the_ot_reward(tmp_path):
    train, held_out = synthetic_file(tmp_path / "train.npz", 30, 0), synthetic_file(tmp_path / "eval.npz", 20, 1)
    assert main(["robotics", "rapl", "--data", train, "--eval-data", held_out, "--output", str(tmp_path / "run"),
                 "--pretrain-steps", "60", "--triplets", "100", "--max-steps", "80", "--embed-dim", "8",
                 "--report-to", "none"]) == 0
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report["spearman_after"] > report["spearman_before"] + 0.1, report
    assert (tmp_path / "run" / "reward_vs_return.png").is_file() and (tmp_path / "run" / "rapl_encoder.pt").is_file()


def test_resume_continues_the_alignment_and_takes_the_pretraining_from_its_checkpoint(tmp_path):
    train, held_out = synthetic_file(tmp_path / "train.npz", 16, 0), synthetic_file(tmp_path / "eval.npz", 4, 1)
    config = rapl.Config(data=train, eval_data=held_out, output=tmp_path / "run", pretrain_steps=2, triplets=8,
                         max_steps=2, embed_dim=4, report_to="none")
    first = rapl.run(config)
    with pytest.raises(RunFolderError, match="is not empty"):
        rapl.run(config)
    named = config.output / "checkpoints" / "checkpoint-2"
    for resume in ("latest", str(named)):
        assert rapl.run(dataclasses.replace(config, resume=resume)) == first
    assert len((config.output / "pretrain" / "metrics.jsonl").read_text().splitlines()) == 2


def test_the_encoder_of_the_best_held_out_spearman_is_kept_and_named(tmp_path, capsys):
    train, held_out = synthetic_file(tmp_path / "train.npz", 16, 0), synthetic_file(tmp_path / "eval.npz", 8, 1)
    config = rapl.Config(data=train, eval_data=held_out, output=tmp_path / "run", pretrain_steps=4, triplets=16,
                         max_steps=6, eval_every=2, embed_dim=4, learning_rate=0.3, report_to="none")
    report = rapl.run(config)
    rows = [json.loads(line) for line in (config.output / "metrics.jsonl").read_text().splitlines()]
    scored = {row["step"]: row["eval/spearman"] for row in rows if "eval/spearman" in row}
    assert sorted(scored) == [0, 2, 4, 6]
    best_step = max(scored, key=lambda step: (scored[step], -step))  # the first of the highest
    assert best_step not in (0, 6), f"the best is neither the start nor the last step here: {scored}"
    assert report["best"]["step"] == best_step and report["best"]["spearman"] == pytest.approx(scored[best_step])
    assert report["spearman_after"] == pytest.approx(scored[6], abs=1e-6)
    held, demos = rapl.load_inputs(config)[1:]
    encoder = VisualEncoder(*make_backbone("small-cnn"), embed_dim=4)
    encoder.load_state_dict(torch.load(report["best"]["encoder"], weights_only=True))
    assert rapl.spearman_of(encoder.eval(), held, demos, config.ot_reg)[0] == pytest.approx(scored[best_step],
                                                                                          abs=1e-6)
    assert f"best held-out Spearman {scored[best_step]:.3f} at step {best_step}" in capsys.readouterr().out


def test_bad_inputs(tmp_path):
    path = tmp_path / "no-frames.npz"
    Trajectories("drawer-open-v3", np.zeros((3, 4, 39)), np.zeros((3, 4, 4)), np.zeros((3, 4)),
                 np.zeros((3, 4), bool)).save(path)
    with pytest.raises(ValueError, match=f"{path}: no frames"):
        rapl.load_frames(str(path))
    with pytest.raises(ValueError, match="--data and --eval-data"):
        rapl.Config(output=tmp_path / "x")
    with pytest.raises(ValueError, match="unknown backbone 'resnet'"):
        make_backbone("resnet")
    with pytest.raises(FileNotFoundError, match="missing.pt does not exist"):
        make_backbone("small-cnn", str(tmp_path / "missing.pt"))
    with pytest.raises(DataError, match="frames"):
        Trajectories("drawer-open-v3", np.zeros((3, 4, 39)), np.zeros((3, 4, 4)), np.zeros((3, 4)),
                     np.zeros((3, 4), bool), frames=np.zeros((3, 2, 8, 8, 3), np.uint8), meta={"frame_every": 1})


def test_a_backbone_checkpoint_loads_its_weights(tmp_path):
    from mmalign.robotics.visual import SmallCNN

    torch.manual_seed(0)
    trained = SmallCNN()
    torch.save(trained.state_dict(), tmp_path / "small_cnn.pt")
    loaded, features = make_backbone("small-cnn", str(tmp_path / "small_cnn.pt"))
    assert features == SmallCNN.features
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in trained.state_dict().items())


def test_torchvision_and_timm_backbones_give_their_feature_size():
    for name in ("torchvision:resnet18", "timm:resnet18"):
        backbone, features = make_backbone(name)
        assert features == 512 and backbone.eval()(torch.zeros(2, 3, 64, 64)).shape == (2, 512)
    encoder = VisualEncoder(backbone.requires_grad_(False), features).train()
    assert encoder.head.training and not encoder.backbone.training, "a frozen backbone keeps its BatchNorm statistics"


def test_commands_report_bad_files_by_name_field_and_trajectory(tmp_path, capsys):
    good = synthetic_file(tmp_path / "good.npz", 4, seed=0)
    with np.load(good) as data:
        arrays = dict(data)
    arrays["rewards"][1, 3] = np.nan
    np.savez(tmp_path / "nan.npz", **arrays)
    assert main(["robotics", "rapl", "--data", str(tmp_path / "nan.npz"), "--eval-data", good,
                 "--output", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "nan.npz" in err and "field 'rewards'" in err and "trajectory 1 step 3" in err
    assert main(["robotics", "grape", "--task", "drawer-opne-v3", "--output", str(tmp_path / "g")]) == 1
    assert "unknown Meta-World task 'drawer-opne-v3'" in capsys.readouterr().err

