"""Preference records: loading from JSONL/Parquet/datasets folders, and up-front validation naming record and field."""

import json

import datasets
import pytest
import torch

from mmalign.data import LIST, PAIR, TRL_ROW, DataError, load_preferences, load_records
from mmalign.diffusion.data import PreferencePairs, collate_pairs, write_pickapic
from mmalign.diffusion.world import preference_pairs, render, png_bytes

ROWS = [{"prompt": "p0", "chosen": "a", "rejected": "b"}, {"prompt": "p1", "chosen": "c", "rejected": "d"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_loads_jsonl_parquet_and_datasets_folder(tmp_path):
    jsonl = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    assert load_preferences(jsonl, PAIR)["prompt"] == ["p0", "p1"]
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "pairs.parquet"))
    assert len(load_preferences(tmp_path / "pairs.parquet", PAIR)) == 2
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "saved"))
    assert load_preferences(tmp_path / "saved", PAIR)["chosen"] == ["a", "c"]
    with pytest.raises(DataError, match="no split 'test'"):
        load_records(tmp_path / "saved", split="test")


def test_every_bad_record_is_reported_with_index_and_field(tmp_path):
    rows = ROWS + [{"prompt": "", "chosen": "x", "rejected": "y"}, {"prompt": 3, "chosen": None, "rejected": "y"}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_preferences(path, PAIR)
    text = str(err.value)
    assert "bad.jsonl" in text and "nothing was trained" in text
    assert "record 2, field 'prompt': is empty" in text
    assert "record 3, field 'prompt': expected text" in text
    assert "record 3, field 'chosen': is missing" in text


def test_missing_field_and_unsupported_file(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "p", "chosen": "a"}])
    with pytest.raises(DataError, match="need field\\(s\\) rejected"):
        load_preferences(path, PAIR)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_records(tmp_path / "x.csv")
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "nothing.jsonl")


def test_list_and_trl_rows(tmp_path):
    lists = write_jsonl(tmp_path / "l.jsonl", [{"prompt": "p", "responses": ["a", "b", "c"], "labels": [2, 1]}])
    with pytest.raises(DataError, match="record 0, field 'labels': has 2 entries for 3 responses"):
        load_preferences(lists, LIST)
    chat = [{"role": "user", "content": "hi"}]
    trl = write_jsonl(tmp_path / "t.jsonl", [
        {"prompt": chat, "chosen": [{"role": "assistant", "content": "a"}],
         "rejected": [{"role": "assistant", "content": "b"}], "images": []},
        {"prompt": "p", "chosen": "a", "rejected": 5, "images": []}])
    with pytest.raises(DataError, match="record 1, field 'rejected'"):
        load_preferences(trl, TRL_ROW)


def test_pickapic_pairs_put_the_winner_first_and_drop_ties(tmp_path, pickapic):
    pairs = PreferencePairs(pickapic, resolution=32)
    records = pairs.records
    labels = records["label_0"]
    assert pairs.ties == labels.count(0.5) and len(pairs) == len(labels) - pairs.ties
    batch = collate_pairs([pairs[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 2, 3, 32, 32)
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
    for i in range(len(pairs)):
        row = pairs[i]["index"]
        winner_field = "jpg_0" if labels[row] == 1.0 else "jpg_1"
        expected = PreferencePairs._pixels(pairs, records[row][winner_field], row, winner_field)
        torch.testing.assert_close(pairs[i]["pixel_values"][0], expected)


def test_pickapic_images_as_file_paths(tmp_path):
    render("a red circle", 8, 16, 6).save(tmp_path / "left.png")
    render("a red circle", 24, 16, 6).save(tmp_path / "right.png")
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"caption": "a red circle", "jpg_0": "left.png",
                                                   "jpg_1": "right.png", "label_0": 0}])
    pairs = PreferencePairs(path, resolution=16)
    assert pairs[0]["pixel_values"].shape == (2, 3, 16, 16)


def test_pickapic_bad_rows_name_row_and_field(tmp_path):
    good = preference_pairs(3, seed=0)
    good[1]["jpg_1"] = b"not an image"
    good[2]["label_0"] = 0.7
    path = write_pickapic(good, tmp_path / "bad.parquet")
    with pytest.raises(DataError) as err:
        PreferencePairs(path, resolution=32)
    assert "record 1, field 'jpg_1': cannot be read" in str(err.value)
    assert "record 2, field 'label_0': must be 0, 0.5 or 1" in str(err.value)
    missing = write_jsonl(tmp_path / "m.jsonl", [{"caption": "c", "jpg_0": "gone.png",
                                                  "jpg_1": "gone.png", "label_0": 1}])
    with pytest.raises(DataError, match=r"record 0, field 'jpg_0': cannot be read \(image file .*gone.png does not exist"):
        PreferencePairs(missing, resolution=32)


def test_all_ties_is_an_error(tmp_path):
    rows = preference_pairs(2, seed=0)
    for r in rows:
        r["label_0"] = 0.5
    with pytest.raises(DataError, match="all 2 pairs are ties"):
        PreferencePairs(write_pickapic(rows, tmp_path / "ties.parquet"), resolution=32)


def test_truncated_image_fails_at_load_naming_the_row(tmp_path):
    data = png_bytes(render("a blue square", 16, 16, 6))
    rows = [{"caption": "a blue square", "jpg_0": data, "jpg_1": data[: len(data) // 2], "label_0": 1.0}]
    with pytest.raises(DataError, match="record 0, field 'jpg_1'"):
        pairs = PreferencePairs(write_pickapic(rows, tmp_path / "t.parquet"), resolution=32)
        pairs[0]
