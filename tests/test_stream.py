"""--streaming: records read lazily from sharded files, checked as read, in the same batches on resume and with
loading workers."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from mmalign.data import Field, Schema, number_list
from mmalign.errors import DataError
from mmalign.stream import Stream
from mmalign.trainer import TrainConfig, Trainer

SCHEMA = Schema("point", (Field("x", number_list), Field("y", lambda v, r: None if isinstance(v, float) else "not a "
                                                                                                             "number")))


def write_shards(folder, shards=3, per_shard=7, bad=()):
    """Shards of JSONL points y = x . (1, -2, 0.5) + 0.3; rows numbered in `bad` have no y (null)."""
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    number = 0
    for shard in range(shards):
        lines = []
        for _ in range(per_shard):
            x = torch.randn(3, generator=g)
            y = float(x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3)
            lines.append(json.dumps({"x": x.tolist(), "y": None if number in bad else y, "n": number}))
            number += 1
        (folder / f"part-{shard:02d}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def load(record, row):
    return {"x": torch.tensor(record["x"]), "y": torch.tensor(record["y"]), "n": torch.tensor(record["n"])}


def collate(items):
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def fit(folder, output, skip=False, **overrides):
    settings = dict(output=output, max_steps=30, batch_size=4, learning_rate=0.05, checkpoint_every=10,
                    report_to="none", seed=1, bad_rows="skip" if skip else "error")
    settings.update(overrides)
    torch.manual_seed(0)
    model, seen = nn.Linear(3, 1), []

    def step(model, batch, generator):
        seen.append(batch["n"].tolist())
        return (model(batch["x"]).squeeze(-1) - batch["y"]).pow(2).mean(), {}

    history = Trainer(TrainConfig(**settings)).fit(model, Stream(folder, SCHEMA, load, shuffle_buffer=5), collate, step)
    return history, model, seen


def numbers(stream, count, **place):
    """The point numbers of the first `count` rows of `stream.rows`."""
    return [record["n"] for _, (_, record) in zip(range(count), stream.rows(seed=1, **place))]


def test_epochs_are_reshuffled_and_every_row_is_read_once_per_epoch(tmp_path):
    stream = Stream(write_shards(tmp_path / "d"), SCHEMA, load, shuffle_buffer=5)
    first, second = (sorted(numbers(stream, 42)[e * 21:(e + 1) * 21]) for e in (0, 1))
    assert first == second == list(range(21))
    order = numbers(stream, 42)
    assert order[:21] != order[21:] and order == numbers(stream, 42)  # reshuffled, and the same each time
    assert numbers(Stream(tmp_path / "d", SCHEMA, load, shuffle_buffer=1), 21) == list(range(21))  # stored order


def test_processes_read_disjoint_parts(tmp_path):
    stream = Stream(write_shards(tmp_path / "d", shards=2, per_shard=5), SCHEMA, load, shuffle_buffer=1)
    parts = [numbers(stream, 5, rank=r, processes=2) for r in (0, 1)]
    assert sorted(parts[0] + parts[1]) == list(range(10))


def test_resume_and_workers_see_the_same_batches(tmp_path):
    data = write_shards(tmp_path / "d")
    full, full_model, seen = fit(data, tmp_path / "full")
    fit(data, tmp_path / "part", max_steps=10)
    resumed, resumed_model, seen_resumed = fit(data, tmp_path / "part", resume="latest")
    assert seen_resumed == seen[10:]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[10:]]
    torch.testing.assert_close(resumed_model.weight, full_model.weight, rtol=0, atol=0)
    _, worker_model, seen_workers = fit(data, tmp_path / "workers", num_workers=2)
    assert seen_workers == seen
    torch.testing.assert_close(worker_model.weight, full_model.weight, rtol=0, atol=0)
    target, start = torch.tensor([[1.0, -2.0, 0.5]]), (torch.manual_seed(0), nn.Linear(3, 1))[1].weight
    assert (full_model.weight - target).norm() < 0.5 * (start - target).norm()  # it learns from the stream


def test_a_bad_row_stops_the_run_or_is_left_out_of_its_batch(tmp_path):
    data = write_shards(tmp_path / "d", bad={5})
    with pytest.raises(DataError, match=r"record \d+, field 'y': not a number.*training stopped"):
        fit(data, tmp_path / "error")
    history, _, seen = fit(data, tmp_path / "skip", skip=True, max_steps=6)
    assert 5 not in sum(seen, []) and sum(h["bad_rows"] for h in history) == 1
    assert sorted(len(batch) for batch in seen[:5]) == [3, 4, 4, 4, 4]
    report = [json.loads(line) for line in (tmp_path / "skip" / "bad_rows.jsonl").read_text().splitlines()]
    assert [(r["file"], r["field"]) for r in report] == [(str(data), "y")]


def test_the_first_record_names_missing_fields(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    pq.write_table(pa.table({"x": [[1.0, 2.0, 3.0]]}), str(folder / "a.parquet"))
    with pytest.raises(DataError, match="point records need field.s. y; the data has x"):
        Stream(folder, SCHEMA, load)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .parquet or .jsonl"):
        Stream(tmp_path / "empty", SCHEMA, load)


def test_streamed_pairs_train_diffusion_dpo_and_resume_exactly(tiny_sd, pickapic, tmp_path):
    """Pick-a-Pic pairs streamed from two Parquet shards: the items are the map-style dataset's (ties dropped, winner
    first), and a Diffusion-DPO run resumed at step 2 logs the losses of an uninterrupted one."""
    from mmalign.diffusion import dpo
    from mmalign.diffusion.data import PreferencePairs

    table = pq.read_table(str(pickapic))
    shards = tmp_path / "shards"
    shards.mkdir()
    for i, start in enumerate((0, 12)):
        pq.write_table(table.slice(start, 12), str(shards / f"train-{i}.parquet"))
    stored = PreferencePairs(pickapic, resolution=32)
    streamed = PreferencePairs(shards, resolution=32, streaming=True, shuffle_buffer=1).stream
    for (row, record), i in zip(streamed.rows(seed=0), range(len(stored))):
        item, expected = streamed.load(record, row), stored[i]
        assert item["caption"] == expected["caption"]
        torch.testing.assert_close(item["pixel_values"], expected["pixel_values"])

    def run(output, **overrides):
        dpo.run(dpo.Config(model=str(tiny_sd), data=str(shards), streaming=True, output=output, batch_size=2,
                           num_samples=0, report_to="none", checkpoint_every=0, learning_rate=1e-3, **overrides))
        return [json.loads(line)["loss"] for line in (output / "metrics.jsonl").read_text().splitlines()]

    full = run(tmp_path / "full", max_steps=4)
    run(tmp_path / "part", max_steps=2)
    assert run(tmp_path / "part", max_steps=4, resume="latest") == full
    with pytest.raises(ValueError, match="use one or the other"):
        dpo.Config(model=str(tiny_sd), data=str(shards), output=tmp_path / "x", streaming=True, cache_latents=True)


def test_streamed_vision_rows_train_vision_dpo_resume_exactly_and_skip_a_row_that_does_not_fit(tiny_dir, tmp_path):
    """TRL rows streamed from two Parquet shards: the items are VisionPairs' items, a run resumed at step 2 logs the
    losses of an uninterrupted one, and a row whose prompt cannot fit --max-length is a bad row, skipped and named."""
    from mmalign.cli import main
    from mmalign.vision.data import VisionPairs, write_rows
    from mmalign.vision.models import load_processor
    from mmalign.vision.world import preference_rows

    rows = preference_rows(8, seed=0)
    shards = tmp_path / "rows"
    shards.mkdir()
    for i in range(2):
        write_rows(rows[4 * i:4 * (i + 1)], shards / f"train-{i}.parquet")
    processor = load_processor(str(tiny_dir))
    stored = VisionPairs.load(write_rows(rows, tmp_path / "all.parquet"), processor)
    streamed = VisionPairs.stream(shards, processor, shuffle_buffer=1)
    for (row, record), i in zip(streamed.rows(seed=0), range(len(rows))):
        item, expected = streamed.load(record, row), stored[i]
        assert [item[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")] == \
            [expected[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")]
        torch.testing.assert_close(item["images"]["pixel_values"], expected["images"]["pixel_values"])

    def run(output, *flags):
        assert main(["vision", "dpo", "--model", str(tiny_dir), "--data", str(shards), "--streaming", "--output",
                     str(output), "--batch-size", "2", "--learning-rate", "1e-2", "--report-to", "none",
                     *map(str, flags)]) == 0
        return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]

    full = run(tmp_path / "full", "--max-steps", 4)
    run(tmp_path / "part", "--max-steps", 2)
    assert [m["loss"] for m in run(tmp_path / "part", "--max-steps", 4, "--resume", "latest")] == \
        pytest.approx([m["loss"] for m in full], rel=1e-5)
    rows[2]["prompt"] = rows[2]["prompt"] + " describe the image ." * 8  # too long for --max-length 40
    write_rows(rows[:4], shards / "train-0.parquet")
    skipped = run(tmp_path / "skip", "--max-steps", 4, "--max-length", 40, "--bad-rows", "skip", "--shuffle-buffer", 1)
    assert sum(m["bad_rows"] for m in skipped) == 1
    report = [json.loads(line) for line in (tmp_path / "skip" / "bad_rows.jsonl").read_text().splitlines()]
    assert [(r["index"], r["field"]) for r in report] == [(2, "chosen")]
