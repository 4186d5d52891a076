"""Vision DPO: log-probs by hand, TRL's loss at step 0, one image encoding per pair, truncation errors, references."""

import math

import datasets
import pytest
import torch

from mmalign.data import DataError
from mmalign.reference import AdapterDisabled, CachedScores, FrozenCopy
from mmalign.vision import dpo, models
from mmalign.vision.data import VisionPairs, collate_pairs, write_rows
from mmalign.vision.scoring import image_features, packed_scores, sequence_scores
from mmalign.vision.tiny import tiny_llava
from mmalign.vision.world import preference_rows


@pytest.fixture(scope="module")
def tiny():
    return tiny_llava(seed=0)


def batch_of(rows, processor, tmp_path, visual=False, max_length=None, name="rows.parquet"):
    pairs = VisionPairs.load(write_rows(rows, tmp_path / name), processor, max_length,
                             retrieved="retrieved_images" in rows[0])
    return collate_pairs([pairs[i] for i in range(len(pairs))], processor.tokenizer.pad_token_id, visual=visual)


def config(tmp_path, **kw):
    return dpo.Config(model="unused", data="unused", output=tmp_path / "run", **kw)


def test_sequence_scores_equal_a_hand_computation(tiny, tmp_path):
    model, processor = tiny
    rows = preference_rows(3, seed=0)
    rows[1]["chosen"] = " two objects are there </s>"  # rows of different lengths share the padded batch
    batch = batch_of(rows, processor, tmp_path)
    with torch.no_grad():
        scores = sequence_scores(model, batch)
        torch.testing.assert_close(packed_scores(model, batch), scores, rtol=0, atol=1e-5)
    assert scores.shape == (3, 2)
    tok = processor.tokenizer
    for i, row in enumerate(rows):
        for k, key in enumerate(("chosen", "rejected")):
            prompt = processor(images=row["images"], text=row["prompt"], add_special_tokens=False, return_tensors="pt")
            completion = tok(row[key], add_special_tokens=False)["input_ids"]
            ids = torch.cat([prompt["input_ids"][0], torch.tensor(completion)])[None]
            with torch.no_grad():
                logp = model(input_ids=ids, pixel_values=prompt["pixel_values"]).logits[0].log_softmax(-1)
            n = prompt["input_ids"].shape[1]
            by_hand = sum(logp[n - 1 + j, t].item() for j, t in enumerate(completion))
            assert scores[i, k].item() == pytest.approx(by_hand, abs=1e-4)


@pytest.mark.parametrize("conversational", [False, True])
def test_step0_loss_equals_trl_dpo_trainer(conversational, trl_step0):
    scored = trl_step0(tiny_llava, preference_rows(4, seed=2, conversational=conversational))
    torch.testing.assert_close(*scored["loss"], rtol=1e-5, atol=1e-6)  # a different reference: the loss is not log 2
    torch.testing.assert_close(*scored["logps"], rtol=1e-5, atol=1e-4)


def test_images_are_encoded_once_per_pair(tmp_path):
    model, processor = tiny_llava(seed=0)
    model = models.add_lora(model, 4, None, models.LORA_TARGETS)
    calls = []
    model.get_base_model().model.vision_tower.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    parts = dpo.Parts(AdapterDisabled(), config(tmp_path), share_features=models.vision_is_frozen(model))
    batch = batch_of(preference_rows(3, seed=0), processor, tmp_path)
    loss, metrics = dpo.dpo_step(model, batch, torch.Generator().manual_seed(0), parts)
    assert parts.share_features and calls == [3]  # one call, 3 images, for chosen, rejected and the reference
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # the LoRA starts at zero: policy = reference

    calls.clear()
    full, _ = tiny_llava(seed=0)
    parts = dpo.Parts(FrozenCopy(full), config(tmp_path, full=True, train_vision=True), share_features=False)
    full.model.vision_tower.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    dpo.dpo_step(full, batch, torch.Generator().manual_seed(0), parts)
    assert calls == [3]  # the policy's one call; the frozen copy encodes with its own tower


def test_multi_image_prompt_and_visual_rows(tiny, tmp_path):
    model, processor = tiny
    rows = preference_rows(4, seed=0)
    two = [{**rows[0], "prompt": "<image> <image> " + rows[0]["prompt"].replace("<image> ", ""),
            "images": [rows[0]["images"][0], rows[1]["images"][0]], "retrieved_images": [rows[2]["images"][0]] * 2},
           {**rows[3], "retrieved_images": [rows[1]["images"][0]]}]
    batch = batch_of(two, processor, tmp_path, visual=True)
    assert batch["image_order"].tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5]
    batch = dpo.with_visual_images(batch, None, config(tmp_path, visual_term="retrieved"))
    assert batch["images"]["pixel_values"].shape[0] == 6
    with torch.no_grad():
        scores = sequence_scores(model, batch)
        feats = image_features(model, batch)
    assert scores.shape == (2, 3)
    # the v' row is the chosen row shown the retrieved images: scored alone it gives the same number
    v_prime = batch["images"]["pixel_values"][3:]
    swapped = {**batch, "images": {"pixel_values": torch.cat([v_prime] * 2)}}  # every row sees v'
    with torch.no_grad():
        under_retrieved = sequence_scores(model, swapped)
    torch.testing.assert_close(scores[:, 2], under_retrieved[:, 0], rtol=1e-5, atol=1e-5)
    assert len(feats) == 6 and scores[0, 0] != scores[0, 2]


