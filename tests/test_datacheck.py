"""`mmalign data check PATH`: every row read in worker processes; bad rows listed with record and field, exit code 1."""

import json

from mmalign.cli import main
from mmalign.diffusion.data import write_pickapic
from mmalign.diffusion.world import png_bytes, preference_pairs, render


def test_data_check_reads_every_image_and_lists_each_bad_row(tmp_path, capsys):
    rows = preference_pairs(40, seed=0)
    data = png_bytes(render("a blue square", 16, 16, 6))
    rows[17]["jpg_1"] = data[: len(data) // 2]  # truncated: its header reads, its pixels do not
    rows[29]["jpg_0"] = b"not an image"
    path = write_pickapic(rows, tmp_path / "pairs.parquet")
    report = tmp_path / "bad.jsonl"
    assert main(["data", "check", str(path), "--workers", "2", "--report", str(report)]) == 1
    message = capsys.readouterr().err
    assert "pairs.parquet: 2 of 40 rows cannot be read" in message
    assert "record 17, field 'jpg_1': cannot be read" in message and "record 29, field 'jpg_0'" in message
    assert [(r["index"], r["field"]) for r in map(json.loads, report.read_text().splitlines())] == \
        [(17, "jpg_1"), (29, "jpg_0")]
    rows[17]["jpg_1"], rows[29]["jpg_0"] = data, data
    assert main(["data", "check", str(write_pickapic(rows, tmp_path / "good.parquet")), "--workers", "0"]) == 0
    assert "all 40 rows read" in capsys.readouterr().out
