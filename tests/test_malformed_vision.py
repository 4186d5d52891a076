"""Malformed inputs to `mmalign vision dpo`, the vision demo and the pair builders: each is refused with one message
naming the file, record and field (exit 1 or 2, no traceback), before anything is written or trained, except an
image that cannot be read in training, which stops the run at its row; plus the 16-bit image conversion and the
image-count check they rely on."""

import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.data import DataError
from mmalign.vision.data import VisionPairs, image_slots, images_match, open_image
from mmalign.vision.tiny import tiny_llava

QUESTION = "question : what colour is the circle ? answer :"
ROW = {"prompt": f"<image> {QUESTION}", "chosen": " red </s>", "rejected": " blue </s>", "images": ["a.png"]}
CHAT = {"prompt": [{"role": "user", "content": "what colour is the circle ?"}],
        "chosen": [{"role": "assistant", "content": "red"}], "rejected": [{"role": "assistant", "content": "blue"}],
        "images": ["a.png"]}
QA = {"question": "what colour is the circle ?", "answer": "red", "images": ["a.png"]}
SOURCE = {k: ROW[k] for k in ("prompt", "chosen", "images")}
@pytest.fixture
def data_dir(tmp_path):
    """A data folder with a good image a.png, a corrupt bad.png, a truncated trunc.png and a folder sub/; beside it
    (outside it) another good image."""
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    image.save(folder / "a.png")
    image.save(tmp_path / "outside.png")
    (folder / "bad.png").write_bytes(b"not an image")
    (folder / "trunc.png").write_bytes((folder / "a.png").read_bytes()[:200])
    return folder


def write(folder, spec):
    """The data file of a case: rows as JSON lines, raw text as train.jsonl, or what a callable writes."""
    if callable(spec):
        return spec(folder)
    path = folder / "train.jsonl"
    path.write_text(spec if isinstance(spec, str) else "".join(json.dumps(row) + "\n" for row in spec))
    return path


def empty_parquet(folder):
    """A Parquet file with the right columns and no rows."""
    path = folder / "train.parquet"
    datasets.Dataset.from_list([ROW]).select([]).to_parquet(str(path))
    return path


def embedded_garbage(folder):
    """A Parquet file whose one image is stored as bytes that are no image."""
    path = folder / "train.parquet"
    rows = datasets.Dataset.from_list([{**ROW, "images": [{"bytes": b"garbage", "path": None}]}])
    rows.cast_column("images", datasets.List(datasets.Image())).to_parquet(str(path))
    return path


IMAGE_PART = {"type": "image"}


def text_part(text):
    return {"type": "text", "text": text}


