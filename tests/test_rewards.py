"""Reward models: scores equal open_clip's own encoders by hand, ranking, video, save/load, calibration, bad input."""

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from mmalign.diffusion import world
from mmalign.diffusion.data import PreferencePairs, collate_pairs, write_pickapic
from mmalign.diffusion.rewards import load_scorer, save_scorer
from mmalign.diffusion.rewards.pairs import select_pairs
from mmalign.diffusion.rewards.relabel import ai_feedback_labels
from mmalign.diffusion.rewards.score import pair_metrics, score_pairs
from mmalign.diffusion.rewards.train import bradley_terry_step, select_trainable
from mmalign.errors import ConfigError
from mmalign.objectives import bradley_terry_loss
from mmalign.stats import expected_calibration_error

ARCH = Path(__file__).resolve().parents[1] / "assets" / "tiny-clip.json"
PROMPTS = ["a red circle", "a blue square", "a red circle", "a green triangle"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny CLIP scorer and an aesthetic scorer on it, each saved as a scorer folder."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("scorers")
    clip = save_scorer(load_scorer(ARCH), root / "clip")
    aesthetic = save_scorer(load_scorer(clip, kind="aesthetic", head_hidden=[16]), root / "aesthetic")
    return {"clip": clip, "aesthetic": aesthetic}


def scenes(n, seed=0):
    rng = np.random.default_rng(seed)
    return [world.random_scene(rng, PROMPTS[i % len(PROMPTS)])[1] for i in range(n)]


def test_clip_score_is_logit_scale_times_cosine_from_open_clip_itself(saved):
    scorer = load_scorer(saved["clip"])
    peer, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{saved['clip']}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{saved['clip']}")
    pil = scenes(4)
    with torch.no_grad():
        image = peer.encode_image(torch.stack([preprocess(im) for im in pil]))
        text = peer.encode_text(tokenizer(PROMPTS))
        expected = peer.logit_scale.exp() * F.cosine_similarity(image, text, dim=-1)
    torch.testing.assert_close(scorer.score(pil, PROMPTS), expected, rtol=1e-5, atol=1e-5)
    tensors = torch.stack([world.pil_to_tensor(im) for im in pil])  # [0, 1] tensors take the same path
    torch.testing.assert_close(scorer.score(tensors, PROMPTS), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scorer.score(tensors, PROMPTS, batch_size=3), scorer(tensors, PROMPTS).detach())


def test_aesthetic_score_is_a_head_on_the_normalised_image_embedding(saved):
    scorer = load_scorer(saved["aesthetic"])
    assert scorer.kind == "aesthetic" and [type(m).__name__ for m in scorer.head] == ["Linear", "ReLU", "Linear"]
    images = torch.stack([world.pil_to_tensor(im) for im in scenes(3)])
    with torch.no_grad():
        embedding = F.normalize(scorer.clip.encode_image(scorer.pixels(images)), dim=-1)
        expected = scorer.head[2](torch.relu(scorer.head[0](embedding))).squeeze(-1)
    torch.testing.assert_close(scorer.score(images), expected)
    torch.testing.assert_close(scorer.score(images, PROMPTS[:3]), expected)  # prompts are allowed and ignored


def test_rank_is_the_bradley_terry_probability_and_video_averages_frames(saved):
    scorer = load_scorer(saved["clip"])
    images = torch.stack([world.pil_to_tensor(im) for im in scenes(4)])
    s = scorer.score(images, PROMPTS)
    p = scorer.rank(PROMPTS[0], images[0], images[1])
    assert p.dim() == 0
    torch.testing.assert_close(p, torch.sigmoid(s[0] - scorer.score(images[1:2], PROMPTS[:1])[0]))
    both = scorer.rank(PROMPTS[:2], images[:2], images[2:])
    torch.testing.assert_close(both + scorer.rank(PROMPTS[:2], images[2:], images[:2]), torch.ones(2))
    video = torch.stack([images[:3], images[1:]])  # [2, 3 frames, 3, H, W]
    prompts = ["a red circle", "a blue square"]
    frame_scores = scorer.score(video.flatten(0, 1), [p for p in prompts for _ in range(3)]).view(2, 3)
    torch.testing.assert_close(scorer.score(video, prompts), frame_scores.mean(dim=1))


def test_a_checkpoint_file_loads_through_open_clips_pretrained_path(saved):
    scorer = load_scorer(saved["clip"])
    checkpoint = saved["clip"] / "open_clip_model.safetensors"
    images = torch.stack([world.pil_to_tensor(im) for im in scenes(4)])
    from_file = load_scorer(ARCH, pretrained=str(checkpoint))  # the PickScore/HPSv2 way: architecture + checkpoint
    torch.testing.assert_close(from_file.score(images, PROMPTS), scorer.score(images, PROMPTS))
    assert json.loads((saved["aesthetic"] / "scorer.json").read_text()) == {"kind": "aesthetic", "head_hidden": [16]}


def test_bad_input_gets_clear_errors(saved, tmp_path):
    scorer = load_scorer(saved["clip"])
    images = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match="need one prompt per image: 2 images, 3 prompts"):
        scorer.score(images, PROMPTS[:3])
    with pytest.raises(ValueError, match="needs one prompt per image; got none"):
        scorer.score(images)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        scorer.score(images * 2 - 1, PROMPTS[:2])
    with pytest.raises(ValueError, match="NaN or infinite"):
        scorer.score(torch.full((2, 3, 32, 32), float("nan")), PROMPTS[:2])
    with pytest.raises(ValueError, match=r"tensor \[B,3,H,W\]"):
        scorer.score(torch.rand(2, 1, 32, 32), PROMPTS[:2])

    other = json.loads(ARCH.read_text())
    other["vision_cfg"]["width"] = 32
    other_arch = tmp_path / "tiny-clip-narrow.json"
    other_arch.write_text(json.dumps(other))
    checkpoint = saved["clip"] / "open_clip_model.safetensors"
    with pytest.raises(ConfigError, match=rf"checkpoint {checkpoint} does not match the open_clip architecture of "
                                          rf".*tiny-clip-narrow.json.*size mismatch"):
        load_scorer(other_arch, pretrained=str(checkpoint))
    with pytest.raises(ConfigError, match="neither a checkpoint file nor an open_clip tag of ViT-B-32"):
        load_scorer("ViT-B-32", pretrained="no-such-tag")
    with pytest.raises(ConfigError, match="'ViT-Nope' is not an open_clip architecture"):
        load_scorer("ViT-Nope")
    with pytest.raises(ConfigError, match="has no open_clip_config.json"):
        load_scorer(tmp_path)
    (saved["aesthetic"] / "broken").mkdir()
    broken = saved["aesthetic"] / "broken"
    for name in ("open_clip_config.json", "open_clip_model.safetensors", "scorer.json"):
        (broken / name).write_bytes((saved["aesthetic"] / name).read_bytes())
    (broken / "scorer.json").write_text(json.dumps({"kind": "aesthetic", "head_hidden": [8]}))
    head = "aesthetic_head.safetensors"
    (broken / head).write_bytes((saved["aesthetic"] / head).read_bytes())
    with pytest.raises(ConfigError, match="aesthetic head .* does not fit embed_dim 32 and hidden widths \\[8\\]"):
        load_scorer(broken)
    (broken / "scorer.json").write_text('{"kind": "aesthetic", ')
    with pytest.raises(ConfigError, match=r"scorer file .*broken/scorer.json is not valid JSON"):
        load_scorer(broken)
    (broken / "scorer.json").write_text(json.dumps({"kind": "aesthetic", "head_hidden": [0]}))
    with pytest.raises(ConfigError, match=r"broken/scorer.json: 'head_hidden' must be a list of positive integers"):
        load_scorer(broken)
    (broken / "open_clip_config.json").write_text("[]")
    with pytest.raises(ConfigError, match=r"open_clip config .*broken/open_clip_config.json must hold a JSON object"):
        load_scorer(broken)


