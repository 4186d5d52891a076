"""Trajectory files and preference pair records: round trips, fragments, and clear errors on bad input."""

import json

import numpy as np
import pytest

from mmalign.data import DataError
from mmalign.robotics.pairs import PairDataset, Pairs, label_pairs
from mmalign.robotics.teachers import teacher
from mmalign.robotics.trajectories import Trajectories, concatenate

TASK = "push-v3"


def make(n=4, t=10, seed=0, **kwargs):
    rng = np.random.default_rng(seed)
    arrays = dict(observations=rng.normal(size=(n, t, 39)), actions=rng.uniform(-1, 1, size=(n, t, 4)),
                  rewards=rng.uniform(0, 10, size=(n, t)), successes=rng.random((n, t)) < 0.1)
    arrays.update(kwargs)
    return Trajectories(TASK, **arrays, info={"noise": np.linspace(0, 1, n)})


def test_save_load_round_trip_with_frames(tmp_path):
    frames = np.random.default_rng(0).integers(0, 255, size=(4, 4, 8, 8, 3), dtype=np.uint8)
    trajs = make(frames=frames, meta={"frame_every": 3})
    path = trajs.save(tmp_path / "d" / "trajs.npz")
    assert not list(path.parent.glob(".*tmp")), "no temporary file is left behind"
    back = Trajectories.load(path)
    for name in ("observations", "actions", "rewards", "successes", "frames"):
        np.testing.assert_array_equal(getattr(back, name), getattr(trajs, name))
    np.testing.assert_array_equal(back.info["noise"], trajs.info["noise"])
    assert back.task == TASK and back.meta["frame_every"] == 3 and back.source == str(path)


def test_fragments_are_slices_of_their_source():
    trajs = make(n=3, t=12)
    segs = trajs.fragment(length=5, num=20, seed=1)
    assert segs.observations.shape == (20, 5, 39) and segs.meta["segment_length"] == 5
    for i in range(20):
        src, start = segs.info["source"][i], segs.info["start"][i]
        assert 0 <= start <= 7
        np.testing.assert_array_equal(segs.rewards[i], trajs.rewards[src, start:start + 5])
        np.testing.assert_array_equal(segs.actions[i], trajs.actions[src, start:start + 5])
        assert segs.info["noise"][i] == trajs.info["noise"][src]
    with pytest.raises(ValueError, match="between 1 and the horizon 12"):
        trajs.fragment(13, 2)


def test_mismatched_shapes_name_the_field():
    with pytest.raises(DataError, match=r"field 'rewards': shape \(4, 9\) does not match observations \(4, 10, 39\)"):
        make(rewards=np.zeros((4, 9)))
    with pytest.raises(DataError, match=r"field 'actions': expected \[N, T, 4\]"):
        make(actions=np.zeros((4, 10)))
    with pytest.raises(DataError, match="cannot join push-v3 trajectories of shape"):
        concatenate([make(t=10), make(t=11)])


def test_nan_rewards_name_the_file_field_and_step(tmp_path):
    trajs = make()
    path = trajs.save(tmp_path / "t.npz")
    with np.load(path) as data:
        arrays = dict(data)
    arrays["rewards"][2, 7] = np.nan
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=r"(?s)t\.npz.*field 'rewards': 1 NaN or infinite value\(s\), "
                                        r"first at trajectory 2 step 7"):
        Trajectories.load(path)


def test_bad_files_and_unknown_task(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Trajectories.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="junk.npz: not a readable"):
        Trajectories.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "partial.npz", observations=np.zeros((1, 2, 3)))
    with pytest.raises(DataError, match="partial.npz: missing field\\(s\\) actions, rewards, successes, meta"):
        Trajectories.load(tmp_path / "partial.npz")
    with pytest.raises(DataError, match="field 'task': unknown Meta-World task 'pusj-v3'"):
        Trajectories("pusj-v3", *(getattr(make(), k) for k in ("observations", "actions", "rewards", "successes")))


def test_pairs_round_trip_and_dataset(tmp_path):
    segs = make(n=6, t=5)
    pairs = label_pairs(segs, 10, teacher("oracle"), seed=0, name="oracle")
    returns = segs.returns()
    assert (returns[pairs.chosen] > returns[pairs.rejected]).all() and (pairs.label == 1).all()
    back = Pairs.load(pairs.save(tmp_path / "pairs.jsonl"), segs)
    np.testing.assert_array_equal(back.chosen, pairs.chosen)
    np.testing.assert_array_equal(back.rejected, pairs.rejected)
    assert back.teacher == "oracle"
    item = PairDataset(segs, back)[3]
    np.testing.assert_array_equal(item["obs_w"].numpy(), segs.observations[pairs.chosen[3]])
    assert item["label"].item() == 1.0


def test_bad_pair_records_name_record_and_field(tmp_path):
    segs = make(n=3, t=5)
    rows = [{"prompt": TASK, "chosen": 0, "rejected": 1, "label": 1.0},
            {"prompt": TASK, "chosen": 5, "rejected": 1, "label": 1.0},
            {"prompt": TASK, "chosen": 2, "rejected": 2, "label": 1.0},
            {"prompt": TASK, "chosen": 1, "rejected": 0, "label": 1.5}]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as err:
        Pairs.load(path, segs)
    message = str(err.value)
    assert "bad.jsonl" in message and "record 1, field 'chosen': expected a segment index in [0, 3), got 5" in message
    assert "record 2, field 'rejected': is the same segment as chosen" in message
    assert "record 3, field 'label': expected a probability in [0, 1], got 1.5" in message
