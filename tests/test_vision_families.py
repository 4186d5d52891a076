"""VLM families beyond LLaVA 1.5 in `mmalign vision dpo`: any-resolution tiles (LLaVA-NeXT, LLaVA-OneVision) and
multi-axis rotary positions over dynamic-resolution images (Qwen2-VL, Qwen2.5-VL). Rows whose images differ in size
(so in tiles, patches and image tokens) score as TRL's DPOTrainer and the model's own forward score them, train from
the CLI, encode their images in one vision-tower call a step, and have every image token counted before training."""

import json
import math
import re

import pytest
import torch

from mmalign.cli import main
from mmalign.data import DataError
from mmalign.reference import AdapterDisabled
from mmalign.vision import dpo, models
from mmalign.vision.data import VisionPairs, collate_pairs, write_rows
from mmalign.vision.scoring import image_features, packed_scores, sequence_scores, token_log_probs
from mmalign.vision.tiny import tiny_gemma3, tiny_llava_next, tiny_llava_onevision, tiny_qwen2_5_vl, tiny_qwen2_vl
from mmalign.vision.world import preference_rows

FAMILIES = {"llava_next": tiny_llava_next, "llava_onevision": tiny_llava_onevision, "qwen2_vl": tiny_qwen2_vl,
            "qwen2_5_vl": tiny_qwen2_5_vl, "gemma3": tiny_gemma3}
MROPE = ("qwen2_vl", "qwen2_5_vl")
DYNAMIC = ("llava_next", "llava_onevision", *MROPE)
"""The families whose images take as many tiles or patches as their size asks (Gemma 3 resizes every image)."""
SIZES = ((32, 32), (64, 32), (24, 56), (40, 72))
"""(width, height) of the rows' images in turn: 1x1, 1x2, 2x1 and 2x2 tile grids (LLaVA-NeXT), 2x2 to 4x4 merged
patch grids (Qwen2-VL), so pairs differ in image tokens."""


def varied_rows(n, seed=0, **kw):
    """The world's preference rows with their images resized to SIZES in turn."""
    rows = preference_rows(n, seed=seed, **kw)
    for i, row in enumerate(rows):
        row["images"] = [image.resize(SIZES[i % len(SIZES)]) for image in row["images"]]
    return rows


def batch_of(rows, processor, path, **kw):
    """`rows` written to `path`, loaded and collated as one batch."""
    pairs = VisionPairs.load(write_rows(rows, path), processor, retrieved="retrieved_images" in rows[0])
    return pairs, collate_pairs([pairs[i] for i in range(len(pairs))], processor.tokenizer.pad_token_id, **kw)


def vision_tower(model):
    """The vision tower of a family's model (or of its peft wrapper): LLaVA's `vision_tower`, Qwen2-VL's `visual`."""
    inner = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
    return getattr(inner, "vision_tower", None) or inner.visual


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    """Each family's tiny random model and processor, saved once per session (`family_dir(name)` is the folder)."""
    saved = {}

    def folder(name):
        if name not in saved:
            model, processor = FAMILIES[name](seed=0)
            saved[name] = tmp_path_factory.mktemp(name)
            model.save_pretrained(saved[name])
            processor.save_pretrained(saved[name])
        return saved[name]
    return folder


