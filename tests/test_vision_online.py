"""Online BDHS: rejected rows resampled from the current policy each step, reproducibly."""

import json

import pytest
import torch

from mmalign.cli import main
from mmalign.reference import AdapterDisabled
from mmalign.vision import dpo, models, online
from mmalign.vision.data import VisionPairs, collate_pairs, write_rows
from mmalign.vision.tiny import tiny_llava
from mmalign.vision.world import preference_rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model, processor = tiny_llava(seed=0)
    rows = preference_rows(4, seed=0)
    rows[0]["chosen"] = " the red circle is there </s>"
    path = write_rows(rows, tmp_path_factory.mktemp("online") / "rows.parquet")
    pairs = VisionPairs.load(path, processor)
    return model, processor, pairs, path


def test_rejected_rows_continue_the_chosen_prefix_and_are_reproducible(setup):
    model, processor, pairs, _ = setup
    batch = collate_pairs([pairs[i] for i in range(4)], processor.tokenizer.pad_token_id)
    new = online.online_rejected(model, batch, torch.Generator().manual_seed(0), processor, 0.01, 4)
    again = online.online_rejected(model, batch, torch.Generator().manual_seed(0), processor, 0.01, 4)
    assert torch.equal(new["input_ids"], again["input_ids"])
    old_rows, new_rows = online.split_rows(batch, 4), online.split_rows(new, 4)
    assert old_rows == new_rows  # prompts and chosen answers untouched
    for i in range(4):
        mask = new["completion_mask"][4 + i].bool()
        start = int(mask.float().argmax())
        rejected = new["input_ids"][4 + i, start:start + int(mask.sum())].tolist()
        assert new["input_ids"][4 + i, :start].tolist() == old_rows[i]["prompt_ids"]
        assert 1 <= len(rejected) <= len(old_rows[i]["chosen_ids"]) + 4
    assert torch.equal(new["images"]["pixel_values"], batch["images"]["pixel_values"])
    assert torch.equal(new["image_counts"], batch["image_counts"])


def test_online_step_trains(setup, tmp_path):
    model, processor, pairs, _ = setup
    lora = models.add_lora(tiny_llava(seed=0)[0], 4, None, models.LORA_TARGETS)
    config = dpo.Config(model="-", data="-", output=tmp_path / "run", online_bdhs=True, bdhs_max_new_tokens=3)
    parts = dpo.Parts(AdapterDisabled(), config, True, processor)
    batch = collate_pairs([pairs[i] for i in range(4)], processor.tokenizer.pad_token_id)
    loss, metrics = dpo.dpo_step(lora, batch, torch.Generator().manual_seed(0), parts)
    loss.backward()
    assert loss.item() == pytest.approx(0.6931, abs=1e-3) and lora.training
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in lora.named_parameters() if "lora" in n)


def test_online_run_resumes_exactly(setup, tmp_path):
    model, processor, _, data = setup
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    common = ["vision", "dpo", "--model", str(tmp_path / "m"), "--data", str(data), "--batch-size", "2",
              "--learning-rate", "1e-2", "--report-to", "none", "--online-bdhs", "--bdhs-max-new-tokens", "3",
              "--checkpoint-every", "1"]
    assert main([*common, "--output", str(tmp_path / "whole"), "--max-steps", "3"]) == 0
    assert main([*common, "--output", str(tmp_path / "split"), "--max-steps", "1"]) == 0
    assert main([*common, "--output", str(tmp_path / "split"), "--max-steps", "3", "--resume", "latest"]) == 0
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("whole", "split")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
