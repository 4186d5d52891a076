"""Vision data builders on tiny inputs: BDHS masking and resampling, MIA-DPO layouts and attention ratio, rDPO retrieval
and masking; every builder writes rows the trainer reads."""

import json

import pytest
import torch

from mmalign.cli import main
from mmalign.vision.builders import bdhs
from mmalign.vision.data import VisionPairs, write_rows
from mmalign.vision.tiny import tiny_llava
from mmalign.vision.world import preference_rows


def test_image_mask_keeps_the_right_fraction_of_image_tokens():
    ids = torch.tensor([[4] * 20000 + [7] * 100])
    mask = bdhs.image_attention_mask(ids, torch.ones_like(ids), 4, 0.01, torch.Generator().manual_seed(0))
    kept = mask[0, :20000].float().mean().item()
    assert 0.008 < kept < 0.012 and mask[0, 20000:].all()  # about 1% of image tokens, every text token
    assert bdhs.image_attention_mask(ids, torch.ones_like(ids), 4, 0.0, torch.Generator())[0, :20000].sum() == 0


def test_sentences_and_bag_of_words_similarity():
    assert bdhs.sentences("A red circle. It is left! Two?") == ["A red circle.", " It is left!", " Two?"]
    assert bdhs.sentences(" red") == [" red"]
    assert bdhs.bow_cosine("a red circle", "A red circle") == pytest.approx(1.0)
    assert bdhs.bow_cosine("red", "blue") == 0.0
    assert bdhs.bow_cosine("red red blue", "red") == pytest.approx(2 / 5 ** 0.5)


def test_guided_generation_keeps_the_chosen_head_and_resamples_similar_answers(tmp_path):
    model, processor = tiny_llava(seed=0)
    rows = preference_rows(4, seed=0)
    sources = [{k: r[k] for k in ("prompt", "chosen", "images")} for r in rows]
    config = bdhs.Config(model="unused", data="unused", output=tmp_path, max_new_tokens=4, max_resamples=2)
    built, report = bdhs.build_rows(model, processor, sources, config)
    assert report["pairs"] + report["dropped_too_similar"] == 4 and report["pairs"] == len(built)
    assert report["samples_drawn"] >= 4 and 0 < report["acceptance_rate"] <= 1
    for row in built:
        assert row["rejected"].startswith(" ") and row["rejected"].endswith(" </s>")
        assert bdhs.bow_cosine(row["rejected"], row["chosen"]) < config.threshold
    # a model that always copies the chosen answer never yields a pair: every row is resampled, then dropped
    copy = lambda *args, **kw: " " + sources[0]["chosen"].split()[0]  # noqa: E731
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bdhs, "complete", copy)
        built, report = bdhs.build_rows(model, processor, sources[:1], config)
    assert built == [] and report["dropped_too_similar"] == 1 and report["samples_drawn"] == 3
    with pytest.MonkeyPatch.context() as mp:  # an empty completion (EOS at once) is drawn again too
        mp.setattr(bdhs, "complete", lambda *args, **kw: "")
        built, report = bdhs.build_rows(model, processor, [{**sources[0], "chosen": " red"}], config)
    assert built == [] and report["samples_drawn"] == 3
    # written rows are TRL rows the trainer reads back
    pairs = VisionPairs.load(write_rows(bdhs.build_rows(model, processor, sources, config)[0] or rows,
                                        tmp_path / "p.parquet"), processor)
    assert len(pairs[0]["rejected_ids"]) >= 1


