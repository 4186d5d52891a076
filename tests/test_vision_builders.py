"""Vision data builders on tiny inputs: BDHS masking, sentences, similarity, guided rejected responses, rows out."""

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
