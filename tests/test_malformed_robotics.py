"""Malformed inputs to the robotics commands: one clear error naming the file, record or flag; nothing written.

Every case runs `mmalign robotics ...` in-process through the `refused` fixture (exit 1 or 2, no traceback, the
output untouched). The inputs are small synthetic trajectory files made once per module: no command gets as far
as the simulator.
"""

import json
import shutil
import zipfile
from typing import Any

import numpy as np
import pytest
import torch

from mmalign.errors import RunFolderError
from mmalign.robotics import grape, label, pearl, rapl, reward
from mmalign.robotics.policies import GaussianPolicy, PolicyArch
from mmalign.robotics.trajectories import Trajectories

TASK = "button-press-v3"


def trajectories(n=6, steps=20, task=TASK, side=16, seed=0, **arrays) -> Trajectories:
    """`n` random trajectories with frames of `side` pixels every 4 steps; `arrays` replace any field."""
    rng = np.random.default_rng(seed)
    fields: dict[str, Any] = dict(
        observations=rng.normal(size=(n, steps, 39)), actions=rng.uniform(-1, 1, (n, steps, 4)),
        rewards=rng.uniform(0, 1, (n, steps)), successes=np.zeros((n, steps), bool),
        frames=rng.integers(0, 256, (n, -(-steps // 4), side, side, 3), dtype=np.uint8))
    fields.update(arrays)
    return Trajectories(task, **fields, meta={"frame_every": 4})


def npz_without(path, source, *fields):
    """A copy of the trajectory file `source` without `fields`."""
    with np.load(source) as data:
        np.savez(path, **{k: data[k] for k in data.files if k not in fields})
    return path


def npz_with(path, source, **arrays):
    """A copy of the trajectory file `source` with some arrays replaced."""
    with np.load(source) as data:
        np.savez(path, **{**{k: data[k] for k in data.files}, **arrays})
    return path


def pairs_folder(path, labelled, lines):
    """A copy of the labelled folder whose pairs.jsonl holds `lines`."""
    shutil.copytree(labelled, path)
    (path / "pairs.jsonl").write_text("".join(line + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Every input the cases name, by placeholder."""
    root = tmp_path_factory.mktemp("malformed")
    good = trajectories().save(root / "good.npz")
    f = {"good": good, "eval": trajectories(seed=1).save(root / "eval.npz")}
    f["truncated"] = root / "truncated.npz"
    f["truncated"].write_bytes(good.read_bytes()[:100])
    f["empty"] = root / "empty.npz"
    f["empty"].write_bytes(b"")
    with zipfile.ZipFile(root / "zip.npz", "w") as archive:
        archive.writestr("notes.txt", "not arrays")
    f["zip"] = root / "zip.npz"
    f["no_rewards"] = npz_without(root / "no-rewards.npz", good, "rewards")
    f["mismatched"] = npz_with(root / "mismatched.npz", good, rewards=np.zeros((6, 19)))
    with np.load(good) as data:
        f["no_trajectories"] = npz_with(root / "none.npz", good, **{k: data[k][:0] for k in data.files if k != "meta"})
    observations = np.zeros((6, 20, 39))
    observations[2, 7, 5] = np.nan
    f["nan"] = npz_with(root / "nan.npz", good, observations=observations)
    f["strings"] = npz_with(root / "strings.npz", good, actions=np.full((6, 20, 4), "x"))
    f["no_frames"] = npz_without(root / "no-frames.npz", good, "frames")
    f["short"] = trajectories(steps=5).save(root / "short.npz")
    f["one"] = trajectories(n=1).save(root / "one.npz")
    f["odd_frames"] = trajectories(side=10).save(root / "odd-frames.npz")
    f["reach"] = trajectories(task="reach-v3").save(root / "reach.npz")
    f["missing"] = root / "missing.npz"

    labelled = root / "labelled"
    label.run(label.Config(data=str(good), output=labelled, segment_length=10, segments=20, pairs=40))
    record = {"prompt": TASK, "chosen": 0, "rejected": 1, "label": 1.0}
    f["labelled"] = labelled
    f["broken_line"] = pairs_folder(root / "broken-line", labelled, [json.dumps(record), '{"prompt": "button'])
    f["out_of_range"] = pairs_folder(root / "out-of-range", labelled, [json.dumps({**record, "rejected": 20})])
    f["no_pairs"] = pairs_folder(root / "no-pairs", labelled, [])
    f["other_task_pairs"] = pairs_folder(root / "other-task", labelled, [json.dumps({**record, "prompt": "reach-v3"})])
    f["no_pairs_file"] = root / "no-pairs-file"
    shutil.copytree(labelled, f["no_pairs_file"])
    (f["no_pairs_file"] / "pairs.jsonl").unlink()

    policy = GaussianPolicy(PolicyArch(39, 4, hidden=8, layers=1))
    f["policy_empty"] = root / "policy-empty"
    f["policy_empty"].mkdir()
    f["policy_bad_json"] = root / "policy-bad-json"
    policy.save(f["policy_bad_json"])
    (f["policy_bad_json"] / "policy.json").write_text('{"obs_dim": 39,')
    f["policy_wrong_size"] = root / "policy-wrong-size"
    GaussianPolicy(PolicyArch(5, 4, hidden=8, layers=1)).save(f["policy_wrong_size"])
    f["policy_wrong_weights"] = root / "policy-wrong-weights"
    policy.save(f["policy_wrong_weights"])
    (f["policy_wrong_weights"] / "policy.json").write_text(json.dumps({"obs_dim": 39, "act_dim": 4, "hidden": 16,
                                                                         "layers": 1}))

    f["garbage_pt"] = root / "garbage.pt"
    f["garbage_pt"].write_bytes(b"not a checkpoint")
    f["linear_pt"] = root / "linear.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), f["linear_pt"])
    f["bad_teacher"] = root / "teacher.yaml"
    f["bad_teacher"].write_text("teacher: lazy\n")
    return f


CASES = {
    # trajectory files (label reads one and nothing else)
    "truncated npz": ("label --data {truncated}", "truncated.npz: not a readable .npz trajectory file"),
    "empty npz": ("label --data {empty}", "empty.npz: the file is empty (0 bytes)"),
    "zip that is not an npz": ("label --data {zip}", "zip.npz: missing field(s) observations"),
    "npz missing a field": ("label --data {no_rewards}", "no-rewards.npz: missing field(s) rewards"),
    "mismatched lengths": ("label --data {mismatched}", "field 'rewards': shape (6, 19) does not match observations"),
    "no trajectories": ("label --data {no_trajectories}", "field 'observations': no trajectories"),
    "NaN observations": ("label --data {nan}",
                         "field 'observations': 1 NaN or infinite value(s), first at trajectory 2 step 7"),
    "text instead of numbers": ("label --data {strings}", "field 'actions': expected numbers, got an array of <U1"),
    "missing trajectory file": ("label --data {missing}", "--data {missing}: no such file"),
    "segments longer than the trajectories": ("label --data {good}", "--segment-length 50 is longer than"),
    "unknown teacher": ("label --config {bad_teacher} --data {good}", "key 'teacher': 'lazy' must be one of oracle"),
    "one segment": ("label --data {good} --segments 1", "segments must be at least 2"),
    "no pairs": ("label --data {good} --pairs 0", "pairs must be at least 1"),
    # labelled folders, held-out files
    "pairs with a broken line": ("reward --data {broken_line}", "pairs.jsonl: line 2 is not JSON"),
    "pair index out of range": ("reward --data {out_of_range}",
                                "record 0, field 'rejected': expected a segment index in [0, 20), got 20"),
    "empty pair file": ("reward --data {no_pairs}", "pairs.jsonl: no pair records"),
    "pairs of another task": ("reward --data {other_task_pairs}", "field 'prompt': the pairs are of task(s) reach-v3"),
    "labelled folder without pairs": ("reward --data {no_pairs_file}", "no-pairs-file holds no pairs.jsonl"),
    "too few pairs for a batch": ("reward --data {labelled}", "40 pair(s), fewer than one batch of 64"),
    "missing --eval-data": ("reward --data {labelled} --batch-size 8 --eval-data {missing}",
                            "--eval-data {missing}: no such file"),
    "corrupt --eval-data": ("reward --data {labelled} --batch-size 8 --eval-data {truncated}",
                            "truncated.npz: not a readable .npz"),
    "--eval-data of another task": ("reward --data {labelled} --batch-size 8 --eval-data {reach}",
                                    "reach.npz: held-out trajectories of reach-v3"),
    "--eval-data shorter than the segments": ("reward --data {labelled} --batch-size 8 --eval-data {short}",
                                              "short.npz: held-out trajectories of 5 steps are shorter"),
    "zero ensemble members": ("reward --data {labelled} --members 0", "members must be at least 1"),
    # PEARL
    "corrupt --target": ("pearl --source {labelled} --target {truncated}", "truncated.npz: not a readable"),
    "--target shorter than the source segments": ("pearl --source {labelled} --target {short}",
                                                  "target trajectories of 5 steps are shorter than the 10-step"),
    "--source without pairs": ("pearl --source {no_pairs_file} --target {good}", "holds no pairs.jsonl"),
    "pearl: corrupt --eval-data": ("pearl --source {labelled} --target {good} --eval-data {empty}",
                                   "empty.npz: the file is empty"),
    # RAPL
    "trajectories without frames": ("rapl --data {no_frames} --eval-data {eval}", "no-frames.npz: no frames"),
    "rapl: corrupt --eval-data": ("rapl --data {good} --eval-data {zip}", "zip.npz: missing field(s)"),
    "rapl: one held-out trajectory": ("rapl --data {good} --eval-data {one}", "one.npz: 1 held-out trajectory"),
    "missing --demos": ("rapl --data {good} --eval-data {eval} --demos {missing}", "--demos {missing}: no such file"),
    "--demos of another task": ("rapl --data {good} --eval-data {eval} --demos {reach}",
                                "reach.npz: trajectories of reach-v3"),
    "unknown backbone": ("rapl --data {good} --eval-data {eval} --backbone resnet", "unknown backbone 'resnet'"),
    "misspelled torchvision model": ("rapl --data {good} --eval-data {eval} --backbone torchvision:resnet81",
                                     "torchvision has no model 'resnet81'; did you mean resnet18"),
    "garbage backbone checkpoint": ("rapl --data {good} --eval-data {eval} --backbone-checkpoint {garbage_pt}",
                                    "garbage.pt: not a readable torch.save state dict"),
    "checkpoint of another network": ("rapl --data {good} --eval-data {eval} --backbone-checkpoint {linear_pt}",
                                      "linear.pt: the checkpoint does not fit the backbone"),
    "frames not divisible by 16": ("rapl --data {odd_frames} --eval-data {odd_frames}", "frames of 10x10 pixels"),
    "too few frames to pretrain": ("rapl --data {good} --eval-data {eval}", "30 frames, fewer than one pretraining"),
    "fewer triplets than a batch": ("rapl --data {good} --eval-data {eval} --triplets 4",
                                    "--triplets 4 is fewer than one batch"),
    # GRAPE
    "misspelled task": ("grape --task drawer-opne-v3", "unknown Meta-World task 'drawer-opne-v3'; did you mean "
                                                       "drawer-open-v3"),
    "task without stage costs": ("grape --task assembly-v3", "no GRAPE stage constraints are written for assembly-v3"),
    "policy folder without its files": ("grape --task reach-v3 --policy {policy_empty}",
                                        "policy-empty holds no policy (policy.json and policy.safetensors)"),
    "policy.json cut off": ("grape --task reach-v3 --policy {policy_bad_json}",
                            "policy.json: not a policy description"),
    "policy of another robot": ("grape --task reach-v3 --policy {policy_wrong_size}",
                                "a policy of 5 observation and 4 action features"),
    "weights that do not fit policy.json": ("grape --task reach-v3 --policy {policy_wrong_weights}",
                                            "policy.safetensors: the weights do not fit policy.json"),
    "corrupt --demos": ("grape --task reach-v3 --demos {truncated}", "truncated.npz: not a readable"),
    "grape: --demos of another task": ("grape --task reach-v3 --demos {good}",
                                       "good.npz: demonstrations of button-press-v3, not of --task reach-v3"),
    "--policy and --demos": ("grape --task reach-v3 --policy {policy_empty} --demos {good}", "give one of them"),
    "one sample per state": ("grape --task reach-v3 --samples-per-state 1", "samples_per_state must be at least 2"),
    "fewer states than a batch": ("grape --task reach-v3 --states 4", "--states 4 gives at most 4 pairs a round"),
    "resume from a named checkpoint": ("grape --task reach-v3 --resume somewhere/checkpoint-5",
                                       "pass --resume latest"),
    # collect
    "collect: misspelled task": ("collect --task buton-press-v3", "did you mean button-press-v3"),
    "zero episodes": ("collect --task reach-v3 --episodes 0", "episodes must be at least 1"),
    "zero environments": ("collect --task reach-v3 --num-envs 0", "num_envs must be at least 1"),
    "negative seed": ("collect --task reach-v3 --state-seed -1", "state_seed must not be negative"),
    "negative noise": ("collect --task reach-v3 --noise 0.5 -1", "noise must be a non-empty list of finite"),
    "learned policy without a folder": ("collect --task reach-v3 --policy learned", "--policy learned needs"),
    "policy folder for the expert": ("collect --task reach-v3 --policy-path {policy_empty}",
                                     "--policy-path is for --policy learned"),
    "collect: policy folder without its files": ("collect --task reach-v3 --policy learned --policy-path "
                                                 "{policy_empty}", "holds no policy"),
    "existing output file": ("collect --task reach-v3 --output {good}", "good.npz already exists"),
}


@pytest.mark.parametrize("case", CASES)
def test_malformed_input_is_refused_before_anything_is_written(case, files, tmp_path, refused):
    flags, message = CASES[case]
    message = message.format(**files)
    command = flags.split()[0]
    argv = [word.format(**files) for word in flags.split()]
    if "--output" in argv:
        output = argv[argv.index("--output") + 1]
    else:
        output = tmp_path / ("out.npz" if command == "collect" else "run")
        argv += ["--output", str(output)]
    err = refused("robotics", *argv, output=output)
    error = err[err.index(f"mmalign robotics {command}: error: "):]  # after any progress bar of `datasets`
    assert message in error and "\n\n" not in error.strip(), error


def test_a_teacher_outside_the_choices_is_refused_by_the_parser(files, tmp_path, capsys):
    from mmalign.cli import main

    with pytest.raises(SystemExit) as done:
        main(["robotics", "label", "--data", str(files["good"]), "--teacher", "lazy", "--output", str(tmp_path / "x")])
    assert done.value.code == 2 and "invalid choice: 'lazy'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_commands_called_from_python_claim_their_output_folder(files, tmp_path):
    """A folder that holds something else is refused before any stage writes into it (not only from the CLI)."""
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    runs = [(label, label.Config(data=str(files["good"]), output=taken, segment_length=10)),
            (reward, reward.Config(data=str(files["labelled"]), output=taken)),
            (pearl, pearl.Config(source=str(files["labelled"]), target=str(files["good"]), output=taken)),
            (rapl, rapl.Config(data=str(files["good"]), eval_data=str(files["eval"]), output=taken)),
            (grape, grape.Config(task="reach-v3", output=taken))]
    for module, config in runs:
        with pytest.raises(RunFolderError, match="is not empty"):
            module.run(config)
    assert {p.name for p in taken.iterdir()} == {"notes.txt"}
    assert (taken / "notes.txt").read_text() == "mine"


def test_a_missing_extra_is_named(refused, files, tmp_path, monkeypatch):
    import sys

    for name in [m for m in sys.modules if m.startswith("mmalign.robotics")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ot", None)  # POT not installed
    err = refused("robotics", "label", "--data", files["good"], "--output", tmp_path / "run", output=tmp_path / "run")
    assert "mmalign.robotics needs POT (not installed): pip install 'mmalign[robotics]'" in err
