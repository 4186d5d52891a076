"""Preference records: loading from JSONL/Parquet/datasets folders, and up-front validation naming record and field."""

import dataclasses
import json

import datasets
import pytest
import torch

from mmalign.data import LIST, PAIR, TRL_ROW, DataError, load_preferences, load_records
from mmalign.diffusion.data import PreferencePairs, collate_pairs, write_pickapic
from mmalign.diffusion.world import png_bytes, preference_pairs, render
from mmalign.errors import BadRow

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
    """Labels are checked up front; an image when its row is loaded (a `BadRow` naming the row and field)."""
    good = preference_pairs(3, seed=0)
    good[1]["jpg_1"] = b"not an image"
    good[2]["label_0"] = 0.7
    with pytest.raises(DataError, match=r"1 problem\(s\).*\n  record 2, field 'label_0': must be 0, 0.5 or 1"):
        PreferencePairs(write_pickapic(good, tmp_path / "bad.parquet"), resolution=32)
    good[2]["label_0"] = 1.0
    pairs = PreferencePairs(write_pickapic(good, tmp_path / "bad-image.parquet"), resolution=32)
    with pytest.raises(BadRow, match="record 1, field 'jpg_1': cannot be read") as err:
        pairs[1]
    assert (err.value.index, err.value.field) == (1, "jpg_1") and err.value.source.endswith("bad-image.parquet")
    missing = write_jsonl(tmp_path / "m.jsonl", [{"caption": "c", "jpg_0": "gone.png",
                                                  "jpg_1": "gone.png", "label_0": 1}])
    with pytest.raises(DataError,
                       match=r"record 0, field 'jpg_0': cannot be read \(image file .*gone.png does not exist"):
        PreferencePairs(missing, resolution=32)[0]


def test_cheap_checks_are_vectorised_and_remembered(tmp_path, capsys):
    """Only the rows the column pre-checks flag are checked one by one; a dataset that passed is not checked again."""
    rows = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(2000)]
    rows[1500]["prompt"] = " "
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(DataError, match="1 problem.*\n  record 1500, field 'prompt': is empty$"):
        load_preferences(path, PAIR)
    checked = []
    original = PAIR.fields[0].check
    field = dataclasses.replace(PAIR.fields[0], check=lambda value, record: checked.append(value) or original(value,
                                                                                                         record))
    schema = dataclasses.replace(PAIR, fields=(field, *PAIR.fields[1:]))
    with pytest.raises(DataError):
        load_preferences(path, schema)
    assert checked == [" "]
    rows[1500]["prompt"] = "p"
    path = write_jsonl(tmp_path / "fixed.jsonl", rows)
    capsys.readouterr()
    load_preferences(path, PAIR)
    load_preferences(path, PAIR)
    assert capsys.readouterr().err.count("2000 pair records checked") == 1


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


UNREADABLE = [  # a file name, its bytes, and the error expected
    ("broken.jsonl", b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n\n{"prompt": "p", "chosen": \n',
     r"broken.jsonl: line 3, column 27: not valid JSON"),
    ("empty.jsonl", b"", "empty.jsonl: holds no records"),
    ("blank.jsonl", b"\n  \n", "blank.jsonl: holds no records"),
    ("latin1.jsonl", '{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "café"}\n'.encode("latin-1"),
     r"latin1.jsonl: line 2 is not UTF-8 text \(byte 0xe9\)"),
    ("list.jsonl", b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n["p", "a", "b"]\n',
     "list.jsonl: line 2: expected a JSON object"),
    ("broken.json", b'[{"prompt": "p", "chosen": "a", "rejected": "b"},\n {"prompt": }]',
     r"broken.json: line 2, column"),
    ("empty.parquet", b"", "empty.parquet: not a Parquet file"),
]


@pytest.mark.parametrize("name, content, problem", UNREADABLE, ids=[case[0] for case in UNREADABLE])
def test_a_file_that_cannot_be_read_names_itself_and_the_line(tmp_path, name, content, problem):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=problem):
        load_records(tmp_path / name)


def test_a_parquet_file_without_rows_holds_no_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), str(tmp_path / "zero.parquet"))
    with pytest.raises(DataError, match="zero.parquet: holds no records"):
        load_records(tmp_path / "zero.parquet")


def test_a_hub_dataset_that_cannot_be_had_fails_at_once(monkeypatch):
    """Offline (HF_HUB_OFFLINE, set for the tests): `datasets` looks in its cache and stops. Online without a network:
    one request to the hub, no retries."""
    import time

    import huggingface_hub

    start = time.monotonic()
    with pytest.raises(DataError, match="someone/no-such-dataset: no such file or folder here, and the hub dataset"):
        load_records("someone/no-such-dataset")
    calls = []

    def no_network(self, repo_id, **kwargs):
        calls.append(repo_id)
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", no_network)
    with pytest.raises(DataError, match=r"the hub cannot be reached \(ConnectionError: Name or service not known\); "
                                        "to use copies in the local cache, set HF_HUB_OFFLINE=1"):
        load_records("someone/no-such-dataset")
    assert calls == ["someone/no-such-dataset"]
    assert time.monotonic() - start < 10


def test_image_paths_stay_inside_the_data_folder_unless_allowed(tmp_path):
    render("a red circle", 8, 16, 6).save(tmp_path / "left.png")
    (tmp_path / "data").mkdir()
    render("a red circle", 24, 16, 6).save(tmp_path / "data" / "right.png")
    path = write_jsonl(tmp_path / "data" / "pairs.jsonl", [{"caption": "a red circle", "jpg_0": "../left.png",
                                                            "jpg_1": str(tmp_path / "data" / "right.png"),
                                                            "label_0": 1}])
    with pytest.raises(DataError) as err:  # found up front: no image is read for it
        PreferencePairs(path, resolution=16)
    message = str(err.value)
    assert "record 0, field 'jpg_0': cannot be read (image path: '../left.png' is outside the data folder" in message
    assert "record 0, field 'jpg_1': cannot be read (image path: " in message and "is an absolute path" in message
    assert PreferencePairs(path, resolution=16, allow_outside_paths=True)[0]["pixel_values"].shape == (2, 3, 16, 16)
