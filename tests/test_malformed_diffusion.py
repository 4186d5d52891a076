"""Malformed input to the diffusion and reward commands: one clear message naming the file, record or field, exit
code 1 or 2, no traceback, nothing written (the `refused` fixture), for each row of the table."""

import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from mmalign.diffusion.data import write_pickapic
from mmalign.diffusion.rewards import load_scorer, save_scorer
from mmalign.diffusion.world import png_bytes, preference_pairs, render

ARCH = Path(__file__).resolve().parents[1] / "assets" / "tiny-clip.json"
TRAIN = ["--max-steps", 1, "--batch-size", 2, "--num-samples", 0, "--report-to", "none"]


class RunsCode:
    """A pickle payload: unpickling it would create the file `path`."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def jsonl(path, rows, encoding="utf-8"):
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode(encoding))
    return path


def row(jpg_0="left.png", jpg_1="right.png", caption="a red circle", label_0=1):
    return {"caption": caption, "jpg_0": jpg_0, "jpg_1": jpg_1, "label_0": label_0}


@pytest.fixture(scope="module")
def p(tmp_path_factory, tiny_family):
    """Every malformed input of the table, written once."""
    root = tmp_path_factory.mktemp("malformed")
    data = root / "data"
    data.mkdir()
    render("a red circle", 8, 16, 6).save(data / "left.png")
    render("a red circle", 24, 16, 6).save(data / "right.png")
    render("a red circle", 24, 16, 6).save(root / "outside.png")
    (data / "folder.png").mkdir()
    (data / "no-frames").mkdir()
    pairs = preference_pairs(4, seed=2)
    for r in pairs:
        r["label_0"] = 1.0
    x = SimpleNamespace(root=root, data=data, evidence=root / "code-ran")
    x.broken = data / "broken.jsonl"
    x.broken.write_text(json.dumps(row()) + "\n" + '{"caption": "a red circle", "jpg_0": \n')
    x.empty = data / "empty.jsonl"
    x.empty.write_bytes(b"")
    x.blank = data / "blank.jsonl"
    x.blank.write_text("\n  \n\n")
    x.latin1 = jsonl(data / "latin1.jsonl", [row(), row(caption="a red circle, café")], encoding="latin-1")
    x.not_object = data / "not-object.jsonl"
    x.not_object.write_text(json.dumps(row()) + "\n[1, 2]\n")
    x.folder_image = jsonl(data / "folder-image.jsonl", [row(), row(jpg_1="folder.png")])
    x.absolute = jsonl(data / "absolute.jsonl", [row(jpg_0=str(data / "left.png"))])
    x.outside = jsonl(data / "outside.jsonl", [row(jpg_1="../outside.png")])
    x.missing = jsonl(data / "missing.jsonl", [row(jpg_0="gone.png")])
    x.videos = jsonl(data / "videos.jsonl", [{"caption": "a red circle", "video_0": "left.png",
                                              "video_1": "no-frames", "label_0": 1}])
    x.empty_parquet = data / "empty.parquet"
    x.empty_parquet.write_bytes(b"")
    x.zero_rows = data / "zero.parquet"
    pq.write_table(pa.table({"caption": pa.array([], pa.string()), "label_0": pa.array([], pa.float64())}),
                   str(x.zero_rows))
    x.no_label = data / "no-label.parquet"
    pq.write_table(pa.table({"caption": [r["caption"] for r in pairs], "jpg_0": [r["jpg_0"] for r in pairs],
                             "jpg_1": [r["jpg_1"] for r in pairs]}), str(x.no_label))
    x.bad_label = write_pickapic([*pairs[:2], {**pairs[2], "label_0": 0.7}], data / "bad-label.parquet")
    x.not_image = write_pickapic([pairs[0], {**pairs[1], "jpg_1": b"GIF89a but not really"}],
                                 data / "not-image.parquet")
    x.ties = write_pickapic([{**r, "label_0": 0.5} for r in pairs], data / "ties.parquet")
    x.prompts = root / "prompts.txt"
    x.prompts.write_text("a red circle\na blue square\n")
    x.one_prompt = root / "one-prompt.txt"
    x.one_prompt.write_text("a red circle\n")
    x.latin1_prompts = root / "latin1-prompts.txt"
    x.latin1_prompts.write_bytes("a red circle\nun carré bleu\n".encode("latin-1"))
    x.blank_prompts = root / "blank-prompts.txt"
    x.blank_prompts.write_text("\n \n")
    x.text_model = root / "model.txt"
    x.text_model.write_text("not a model\n")
    x.random_weights = root / "random.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(x.random_weights))
    x.no_index = root / "no-index"
    x.no_index.mkdir()
    x.tiny = tiny_family  # video and Wan pipelines, built when a case first needs them and shared by the session
    x.scorer = save_scorer(load_scorer(ARCH), root / "scorer")
    x.bad_scorer = root / "bad-scorer"
    x.bad_scorer.mkdir()
    for name in ("open_clip_config.json", "open_clip_model.safetensors"):
        (x.bad_scorer / name).write_bytes((x.scorer / name).read_bytes())
    (x.bad_scorer / "scorer.json").write_text('{"kind": "aesthetic",')
    x.evil = root / "evil.pt"
    torch.save({"state_dict": RunsCode(x.evidence)}, x.evil)
    x.images = root / "images"
    x.images.mkdir()
    render("a red circle", 8, 16, 6).save(x.images / "a.png")
    (x.images / "b.png").mkdir()
    x.broken_images = root / "broken-images"
    x.broken_images.mkdir()
    (x.broken_images / "a.png").write_bytes(png_bytes(render("a red circle", 8, 16, 6))[:40])
    return x


def dpo(p, model, data, *more):
    return ["diffusion", "dpo", "--model", model, "--data", data, *TRAIN, *more]


def reward(command, p, *more):
    return ["reward", command, "--scorer", p.scorer, *more]


# (id, argv given the inputs `p`, the model `m` and the output `out`, what `out` holds before: nothing, a "file" or a
# "full" folder, words of the message)
CASES = [
    ("jsonl-broken-line", lambda p, m, out: dpo(p, m, p.broken, "--output", out), None,
     ["broken.jsonl", "line 2, column", "not valid JSON"]),
    ("jsonl-empty", lambda p, m, out: dpo(p, m, p.empty, "--output", out), None, ["empty.jsonl", "holds no records"]),
    ("jsonl-blank-lines", lambda p, m, out: dpo(p, m, p.blank, "--output", out), None,
     ["blank.jsonl", "holds no records"]),
    ("jsonl-latin1", lambda p, m, out: dpo(p, m, p.latin1, "--output", out), None,
     ["latin1.jsonl", "line 2 is not UTF-8"]),
    ("jsonl-not-an-object", lambda p, m, out: dpo(p, m, p.not_object, "--output", out), None,
     ["not-object.jsonl", "line 2: expected a JSON object"]),
    ("parquet-empty-file", lambda p, m, out: dpo(p, m, p.empty_parquet, "--output", out), None,
     ["empty.parquet", "not a Parquet file"]),
    ("parquet-no-rows", lambda p, m, out: dpo(p, m, p.zero_rows, "--output", out), None,
     ["zero.parquet", "holds no records"]),
    ("parquet-missing-column", lambda p, m, out: dpo(p, m, p.no_label, "--output", out), None,
     ["no-label.parquet", "need field(s) label_0"]),
    ("bad-label", lambda p, m, out: dpo(p, m, p.bad_label, "--output", out), None,
     ["bad-label.parquet", "record 2, field 'label_0': must be 0, 0.5 or 1, got 0.7"]),
    ("image-absolute-path", lambda p, m, out: dpo(p, m, p.absolute, "--output", out), None,
     ["absolute.jsonl", "record 0, field 'jpg_0'", "is an absolute path", "--allow-outside-paths"]),
    ("image-outside-the-folder", lambda p, m, out: dpo(p, m, p.outside, "--output", out), None,
     ["outside.jsonl", "record 0, field 'jpg_1'", "'../outside.png' is outside the data folder"]),
    ("all-ties", lambda p, m, out: dpo(p, m, p.ties, "--output", out), None, ["ties.parquet", "all 4 pairs are ties"]),
    ("data-hub-id-offline", lambda p, m, out: dpo(p, m, "someone/no-such-dataset", "--output", out), None,
     ["someone/no-such-dataset: no such file or folder here", "cannot be loaded"]),
    ("model-hub-id-offline", lambda p, m, out: dpo(p, "someone/no-such-model", p.bad_label, "--output", out), None,
     ["--model someone/no-such-model", "HF_HUB_OFFLINE is set"]),
    ("model-text-file", lambda p, m, out: dpo(p, p.text_model, p.bad_label, "--output", out), None,
     ["--model", "model.txt: not a model checkpoint"]),
    ("model-random-safetensors", lambda p, m, out: dpo(p, p.random_weights, p.bad_label, "--output", out), None,
     ["random.safetensors: not a Stable Diffusion checkpoint"]),
    ("model-folder-without-index", lambda p, m, out: dpo(p, p.no_index, p.bad_label, "--output", out), None,
     ["no-index: the folder has no model_index.json"]),
    ("output-is-a-file", lambda p, m, out: dpo(p, m, p.bad_label, "--output", out), "file",
     ["out is a file"]),
    ("output-not-empty", lambda p, m, out: dpo(p, m, p.bad_label, "--output", out), "full",
     ["out is not empty", "notes.txt"]),
    ("sample-prompts-latin1", lambda p, m, out: dpo(p, m, p.bad_label, "--sample-prompts", p.latin1_prompts,
                                                    "--output", out), None,
     ["latin1-prompts.txt: line 2 is not UTF-8"]),
    ("video-dpo-image-model", lambda p, m, out: ["diffusion", "video-dpo", "--model", m, "--data", p.videos, *TRAIN,
                                                 "--output", out], None,
     ["StableDiffusionPipeline is an image pipeline; video-dpo trains text-to-video pipelines"]),
    ("dpo-video-model", lambda p, m, out: dpo(p, p.tiny("video"), p.bad_label, "--output", out), None,
     ["TextToVideoSDPipeline is a text-to-video pipeline", "mmalign diffusion video-dpo"]),
    ("flow-dpo-wan-model", lambda p, m, out: ["diffusion", "flow-dpo", "--model", p.tiny("wan"), "--data", p.bad_label,
                                              "--output", out], None,
     ["WanPipeline is a text-to-video pipeline", "mmalign diffusion video-dpo"]),
    ("video-dpo-wan-frames", lambda p, m, out: ["diffusion", "video-dpo", "--model", p.tiny("wan"), "--data", p.videos,
                                                "--num-frames", 8, "--resolution", 32, *TRAIN, "--output", out],
     None, ["--num-frames 8: WanPipeline's VAE encodes 1 + 4k frames", "use 5 or 9"]),
    ("video-dpo-wan-resolution", lambda p, m, out: ["diffusion", "video-dpo", "--model", p.tiny("wan"), "--data",
                                                    p.videos, "--num-frames", 5, "--resolution", 36, *TRAIN,
                                                    "--output", out],
     None, ["--resolution 36: WanPipeline takes sizes that are multiples of 8"]),
    ("acflow-prompts-latin1", lambda p, m, out: ["diffusion", "acflow", "--model", m, "--prompts", p.latin1_prompts,
                                                 "--output", out], None, ["latin1-prompts.txt: line 2 is not UTF-8"]),
    ("acflow-prompts-blank", lambda p, m, out: ["diffusion", "acflow", "--model", m, "--prompts", p.blank_prompts,
                                                "--output", out], None, ["blank-prompts.txt has no prompts"]),
    ("acflow-diffusion-model", lambda p, m, out: ["diffusion", "acflow", "--model", m, "--prompts", p.prompts,
                                                  *TRAIN, "--output", out], None,
     ["needs a flow-matching pipeline"]),
    ("sample-prompts-folder", lambda p, m, out: ["diffusion", "sample", "--model", m, "--prompts", p.data,
                                                 "--output", out], None, ["prompts file", "data is a folder"]),
    ("sample-model-text-file", lambda p, m, out: ["diffusion", "sample", "--model", p.text_model, "--prompts",
                                                  p.prompts, "--output", out], None,
     ["model.txt: not a model checkpoint"]),
    ("sample-output-is-a-file", lambda p, m, out: ["diffusion", "sample", "--model", m, "--prompts", p.prompts,
                                                   "--output", out], "file",
     ["out is a file"]),
    ("reward-train-broken-jsonl", lambda p, m, out: reward("train", p, "--data", p.broken, "--report-to", "none",
                                                           "--output", out), None, ["broken.jsonl", "line 2"]),
    ("reward-train-scorer-json", lambda p, m, out: ["reward", "train", "--scorer", p.bad_scorer, "--data",
                                                    p.bad_label, "--output", out], None,
     ["scorer file", "bad-scorer/scorer.json is not valid JSON"]),
    ("reward-train-pickle-that-runs-code", lambda p, m, out: ["reward", "train", "--scorer", ARCH, "--pretrained",
                                                              p.evil, "--data", p.bad_label, "--output", out], None,
     ["checkpoint", "evil.pt was not loaded", "could run code"]),
    ("reward-train-head-on-clip", lambda p, m, out: reward("train", p, "--tune", "head", "--data", p.bad_label,
                                                           "--output", out), None, ["--tune head trains an aesthetic"]),
    ("reward-score-folder-as-image", lambda p, m, out: reward("score", p, "--images", p.images, "--prompts",
                                                              p.prompts), None,
     ["images/b.png is a folder, not an image file"]),
    ("reward-score-broken-image", lambda p, m, out: reward("score", p, "--images", p.broken_images, "--prompts",
                                                           p.one_prompt), None,
     ["image", "broken-images/a.png cannot be read"]),
    ("reward-score-prompt-count", lambda p, m, out: reward("score", p, "--images", p.data, "--prompts", p.prompts),
     None, ["prompts.txt has 2 prompts for 3 images"]),
    ("reward-score-output-exists", lambda p, m, out: reward("score", p, "--data", p.bad_label, "--output", out),
     "file",
     ["--output", "out already exists"]),
    ("reward-score-hub-scorer-offline", lambda p, m, out: ["reward", "score", "--scorer", "hf-hub:someone/scorer",
                                                           "--data", p.bad_label], None,
     ["hf-hub:someone/scorer", "HF_HUB_OFFLINE is set"]),
    ("reward-relabel-missing-column", lambda p, m, out: reward("relabel", p, "--data", p.no_label, "--output", out),
     None, ["no-label.parquet", "need field(s) label_0"]),
    ("reward-relabel-outside-path", lambda p, m, out: reward("relabel", p, "--data", p.outside, "--output", out),
     None, ["outside.jsonl", "record 0, field 'jpg_1'", "is outside the data folder"]),
    ("reward-relabel-output-not-empty", lambda p, m, out: reward("relabel", p, "--data", p.bad_label, "--output",
                                                                 out), "full", ["out is not empty", "notes.txt"]),
    ("reward-pairs-prompts-latin1", lambda p, m, out: reward("pairs", p, "--model", m, "--prompts", p.latin1_prompts,
                                                             "--output", out), None,
     ["latin1-prompts.txt: line 2 is not UTF-8"]),
    ("reward-pairs-model-offline", lambda p, m, out: reward("pairs", p, "--model", "someone/no-such-model",
                                                            "--prompts", p.prompts, "--output", out), None,
     ["--model someone/no-such-model", "HF_HUB_OFFLINE is set"]),
]


@pytest.mark.parametrize("argv, before, words", [
    pytest.param(*case[1:], id=case[0]) for case in CASES])
def test_malformed_input_is_refused_with_one_clear_message(argv, before, words, p, tiny_sd, tmp_path, refused):
    output = tmp_path / "out"
    if before == "file":
        output.write_text("the user's file\n")
    elif before == "full":
        output.mkdir()
        (output / "notes.txt").write_text("the user's notes\n")
    message = refused(*argv(p, tiny_sd, output), output=output)
    for word in words:
        assert word in message, message
    assert not p.evidence.exists(), "the pickle's code ran"


# Images are read when their row is loaded: (id, argv as in CASES, words of the message)
LOADED = [
    ("image-not-an-image", lambda p, m, out: dpo(p, m, p.not_image, "--output", out),
     ["not-image.parquet", "record 1, field 'jpg_1': cannot be read", "not an image"]),
    ("image-is-a-folder", lambda p, m, out: dpo(p, m, p.folder_image, "--output", out),
     ["folder-image.jsonl", "record 1, field 'jpg_1'", "folder.png is a folder, not an image file"]),
    ("image-missing", lambda p, m, out: dpo(p, m, p.missing, "--output", out),
     ["missing.jsonl", "record 0, field 'jpg_0'", "gone.png does not exist"]),
    ("video-image-where-a-video-belongs", lambda p, m, out: ["diffusion", "video-dpo", "--model", p.tiny("video"),
                                                             "--data", p.videos, "--num-frames", 2, *TRAIN,
                                                             "--output", out],
     ["videos.jsonl", "record 0, field 'video_0'", "left.png is one image, not a video"]),
]


@pytest.mark.parametrize("argv, words", [pytest.param(*case[1:], id=case[0]) for case in LOADED])
def test_a_bad_image_met_in_training_stops_the_run_naming_it(argv, words, p, tiny_sd, tmp_path, capsys):
    """--bad-rows error (the default): exit 1 with the row named, no traceback, no checkpoint, the row reported."""
    from mmalign.cli import main

    output = tmp_path / "out"
    code = main([str(a) for a in argv(p, tiny_sd, output)] + ["--batch-size", "1", "--max-steps", "2"])
    message = capsys.readouterr().err
    assert code == 1 and "Traceback" not in message, message
    for word in [*words, "training stopped at optimizer step", "--bad-rows skip"]:
        assert word in message, message
    assert not (output / "checkpoints").exists()
    report = json.loads((output / "bad_rows.jsonl").read_text().splitlines()[0])
    assert (report["index"], report["field"]) == (0 if "record 0" in words[1] else 1, words[1].split("'")[1])