DPO_CASES = [
    pytest.param([{**ROW, "prompt": f"<image> <image> {QUESTION}"}], [],
                 ["record 0, field 'prompt'", "has 2 <image> placeholder(s) for 1 image(s)"], id="more-placeholders"),
    pytest.param([{**ROW, "prompt": QUESTION}], [],
                 ["record 0, field 'prompt'", "has 0 <image> placeholder(s) for 1 image(s)"], id="fewer-placeholders"),
    pytest.param([{**CHAT, "prompt": [{"role": "user", "content": [IMAGE_PART, IMAGE_PART, text_part("what ?")]}]}], [],
                 ["record 0, field 'prompt'", "has 2 image part(s)", "for 1 image(s)"], id="more-image-parts"),
    pytest.param([{**CHAT, "images": ["a.png", "a.png"], "prompt": [
        {"role": "user", "content": [IMAGE_PART, text_part("what is it ?")]}]}], [],
                 ["record 0, field 'prompt'", "has 1 image part(s)", "for 2 image(s)"], id="fewer-image-parts"),
    pytest.param([CHAT, {**CHAT, "chosen": [{"role": "assistant", "content": ""}]}], [],
                 ["record 1, field 'chosen'", "message 1 has no text"], id="empty-chat-chosen"),
    pytest.param([{**CHAT, "chosen": [{"role": "assistant", "content": [text_part(" ")]}]}], [],
                 ["record 0, field 'chosen'", "message 1 has no text"], id="empty-chosen-parts"),
    pytest.param([{**ROW, "rejected": ""}], [], ["record 0, field 'rejected'", "is empty"], id="empty-rejected"),
    pytest.param([{**CHAT, "rejected": [{"role": "assistant", "content": 5}]}], [],
                 ["record 0, field 'rejected'", "content must be text"], id="bad-message-content"),
    pytest.param([{**ROW, "images": "a.png"}], [], ["record 0, field 'images'", "expected a list of images, got str"],
                 id="images-not-a-list"),
    pytest.param([{k: v for k, v in ROW.items() if k != "rejected"}], [], ["need field(s) rejected"],
                 id="missing-field"),
    pytest.param(json.dumps(ROW) + "\n{\"prompt\": broken\n", [], ["train.jsonl"], id="broken-jsonl-line"),
    pytest.param("", [], ["train.jsonl"], id="empty-jsonl"),
    pytest.param(empty_parquet, [], ["train.parquet"], id="parquet-without-rows"),
    pytest.param([{**ROW, "images": ["../outside.png"]}], [],
                 ["record 0, field 'images'", "'../outside.png'", "outside the data folder", "--allow-outside-paths"],
                 id="path-outside-data-folder"),
    pytest.param(lambda folder: write(folder, [{**ROW, "images": [str(folder / "a.png")]}]), [],
                 ["record 0, field 'images'", "absolute path", "--allow-outside-paths"], id="absolute-path"),
    pytest.param([ROW], ["--visual-term", "retrieved"], ["retrieved_images"], id="no-retrieved-field"),
    pytest.param([{**ROW, "retrieved_images": ["a.png"]}, {**ROW, "retrieved_images": None}],
                 ["--visual-term", "retrieved"], ["record 1, field 'retrieved_images'", "is missing"],
                 id="row-without-retrieved-image"),
    pytest.param([{**ROW, "retrieved_images": ["a.png", "a.png"]}], ["--visual-term", "retrieved"],
                 ["record 0, field 'retrieved_images'", "has 2 image(s) for 1 image(s)"], id="retrieved-count"),
    pytest.param([ROW], ["--max-length", "8"], ["record 0", "max_length 8 would cut image tokens"],
                 id="max-length-cuts-image-tokens"),
    pytest.param([ROW], ["--model", "{folder}/a.png"], ["--model", "a.png is a file"], id="model-is-a-file"),
    pytest.param([ROW], ["--model", "{folder}/no-such-model"], ["--model", "no such folder"], id="missing-model"),
    pytest.param([ROW], ["--model", "{folder}/sub"], ["--model", "sub: its config cannot be loaded"],
                 id="folder-without-model"),
    pytest.param([ROW], ["--lora-targets", "no_such_proj"], ["--lora-targets no_such_proj"], id="bad-lora-targets"),
    pytest.param([ROW], ["--beta", "nan"], ["beta"], id="nan-beta"),
    pytest.param([ROW], ["--data", "{folder}/no-such.jsonl"], ["no-such.jsonl", "no such file or folder"],
                 id="missing-data"),
]


@pytest.mark.parametrize("spec, flags, expected", DPO_CASES)
def test_vision_dpo_refuses_malformed_input(refused, tiny_dir, data_dir, spec, flags, expected):
    data, out = write(data_dir, spec), data_dir.parent / "run"
    flags = [str(f).format(folder=data_dir) for f in flags]
    err = refused("vision", "dpo", "--model", tiny_dir, "--data", data, "--output", out, "--max-steps", 1,
                  "--batch-size", 2, "--report-to", "none", *flags, output=out)
    assert all(fragment in err for fragment in expected), err
    assert "\n\n" not in err.strip()  # one paragraph


