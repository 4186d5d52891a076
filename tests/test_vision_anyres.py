"""Any-resolution families (LLaVA-NeXT, LLaVA-OneVision) in `mmalign vision dpo`: rows whose images differ in size
(so in tiles and image tokens) score as TRL's DPOTrainer scores them, train from the CLI, encode images once a step,
and have every image token counted before training."""

import json
import math

import pytest
import torch

from mmalign.cli import main
from mmalign.data import DataError
from mmalign.reference import AdapterDisabled
from mmalign.vision import dpo, models
from mmalign.vision.data import VisionPairs, collate_pairs, write_rows
from mmalign.vision.scoring import sequence_scores
from mmalign.vision.tiny import tiny_llava_next, tiny_llava_onevision
from mmalign.vision.world import preference_rows

FAMILIES = {"llava_next": tiny_llava_next, "llava_onevision": tiny_llava_onevision}
SIZES = ((32, 32), (64, 32), (24, 56), (40, 72))
"""(width, height) of the rows' images in turn: 1x1, 1x2 and 2x1 tile grids, so pairs differ in image tokens."""


def varied_rows(n, seed=0, **kw):
    """The world's preference rows with their images resized to SIZES in turn."""
    rows = preference_rows(n, seed=seed, **kw)
    for i, row in enumerate(rows):
        row["images"] = [image.resize(SIZES[i % len(SIZES)]) for image in row["images"]]
    return rows


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
    assert len(logged) == 3 and logged[0]["dpo_loss"] == pytest.approx(0.6931, abs=1e-3)  # the LoRA starts at zero
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
    calls = []
    model.get_base_model().model.vision_tower.register_forward_hook(lambda m, args, out: calls.append(args[0].shape))
    pairs = VisionPairs.load(write_rows(varied_rows(4), tmp_path / "rows.parquet"), processor)
    batch = collate_pairs([pairs[i] for i in range(4)], processor.tokenizer.pad_token_id)
    config = dpo.Config(model="-", data="-", output=tmp_path / "run")
    parts = dpo.Parts(AdapterDisabled(), config, share_features=models.vision_is_frozen(model))
    loss, _ = dpo.dpo_step(model, batch, torch.Generator().manual_seed(0), parts)
    tiles = [pairs[i]["images"]["pixel_values"].shape[1] for i in range(4)]  # base image + grid, per image
    assert len(set(tiles)) > 1 and batch["images"]["pixel_values"].shape[:2] == (4, max(tiles))  # padded to stack
    assert len(calls) == 1 and calls[0][0] == sum(tiles)  # one call, every real tile and no padding
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # the LoRA starts at zero: policy = reference


def test_every_image_token_is_counted_before_training(tmp_path):
    _, processor = tiny_llava_next()
    rows = varied_rows(2)  # row 0: one tile (36 image tokens); row 1: two tiles (52 image tokens)
    path = write_rows(rows, tmp_path / "r.parquet")
    lengths = [len(VisionPairs.load(path, processor)[i]["prompt_ids"]) for i in range(2)]
    assert lengths[1] - lengths[0] == 52 - 36
    with pytest.raises(DataError, match=r"r.parquet: 1 row\(s\) cannot be trained on.*\n  record 1: max_length "
                                        rf"{lengths[0] + 1} would cut image tokens"):
        VisionPairs.load(path, processor, max_length=lengths[0] + 1)  # the first image's count would let row 1 pass


def test_the_corrupted_visual_term_is_refused_for_image_tiles(family_dir, tmp_path, refused):
    data = write_rows(varied_rows(2), tmp_path / "rows.parquet")
    err = refused("vision", "dpo", "--model", family_dir("llava_next"), "--data", data, "--output", tmp_path / "run",
                  "--visual-term", "corrupted", output=tmp_path / "run")
    assert "--visual-term corrupted" in err and "(1, 2, 3, 32, 32)" in err and "use --visual-term retrieved" in err


def test_retrieved_images_of_another_size_take_their_own_image_tokens(tmp_path):
    model, processor = tiny_llava_next()
    rows = varied_rows(2)
    for i, row in enumerate(rows):
        row["retrieved_images"] = rows[1 - i]["images"]  # v' has the other row's size, so other tiles and tokens

    def scores(rows, visual):
        pairs = VisionPairs.load(write_rows(rows, tmp_path / f"{visual}.parquet"), processor, retrieved=visual)
        batch = collate_pairs([pairs[i] for i in range(2)], processor.tokenizer.pad_token_id, visual=visual)
        config = dpo.Config(model="-", data="-", output=tmp_path / "run", visual_term="retrieved" if visual else "none")
        with torch.no_grad():
            return sequence_scores(model, dpo.with_visual_images(batch, None, config))

    shown_v_prime = [{**row, "images": row.pop("retrieved_images")} for row in [dict(r) for r in rows]]
    torch.testing.assert_close(scores(rows, True)[:, 2], scores(shown_v_prime, False)[:, 0], rtol=1e-5, atol=1e-5)