@pytest.mark.parametrize("family", FAMILIES)
def test_a_three_step_run_trains_from_the_saved_folder(family, family_dir, tmp_path):
    data = write_rows(varied_rows(6), tmp_path / "rows.parquet")
    out = tmp_path / "run"
    assert main(["vision", "dpo", "--model", str(family_dir(family)), "--data", str(data), "--output", str(out),
                 "--batch-size", "2", "--max-steps", "3", "--learning-rate", "1e-2", "--report-to", "none"]) == 0
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 3 and logged[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-5)  # the LoRA starts at 0
    assert logged[-1]["loss"] != logged[0]["loss"] and (out / "adapter_config.json").is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_step0_loss_and_logps_equal_trl_dpo_trainer(family, trl_step0):
    scored = trl_step0(FAMILIES[family], varied_rows(4, seed=2))
    torch.testing.assert_close(*scored["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(*scored["logps"], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_vision_tower_runs_once_per_step(family, tmp_path):
    model, processor = FAMILIES[family](seed=0)
    model = models.add_lora(model, 4, None, models.LORA_TARGETS)
    pairs, batch = batch_of(varied_rows(4), processor, tmp_path / "rows.parquet")
    calls = []
    vision_tower(model).register_forward_hook(  # the images it is given, positionally or by name
        lambda m, args, kwargs, out: calls.append((args or tuple(kwargs.values()))[0].shape[0]), with_kwargs=True)
    with torch.no_grad():
        for i in range(4):  # what the tower takes for each pair's image alone: its tiles or patches
            image_features(model, collate_pairs([pairs[i]], processor.tokenizer.pad_token_id))
    alone, calls[:] = list(calls), []
    parts = dpo.Parts(AdapterDisabled(), dpo.Config(model="-", data="-", output=tmp_path / "run"),
                      share_features=models.vision_is_frozen(model))
    loss, _ = dpo.dpo_step(model, batch, torch.Generator().manual_seed(0), parts)
    assert parts.share_features and (len(set(alone)) > 1) == (family in DYNAMIC)  # images of many tiles or patches
    assert calls == [sum(alone)]  # one call for policy and reference, chosen and rejected: every image, no padding
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # the LoRA starts at zero: policy = reference


def one_axis(inputs):
    """A forward's inputs with positions 0, 1, 2, ... on every rotary axis (no M-RoPE)."""
    return {**inputs, "position_ids": torch.arange(inputs["input_ids"].shape[1])[None]}


def causal(inputs):
    """A forward's inputs without token types (image tokens attend causally, not to their whole image)."""
    return {k: v for k, v in inputs.items() if k != "token_type_ids"}


WITHOUT = {"qwen2_vl": one_axis, "qwen2_5_vl": one_axis, "gemma3": causal}
"""Each family's own forward with what the shared-prompt scoring must reproduce taken away."""


def whole_row_scores(model, processor, rows, inputs=lambda inputs: inputs):
    """[B, 2] completion log-probs of each row run whole through the processor and the model's own forward, its
    inputs passed through `inputs` first."""
    scores = torch.zeros(len(rows), 2)
    for i, row in enumerate(rows):
        prompt = processor(images=row["images"], text=row["prompt"], add_special_tokens=False)
        prompt_length = len(prompt["input_ids"][0])
        for k, key in enumerate(("chosen", "rejected")):
            whole = processor(images=row["images"], text=row["prompt"] + row[key], add_special_tokens=False,
                              return_tensors="pt")
            with torch.no_grad():
                logp = model(**inputs(dict(whole))).logits[0, prompt_length - 1:-1].log_softmax(-1)
            scores[i, k] = logp.gather(-1, whole["input_ids"][0, prompt_length:, None]).sum()
    return scores


@pytest.mark.parametrize("family", WITHOUT)
def test_scores_equal_the_models_own_whole_row_forward(family, tmp_path):
    model, processor = FAMILIES[family](seed=0)
    rows = varied_rows(4, seed=2)
    rows[1]["chosen"] = " two objects are there </s>"  # completions of different lengths share the batch
    _, batch = batch_of(rows, processor, tmp_path / "rows.parquet")
    with torch.no_grad():
        shared, packed = sequence_scores(model, batch), packed_scores(model, batch)
        logps, mask, _ = token_log_probs(model, batch)
    truth = whole_row_scores(model, processor, rows)
    torch.testing.assert_close(shared, truth, rtol=0, atol=1e-5)
    torch.testing.assert_close(packed, truth, rtol=0, atol=1e-5)  # the shared prompt under gradient checkpointing
    torch.testing.assert_close((logps * mask).sum(1).view(2, 4).T, truth, rtol=0, atol=1e-5)
    assert (whole_row_scores(model, processor, rows, WITHOUT[family]) - truth).abs().max() > 1e-4  # it matters


@pytest.mark.parametrize("family", FAMILIES)
def test_the_packed_shared_prompt_scores_as_the_cached_one(family, tmp_path):
    """Under gradient checkpointing the prompt is shared by packing (`packed_scores`), not by a key/value cache."""
    model, processor = FAMILIES[family](seed=0)
    rows = varied_rows(4, seed=3)
    rows[2]["rejected"] = " no </s>"  # completions of different lengths pack unevenly
    _, batch = batch_of(rows, processor, tmp_path / "rows.parquet")
    with torch.no_grad():
        torch.testing.assert_close(packed_scores(model, batch), sequence_scores(model, batch), rtol=0, atol=1e-5)


def test_every_image_token_is_counted_before_training(tmp_path):
    _, processor = tiny_llava_next()
    rows = varied_rows(2)  # row 0: one tile (36 image tokens); row 1: two tiles (52 image tokens)
    path = write_rows(rows, tmp_path / "r.parquet")
    lengths = [len(VisionPairs.load(path, processor)[i]["prompt_ids"]) for i in range(2)]
    assert lengths[1] - lengths[0] == 52 - 36
    with pytest.raises(DataError, match=r"r.parquet: 1 row\(s\) cannot be trained on.*\n  record 1: max_length "
                                        rf"{lengths[0] + 1} would cut image tokens"):
        VisionPairs.load(path, processor, max_length=lengths[0] + 1)  # the first image's count would let row 1 pass


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
def test_retrieved_images_of_another_size_take_their_own_image_tokens(family, tmp_path):
    model, processor = FAMILIES[family]()
    rows = varied_rows(2)
    for i, row in enumerate(rows):
        row["retrieved_images"] = rows[1 - i]["images"]  # v' has the other row's size, so other tiles and tokens
    shown_v_prime = [{**row, "images": row["retrieved_images"]} for row in rows]
    for row in shown_v_prime:
        del row["retrieved_images"]
    _, batch = batch_of(rows, processor, tmp_path / "visual.parquet", visual=True)
    config = dpo.Config(model="-", data="-", output=tmp_path / "run", visual_term="retrieved")
    with torch.no_grad():
        visual = sequence_scores(model, dpo.with_visual_images(batch, None, config))[:, 2]
        alone = sequence_scores(model, batch_of(shown_v_prime, processor, tmp_path / "v.parquet")[1])[:, 0]
    torch.testing.assert_close(visual, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("family", "flag", "expected"), [
    ("llava_next", "--visual-term corrupted", r"--visual-term corrupted: .* pixel_values of shape \(1, 2, 3, 32, 32\)"),
    ("qwen2_vl", "--visual-term corrupted", r"--visual-term corrupted: .* pixel_values of shape \(16, 384\)"),
    ("qwen2_vl", "--online-bdhs", r"--online-bdhs: .* multi-axis rotary positions \(M-RoPE\)")],
    ids=["tiles-corrupted", "patches-corrupted", "mrope-online-bdhs"])
def test_what_a_family_cannot_do_is_refused_before_training(family, flag, expected, family_dir, tmp_path, refused):
    data = write_rows(varied_rows(2), tmp_path / "rows.parquet")
    err = refused("vision", "dpo", "--model", family_dir(family), "--data", data, "--output", tmp_path / "run",
                  *flag.split(), output=tmp_path / "run")
    assert re.search(expected, err), err


@pytest.mark.parametrize(("config_class", "why"), [
    ("Idefics3Config", "one feature block per row"), ("SmolVLMConfig", "one feature block per row"),
    ("PaliGemmaConfig", "its prompt attends both ways as a prefix")])
def test_families_the_scoring_does_not_reproduce_are_refused_by_name(config_class, why, tmp_path, refused):
    import transformers

    folder = tmp_path / config_class
    getattr(transformers, config_class)().save_pretrained(folder)  # the config alone: it is read first
    data = write_rows(varied_rows(2), tmp_path / "rows.parquet")
    err = refused("vision", "dpo", "--model", folder, "--data", data, "--output", tmp_path / "run",
                  output=tmp_path / "run")
    model_type = getattr(transformers, config_class).model_type
    assert f"--model {folder}: {model_type} cannot be trained here: " in err and why in err


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl", "gemma3"])
def test_rdpo_embeddings_take_every_image_input(family):
    from mmalign.vision.builders.rdpo import vision_tower_embeddings

    model, processor = FAMILIES[family]()
    images = [row["images"][0] for row in varied_rows(4)]
    together = vision_tower_embeddings(model, processor, images, batch_size=4)
    alone = torch.cat([vision_tower_embeddings(model, processor, [image]) for image in images])
    assert together.shape == (4, model.config.get_text_config().hidden_size)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)  # each image its own, however batched


@pytest.mark.parametrize(("command", "family", "rows", "expected"), [
    ("bdhs", "qwen2_vl", lambda r: [{k: r[k] for k in ("prompt", "chosen", "images")}], "multi-axis rotary"),
    ("mia-dpo", "llava_next", lambda r: [{"question": "what colour is the circle ?", "answer": "red",
                                         "images": r["images"]}], "MIA-DPO's attention ratio reads"),
], ids=["bdhs-mrope", "mia-dpo-tiles"])
def test_builders_refuse_layouts_they_do_not_read(command, family, rows, expected, family_dir, tmp_path, refused):
    data = write_rows(rows(varied_rows(1)[0]), tmp_path / "src.parquet")
    err = refused("vision", command, "--model", family_dir(family), "--data", data, "--output", tmp_path / "out",
                  output=tmp_path / "out")
    assert f"--model {family_dir(family)}: " in err and expected in err, err