# Images are read when their row is loaded: (data, words of the message)
LOADED = [
    pytest.param([ROW, {**ROW, "images": ["nope.png"]}], ["train.jsonl", "'nope.png'", "does not exist"],
                 id="missing-image"),
    pytest.param([ROW, {**ROW, "images": ["bad.png"]}], ["train.jsonl", "bad.png", "not a readable image",
                                                         "cannot identify"], id="corrupt-image"),
    pytest.param([ROW, {**ROW, "images": ["trunc.png"]}], ["train.jsonl", "trunc.png", "not a readable image"],
                 id="truncated-image"),
    pytest.param(embedded_garbage, ["train.parquet", "embedded bytes", "not a readable image"],
                 id="corrupt-embedded-image"),
    pytest.param([ROW, {**ROW, "images": ["sub"]}], ["train.jsonl", "is a folder"], id="folder-as-image"),
]


@pytest.mark.parametrize("spec, words", LOADED)
def test_a_bad_image_met_in_training_stops_the_run_naming_it(tiny_dir, data_dir, capsys, spec, words):
    """--bad-rows error (the default): exit 1 naming file, record and field, no traceback, no checkpoint, the row
    listed in bad_rows.jsonl."""
    from mmalign.cli import main

    out = data_dir.parent / "run"
    code = main([str(a) for a in ("vision", "dpo", "--model", tiny_dir, "--data", write(data_dir, spec), "--output",
                                  out, "--max-steps", 2, "--batch-size", 1, "--report-to", "none")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    assert all(word in err for word in [*words, "field 'images'", "training stopped at optimizer step"]), err
    assert not (out / "checkpoints").exists()
    reported = json.loads((out / "bad_rows.jsonl").read_text().splitlines()[0])
    assert reported["file"].endswith(words[0]) and reported["field"] == "images"


def test_cached_reference_scores_honour_bad_rows(tiny_dir, data_dir, capsys):
    """--reference cached reads every row before training: a bad row stops the run there (error), or is left unscored
    and skipped and reported by training (skip)."""
    from safetensors.torch import load_file

    from mmalign.cli import main

    data = write(data_dir, [ROW, {**ROW, "images": ["bad.png"]}, ROW, ROW])
    argv = ["vision", "dpo", "--model", tiny_dir, "--data", data, "--max-steps", 2, "--batch-size", 2, "--report-to",
            "none", "--reference", "cached"]
    assert main([str(a) for a in [*argv, "--output", data_dir.parent / "error"]]) == 1
    err = capsys.readouterr().err
    assert "record 1, field 'images'" in err and "met while caching reference scores, before training" in err, err
    out = data_dir.parent / "skip"
    assert main([str(a) for a in [*argv, "--output", out, "--bad-rows", "skip"]]) == 0
    scores = load_file(out / "reference_scores.safetensors")["scores"]
    assert scores[1].isnan().all() and scores[[0, 2, 3]].isfinite().all()
    assert [json.loads(line)["index"] for line in (out / "bad_rows.jsonl").read_text().splitlines()] == [1]
    assert sum(json.loads(line)["bad_rows"] for line in (out / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_folder_holding_other_files_is_left_as_it_was(refused, tiny_dir, data_dir):
    out = data_dir.parent / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    err = refused("vision", "dpo", "--model", tiny_dir, "--data", write(data_dir, [ROW]), "--output", out, output=out)
    assert "is not empty" in err and (out / "notes.txt").read_text() == "mine"


def test_paths_outside_the_data_folder_are_read_when_allowed(tiny_dir, data_dir):
    from mmalign.vision.models import load_processor

    data = write(data_dir, [{**ROW, "images": ["../outside.png"]}, {**ROW, "images": [str(data_dir / "a.png")]}])
    pairs = VisionPairs.load(data, load_processor(tiny_dir), allow_outside=True)
    assert pairs[0]["images"]["pixel_values"].shape == pairs[1]["images"]["pixel_values"].shape == (1, 3, 32, 32)


BUILDER_CASES = [
    pytest.param("bdhs", [{**SOURCE, "images": ["nope.png"]}], [], ["record 0, field 'images'", "does not exist"],
                 id="bdhs-missing-image"),
    pytest.param("bdhs", [{**SOURCE, "images": ["bad.png"]}], [], ["record 0, field 'images'", "not a readable"],
                 id="bdhs-corrupt-image"),
    pytest.param("bdhs", [{**SOURCE, "prompt": QUESTION}], [], ["record 0, field 'prompt'", "has 0 <image>"],
                 id="bdhs-fewer-placeholders"),
    pytest.param("bdhs", [{**CHAT, "chosen": [{"role": "assistant", "content": " "}]}], [],
                 ["record 0, field 'chosen'", "message 1 has no text"], id="bdhs-empty-chat-chosen"),
    pytest.param("bdhs", [{**SOURCE, "images": ["../outside.png"]}], [], ["outside the data folder"],
                 id="bdhs-outside-path"),
    pytest.param("bdhs", [SOURCE], ["--model", "{folder}/no-such-model"], ["no such folder"], id="bdhs-missing-model"),
    pytest.param("bdhs", [SOURCE], ["--model", "{folder}/a.png"], ["is a file"], id="bdhs-model-is-a-file"),
    pytest.param("rdpo", [{**SOURCE, "prompt": f"<image> <image> {QUESTION}", "images": ["a.png", "a.png"]}], [],
                 ["record 0, field 'images'", "holds 2 images", "exactly one"], id="rdpo-two-images"),
    pytest.param("rdpo", [{**CHAT, "rejected": None}], [], ["record 0, field 'prompt'", "expected text"],
                 id="rdpo-chat-prompt"),
    pytest.param("rdpo", [{**SOURCE, "images": ["sub"]}], [], ["record 0, field 'images'", "is a folder"],
                 id="rdpo-folder-as-image"),
    pytest.param("mia-dpo", [QA, {**QA, "images": []}], [], ["record 1, field 'images'", "holds 0 images"],
                 id="mia-dpo-no-image"),
    pytest.param("mia-dpo", [QA, {**QA, "images": ["trunc.png"]}], [], ["record 1, field 'images'", "trunc.png"],
                 id="mia-dpo-truncated-image"),
    pytest.param("mia-dpo", lambda folder: write(folder, [{**QA, "images": [str(folder / "a.png")]}]), [],
                 ["absolute path"], id="mia-dpo-absolute-path"),
    pytest.param("mia-dpo", [{**QA, "answer": ""}], [], ["record 0, field 'answer'", "is empty"],
                 id="mia-dpo-empty-answer"),
]


@pytest.mark.parametrize("command, spec, flags, expected", BUILDER_CASES)
def test_builders_refuse_malformed_input(refused, tiny_dir, data_dir, command, spec, flags, expected):
    data, out = write(data_dir, spec), data_dir.parent / "pairs"
    flags = [str(f).format(folder=data_dir) for f in flags]
    err = refused("vision", command, "--model", tiny_dir, "--data", data, "--output", out, *flags, output=out)
    assert all(fragment in err for fragment in expected), err


@pytest.mark.parametrize("flags, expected", [
    (["--data", "{folder}/train.jsonl"], ["record 0, field 'images'", "does not exist"]),
    (["--model", "{folder}/no-such-model"], ["no such folder"]),
], ids=["bad-data", "missing-model"])
def test_vision_demo_checks_its_inputs_before_evaluating(refused, tiny_dir, data_dir, flags, expected):
    write(data_dir, [{**ROW, "images": ["nope.png"]}])
    out = data_dir.parent / "demo"
    flags = [str(f).format(folder=data_dir) for f in flags]
    err = refused("vision", "demo", "--model", tiny_dir, "--output", out, "--report-to", "none", *flags, output=out)
    assert all(fragment in err for fragment in expected), err


def test_rows_are_rendered_and_fitted_once_per_processor_and_max_length(tmp_path, monkeypatch):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    data, processor, calls = write(tmp_path, [ROW, ROW]), tiny_llava()[1], []
    check_rows = VisionPairs.check_rows
    monkeypatch.setattr(VisionPairs, "check_rows", lambda pairs: calls.append(pairs.max_length) or check_rows(pairs))
    for max_length in (None, None, 64, 64):
        VisionPairs.load(data, processor, max_length)
    assert calls == [None, 64]


def test_a_16_bit_grey_png_is_scaled_not_clipped(tmp_path):
    levels = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16).repeat(4, axis=0)
    Image.fromarray(levels).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as raw:
        assert raw.mode in ("I;16", "I")  # PIL reads it as 16-bit, which .convert("RGB") would clip to white
    image = open_image("grey16.png", tmp_path)
    assert image.mode == "RGB" and np.asarray(image)[0, :, 0].tolist() == [0, 64, 128, 255]
    assert np.asarray(image)[..., 0].tolist() == np.asarray(image)[..., 2].tolist()  # grey stays grey


def test_a_16_bit_image_row_trains_on_its_content(tmp_path):
    gradient = (np.linspace(0, 65535, 32 * 32).reshape(32, 32)).astype(np.uint16)
    Image.fromarray(gradient).save(tmp_path / "a.png")
    processor = tiny_llava()[1]
    pixels = VisionPairs.load(write(tmp_path, [ROW]), processor)[0]["images"]["pixel_values"]
    as_8_bit = Image.fromarray((gradient // 257).astype(np.uint8)).convert("RGB")
    expected = processor.image_processor([as_8_bit], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, expected, atol=0.02, rtol=0)  # one grey level at most: the gradient, not white


@pytest.mark.parametrize("prompt, images, slots", [
    ("<image> <image> q", 2, 2),
    ("q", 1, 0),
    ([{"role": "user", "content": "q"}], 3, 3),  # TRL adds one image part per image to plain text
    ([{"role": "user", "content": [IMAGE_PART, text_part("q")]}], 2, 1),
    ([{"role": "user", "content": "q"}, {"role": "user", "content": [IMAGE_PART, text_part("q")]}], 1, 2),
    ([{"role": "user", "content": [text_part("<image> q")]}], 1, 1),
], ids=["plain", "plain-none", "chat-text", "chat-parts", "chat-added-and-parts", "chat-placeholder"])
def test_image_slots_count_placeholders_and_parts(prompt, images, slots):
    assert image_slots(prompt, images) == slots
    record = {"prompt": prompt, "images": [None] * images}
    assert bool(images_match(record)) == (slots != images)


def test_retrieved_images_must_pair_with_images():
    record = {"prompt": "<image> q", "images": ["a.png"], "retrieved_images": ["b.png", "c.png"]}
    assert images_match(record) == [("retrieved_images", "has 2 image(s) for 1 image(s)")]


def test_a_missing_vision_dependency_names_the_extra():
    import subprocess
    import sys

    code = ("import sys; sys.modules['peft'] = None; from mmalign.cli import main; "
            "sys.exit(main(['vision', 'dpo', '--model', 'm', '--data', 'd', '--output', 'o']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "mmalign.vision needs peft: pip install 'mmalign[vision]'" in result.stderr


def test_a_cut_jpeg_stops_at_the_row_naming_it(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    image.save(tmp_path / "full.jpg")
    (tmp_path / "a.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:-200])  # header intact, scan data cut
    pairs = VisionPairs.load(write(tmp_path, [{**ROW, "images": ["a.jpg"]}]), tiny_llava()[1])
    with pytest.raises(DataError, match=r"train.jsonl: record 0, field 'images': image 1 \(.*a.jpg\): not a readable "
                                        "image"):
        pairs[0]