def test_visual_and_anchor_terms_by_hand(tmp_path):
    policy = torch.tensor([[-2.0, -3.0, -4.0]])
    ref = torch.tensor([[-2.5, -2.5, -3.0]])
    cfg = config(tmp_path, beta=0.5, visual_term="corrupted", visual_weight=0.7, anchor_weight=0.3)
    loss, metrics = dpo.vision_dpo_loss(policy, ref, torch.ones(1, 3), cfg)
    r_w, r_l, r_v = 0.5, -0.5, -1.0
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    dpo_part = -math.log(sig(0.5 * (r_w - r_l)))
    visual, anchor = -math.log(sig(0.5 * (r_w - r_v))), -math.log(sig(0.5 * r_w))
    assert loss.item() == pytest.approx(dpo_part + 0.7 * visual + 0.3 * anchor, rel=1e-6)
    assert metrics["visual_loss"].item() == pytest.approx(visual)
    assert metrics["anchor_loss"].item() == pytest.approx(anchor)
    assert metrics["dpo_loss"].item() == pytest.approx(dpo_part)
    cfg.dpo_weight = 0.0  # mDPO's image-conditioned terms alone
    loss, _ = dpo.vision_dpo_loss(policy, ref, torch.ones(1, 3), cfg)
    assert loss.item() == pytest.approx(0.7 * visual + 0.3 * anchor, rel=1e-6)


def test_corrupted_images_are_small_crops_drawn_from_the_generator():
    pixels = torch.linspace(-1, 1, 2 * 3 * 32 * 32).view(2, 3, 32, 32)
    a = dpo.corrupt_images(pixels, torch.Generator().manual_seed(0))
    b = dpo.corrupt_images(pixels, torch.Generator().manual_seed(0))
    assert a.shape == pixels.shape and torch.equal(a, b) and not torch.allclose(a, pixels)
    assert (a.amax((1, 2, 3)) - a.amin((1, 2, 3)) < pixels.amax((1, 2, 3)) - pixels.amin((1, 2, 3))).all()


def test_truncation_that_would_cut_image_tokens_names_the_row(tiny, tmp_path):
    _, processor = tiny
    rows = preference_rows(3, seed=0)
    rows[1]["prompt"] = "describe the image . " * 3 + rows[1]["prompt"]  # image tokens at positions 12-27
    rows[2]["prompt"] = rows[2]["prompt"] + " describe the image ." * 3  # image tokens first, 38 tokens in all
    path = write_rows(rows, tmp_path / "r.parquet")
    with pytest.raises(DataError) as err:  # every row checked before anything trains
        VisionPairs.load(path, processor, max_length=27)
    assert "r.parquet: 2 row(s) cannot be trained on; nothing was trained" in str(err.value)
    assert "record 1: max_length 27 would cut image tokens (the prompt has 38 tokens, its last image token at " \
           "position 27)" in str(err.value)
    assert "record 2: the prompt has 38 tokens, leaving no room for the 'chosen' completion" in str(err.value)
    # the same rules hold item by item (models whose image token count varies are only checked there)
    pairs = VisionPairs(datasets.Dataset.from_parquet(str(path)), processor, max_length=27, source="r.parquet")
    assert len(pairs[0]["chosen_ids"]) == 1  # completions are cut to fit: 26 prompt tokens + 1
    with pytest.raises(DataError, match=r"r.parquet: record 1, field 'chosen': max_length 27 would cut image tokens"):
        pairs[1]
    with pytest.raises(DataError, match=r"r.parquet: record 2, field 'chosen': the prompt has 38 tokens, leaving no"):
        pairs[2]
    assert len(VisionPairs.load(path, processor, max_length=38 + 2)) == 3


def test_bad_rows_are_named_before_training(tiny, tmp_path):
    _, processor = tiny
    rows = preference_rows(3, seed=0)
    rows[1]["prompt"] = rows[1]["prompt"].replace("<image> ", "")
    with pytest.raises(DataError, match=r"record 1, field 'prompt': has 0 <image> placeholder\(s\) for 1 image"):
        VisionPairs.load(write_rows(rows, tmp_path / "bad.parquet"), processor)


def test_cached_reference_equals_adapter_reference(tmp_path):
    model, processor = tiny_llava(seed=0)
    model = models.add_lora(model, 4, None, models.LORA_TARGETS)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a trained adapter: policy and reference now differ
    pairs = VisionPairs.load(write_rows(preference_rows(5, seed=0), tmp_path / "r.parquet"), processor)
    collate = lambda items: collate_pairs(items, 0)  # noqa: E731
    loader = torch.utils.data.DataLoader(pairs, 2, collate_fn=collate)
    cache = CachedScores.build(AdapterDisabled(), sequence_scores, model, loader, 5)
    batch = collate([pairs[i] for i in (4, 1)])
    live = AdapterDisabled().scores(sequence_scores, model, batch)
    torch.testing.assert_close(cache.scores(sequence_scores, model, batch), live, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(sequence_scores(model, batch).detach(), live)


def test_config_rejects_bad_combinations(tmp_path):
    with pytest.raises(ValueError, match="reference cached needs fixed images"):
        config(tmp_path, reference="cached", visual_term="corrupted")
    with pytest.raises(ValueError, match="reference frozen is for --full"):
        config(tmp_path, reference="frozen")
    with pytest.raises(ValueError, match="nothing would be trained"):
        config(tmp_path, dpo_weight=0)
    with pytest.raises(ValueError, match="beta must be a positive finite number"):
        config(tmp_path, beta=0)