def test_bdhs_command_writes_rows_and_a_report(tmp_path):
    model, processor = tiny_llava(seed=0)
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    sources = [{k: r[k] for k in ("prompt", "chosen", "images")} for r in preference_rows(6, seed=1)]
    data = write_rows(sources, tmp_path / "src.parquet")
    assert main(["vision", "bdhs", "--model", str(tmp_path / "m"), "--data", str(data), "--output",
                 str(tmp_path / "out"), "--max-new-tokens", "3"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["method"] == "BDHS" and report["rows"] == 6 and report["examples"]
    assert len(VisionPairs.load(tmp_path / "out" / "train.parquet", processor)) == report["pairs"]


def test_mia_dpo_composers_lay_out_the_images():
    from PIL import Image

    from mmalign.vision.builders import mia_dpo

    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    images = [Image.new("RGB", (32, 32), c) for c in colours]
    row = mia_dpo.compose_sequence(images[:3], 1, "what colour is it ?")
    assert row["prompt"].count("<image>") == 3 and "in image2 ," in row["prompt"] and len(row["images"]) == 3
    grid = mia_dpo.compose_grid(images, 3, "what colour is it ?")["images"][0]
    assert grid.size == (64, 64) and grid.getpixel((48, 48)) == colours[3] and grid.getpixel((48, 16)) == colours[1]
    assert mia_dpo.compose_grid(images[:3], 0, "q")["images"][0].size == (96, 32)
    inset = mia_dpo.compose_pic_in_pic(images[0], images[2], "q")["images"][0]
    assert inset.getpixel((16, 16)) == colours[0] and inset.getpixel((1, 1)) == colours[2]  # 70% red inset on blue
    with pytest.raises(ValueError, match="grid layout takes 2, 3, 4, 6, 9"):
        mia_dpo.compose_grid(images[:1] * 5, 0, "q")


def test_mia_dpo_attention_ratio_and_target_tokens_by_hand():
    from mmalign.vision.builders import mia_dpo

    attn = torch.zeros(2, 1, 6)  # 2 heads, one answer query, keys: 2 text + 2 image A + 2 image B
    attn[0, 0] = torch.tensor([0.2, 0.0, 0.3, 0.1, 0.2, 0.2])
    attn[1, 0] = torch.tensor([0.0, 0.2, 0.1, 0.1, 0.4, 0.2])
    image = torch.tensor([False, False, True, True, True, True])
    target = torch.tensor([False, False, True, True, False, False])
    # heads averaged: image A gets (0.4 + 0.2) / 2 = 0.3, image B (0.4 + 0.6) / 2 = 0.5
    assert mia_dpo.attention_ratio(attn, target, image) == pytest.approx(0.3 / 0.8)

    ids = torch.tensor([9] + [4] * 16 + [9])  # one 4x4 patch grid holding a 2x2 collage
    keys = mia_dpo.target_keys(ids, 4, {"layout": "grid", "count": 4, "target": 1})
    patches = keys[1:17].view(4, 4)
    assert patches[:2, 2:].all() and patches.sum() == 4  # cell 2 (top right) = rows 0-1, columns 2-3
    seq = mia_dpo.target_keys(torch.tensor([4] * 6), 4, {"layout": "sequence", "count": 3, "target": 2})
    assert seq.tolist() == [False] * 4 + [True] * 2
    assert mia_dpo.is_rejected("red", "blue", 0.45, "grid", 4, 0.9)
    assert not mia_dpo.is_rejected("red", "blue", 0.45, "grid", 6, 0.9)
    assert not mia_dpo.is_rejected("blue", "blue", 0.1, "sequence", 2, 0.9)


def test_mia_dpo_builds_trl_rows_from_the_model(tmp_path):
    from mmalign.vision.builders import mia_dpo
    from mmalign.vision.world import qa_rows

    model, processor = tiny_llava(seed=0)
    rows, report = mia_dpo.build_rows(model, processor, qa_rows(12, seed=0), "sequence", 2)
    assert report["composed"] == 6 and report["pairs"] == len(rows) <= report["wrong"]
    if rows:
        pairs = VisionPairs.load(write_rows(rows, tmp_path / "m.parquet"), processor)
        assert pairs[0]["images"]["pixel_values"].shape[0] == 2


def test_rdpo_retrieval_returns_the_nearest_other_image():
    from mmalign.vision.builders.rdpo import RetrievalIndex

    pool = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    index = RetrievalIndex(pool)
    assert index.nearest(pool, k=1, exclude=torch.arange(4))[:, 0].tolist() == [1, 0, 1, 2]
    assert index.nearest(torch.tensor([[0.1, 1.0]]), k=2).tolist() == [[2, 1]]


def test_rdpo_masks_only_vocabulary_words_and_keeps_v_prime(tmp_path):
    from mmalign.vision.builders import rdpo
    from mmalign.vision.world import COLOURS, SHAPES

    model, processor = tiny_llava(seed=0)
    rows = [{k: r[k] for k in ("prompt", "chosen", "images")} for r in preference_rows(6, seed=0)]
    rows[0]["chosen"] = " the red circle is there </s>"
    vocabulary = {*COLOURS, *SHAPES}
    filled = rdpo.fill_masked(model, processor, rows[0]["prompt"], rows[1]["images"][0], rows[0]["chosen"], vocabulary)
    kept = [(a, b) for a, b in zip(rows[0]["chosen"].split(" "), filled.split(" ")) if a not in vocabulary]
    assert len(filled.split(" ")) == len(rows[0]["chosen"].split(" ")) and all(a == b for a, b in kept)
    built, report = rdpo.build_rows(model, processor, rows, vocabulary)
    assert report["pairs"] == len(built) and all(len(r["retrieved_images"]) == 1 for r in built)
    if built:
        pairs = VisionPairs.load(write_rows(built, tmp_path / "r.parquet"), processor, retrieved=True)
        assert pairs[0]["retrieved_images"]["pixel_values"].shape == pairs[0]["images"]["pixel_values"].shape


@pytest.mark.parametrize("command", ["mia-dpo", "rdpo"])
def test_builder_commands_write_rows_the_trainer_reads(command, tmp_path):
    from pathlib import Path

    from mmalign.vision.world import qa_rows

    assets = Path(__file__).resolve().parents[1] / "assets" / "tiny-llava"
    qa = qa_rows(12, seed=3)
    if command == "mia-dpo":
        rows, flags = [{"question": r["question"], "answer": r["answer"], "images": [r["image"]]} for r in qa], []
    else:
        rows = [{"prompt": f"<image> question : {r['question']} answer :", "chosen": f" {r['answer']} </s>",
                 "images": [r["image"]]} for r in qa]
        flags = ["--vocabulary", "red", "green", "blue", "yellow", "circle", "square", "triangle", "nothing"]
    data = write_rows(rows, tmp_path / "src.parquet")
    assert main(["vision", command, "--model", str(assets), "--data", str(data), "--output", str(tmp_path / "out"),
                 *flags]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    pairs = VisionPairs.load(tmp_path / "out" / "train.parquet", tiny_llava()[1], retrieved=command == "rdpo")
    assert len(pairs) == report["pairs"] > 0 and pairs[0]["rejected_ids"]