class RunsCode:
    """A pickle payload: unpickling it would create the file `path` (arbitrary code)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_checkpoint_that_would_run_code_is_refused_naming_it(tmp_path):
    evidence = tmp_path / "code-ran"
    checkpoint = tmp_path / "evil.pt"
    torch.save({"state_dict": RunsCode(evidence)}, checkpoint)
    torch.load(checkpoint, weights_only=False)  # the payload works: unpickling it creates the file
    assert evidence.exists()
    evidence.unlink()
    with pytest.raises(ConfigError, match=rf"checkpoint {checkpoint} was not loaded: it holds Python objects"):
        load_scorer(ARCH, pretrained=str(checkpoint))
    assert not evidence.exists()


def test_expected_calibration_error_by_hand():
    p = torch.tensor([0.05, 0.15, 0.12, 0.95, 0.85, 0.55])
    y = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.5])
    # bins of width 0.1: [0,.1): {0.05 | 0}, [.1,.2): {0.15, 0.12 | 1, 0}, [.5,.6): {0.55 | 0.5}, [.8,.9): {0.85 | 1},
    # [.9,1]: {0.95 | 1}
    expected = (abs(0.05 - 0) + abs(0.27 - 1) + abs(0.55 - 0.5) + abs(0.85 - 1) + abs(0.95 - 1)) / 6
    assert expected_calibration_error(p, y) == pytest.approx(expected)
    assert expected_calibration_error([1.0, 0.0], [1.0, 0.0]) == 0.0
    with pytest.raises(ValueError, match="as many outcomes"):
        expected_calibration_error([0.5], [1.0, 0.0])


def test_pair_metrics_by_hand():
    first, second = torch.tensor([2.0, 0.0, 1.0, -1.0]), torch.tensor([0.0, 1.0, 1.0, 0.0])
    label = torch.tensor([1.0, 1.0, 0.5, 0.0])
    m = pair_metrics(first, second, label)
    assert (m["pairs"], m["ties"]) == (4, 1)
    assert m["accuracy"] == pytest.approx(2 / 3)  # right on pairs 0 and 3, wrong on 1; the tie is not counted
    assert m["bt_loss"] == pytest.approx(float(bradley_terry_loss(first, second, soft_label=label).mean()))
    p = torch.sigmoid(first - second)
    assert m["ece"] == pytest.approx(expected_calibration_error(torch.cat([p, 1 - p]), torch.cat([label, 1 - label])))


def test_pairing_strategies_and_ai_feedback_labels():
    scores = torch.tensor([0.25, 1.0, 0.625, 0.0])  # gaps: (1,3) 1, (1,0) .75, (2,3) .625, (1,2) .375, (2,0) .375
    assert select_pairs(scores) == [(1, 3)]
    assert select_pairs(scores, margin=1.5) == []
    assert select_pairs(scores, "margin", margin=0.5) == [(1, 3), (1, 0), (2, 3)]
    assert select_pairs(scores, "margin", margin=0.5, max_pairs=2) == [(1, 3), (1, 0)]
    assert select_pairs(scores, "margin", margin=0.5, min_chosen_score=0.8) == [(1, 3), (1, 0)]
    assert select_pairs(torch.ones(3), "margin") == []  # equal scores are no preference
    labels = ai_feedback_labels(torch.tensor([1.0, 0.0, 0.5, 0.3]), torch.tensor([0.0, 1.0, 0.5, 0.25]), tie_margin=0.1)
    assert labels.tolist() == [1.0, 0.0, 0.5, 0.5]
    assert ai_feedback_labels(torch.tensor([0.5]), torch.tensor([0.5])).tolist() == [1.0]  # the official rule


def test_bradley_terry_step_matches_the_core_objective_on_stored_pairs(saved, pickapic):
    scorer = load_scorer(saved["clip"])
    select_trainable(scorer, "visual")
    assert not any(p.requires_grad for p in scorer.clip.transformer.parameters())
    assert all(p.requires_grad for p in scorer.clip.visual.parameters()) and scorer.clip.logit_scale.requires_grad
    pairs = PreferencePairs(pickapic, resolution=scorer.image_size, as_stored=True)
    assert len(pairs) == len(pairs.records) and pairs.ties > 0  # ties are kept as soft labels
    batch = collate_pairs([pairs[i] for i in range(len(pairs))])
    loss, metrics = bradley_terry_step(scorer, batch, torch.Generator())
    first, second, label = score_pairs(scorer, pairs, batch_size=5)
    torch.testing.assert_close(label, torch.tensor(pairs.records["label_0"], dtype=torch.float32))
    expected = bradley_terry_loss(first, second, soft_label=label).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-4)
    assert metrics["pair_acc"] == pytest.approx(pair_metrics(first, second, label)["accuracy"], abs=1e-6)
    loss.backward()
    assert scorer.clip.visual.conv1.weight.grad is not None and scorer.clip.token_embedding.weight.grad is None


def test_placement_agreement_of_pairs(pickapic, tmp_path):
    pairs = PreferencePairs(pickapic, resolution=32)
    assert world.placement_agreement(pairs) == 1.0  # the world's pairs are labelled by placement
    rows = [{**r, "label_0": 1.0 - r["label_0"]} for r in world.preference_pairs(24, seed=3) if r["label_0"] != 0.5]
    assert world.placement_agreement(PreferencePairs(write_pickapic(rows, tmp_path / "flipped.parquet"), 32)) == 0.0
