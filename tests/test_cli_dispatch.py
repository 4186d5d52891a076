"""The command line itself: help per group, close matches, quiet pipes, and which errors are one-line messages."""

import dataclasses
import errno
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from mmalign import cli
from mmalign.errors import DataError


def test_group_help_lists_that_group_only(capsys):
    assert cli.main(["robotics", "--help"]) == 0
    out = capsys.readouterr().out
    assert "mmalign robotics collect" in out and "mmalign diffusion dpo" not in out
    assert cli.main(["robotics"]) == 0


def test_a_misspelled_command_is_named_with_close_matches(capsys):
    assert cli.main(["robotics", "colect"]) == 2
    assert "unknown command 'robotics colect'; did you mean 'robotics collect'?" in capsys.readouterr().err
    assert cli.main(["vision", "dop"]) == 2
    assert "did you mean 'vision dpo'" in capsys.readouterr().err
    assert cli.main(["nonsense"]) == 2


def test_help_piped_into_head_ends_quietly():
    result = subprocess.run(f"{sys.executable} -m mmalign --help | head -1", shell=True, capture_output=True,
                            text=True, timeout=120)
    assert result.stdout.startswith("usage: mmalign") and result.stderr == ""


def test_non_finite_numbers_are_refused_when_parsed(refused, tmp_path):
    err = refused("diffusion", "dpo", "--model", "m", "--data", "d", "--output", tmp_path / "run", "--beta", "nan",
                  output=tmp_path / "run")
    assert "key 'beta': 'nan' must be a finite number" in err


def fake_command(monkeypatch, error):
    module = types.ModuleType("fake_command")

    @dataclasses.dataclass
    class Config:
        output: None = None

    def run(config):
        raise error

    module.Config, module.run = Config, run
    monkeypatch.setitem(sys.modules, "fake_command", module)
    monkeypatch.setitem(cli.COMMANDS, "fake", ("fake_command", "raises"))
    monkeypatch.setattr(cli, "parse_config", lambda cls, argv, prog, description: cls())


@pytest.mark.parametrize("error, message", [
    (DataError("pairs.jsonl: record 3, field 'chosen': is empty"), "record 3, field 'chosen'"),
    (FileNotFoundError(errno.ENOENT, "No such file", "prompts.txt"), "prompts.txt: no such file or folder"),
    (OSError(errno.ENOSPC, "No space left on device", "run/checkpoints"), "run/checkpoints: the disk is full"),
    (OSError(errno.EROFS, "Read-only file system", "run"), "run: the disk is read-only"),
])
def test_user_mistakes_and_full_disks_are_one_line(monkeypatch, capsys, error, message):
    fake_command(monkeypatch, error)
    assert cli.main(["fake"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mmalign fake: error: ") and message in err and "Traceback" not in err


@pytest.mark.parametrize("error", [ValueError("operands could not be broadcast"), ImportError("broken import")])
def test_bugs_keep_their_traceback(monkeypatch, error):
    fake_command(monkeypatch, error)
    with pytest.raises(type(error)):
        cli.main(["fake"])


def test_a_misspelled_group_is_named_with_close_matches(capsys):
    assert cli.main(["difusion", "dpo"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'difusion dpo'; did you mean 'diffusion dpo'?" in err
    assert "mmalign diffusion inpo" in err and "mmalign robotics grape" not in err, "that group's commands are listed"
    assert cli.main(["robtics", "grape"]) == 2
    assert "unknown command 'robtics grape'; did you mean 'robotics grape'?" in capsys.readouterr().err
    assert cli.main(["robtics", "grpe"]) == 2
    assert "did you mean 'robotics grape'?" in capsys.readouterr().err
    assert cli.main(["robtics"]) == 2
    assert "unknown command 'robtics'; did you mean 'robotics'?" in capsys.readouterr().err
    assert cli.main(["robtics", "xyz"]) == 2
    assert "unknown command 'robtics xyz'; did you mean 'robotics'?" in capsys.readouterr().err


def robotics_inputs(tmp_path):
    """Each robotics command with one input missing: (argv, the flag, the missing path)."""
    folder, file = tmp_path / "folder", tmp_path / "file.npz"
    folder.mkdir()
    file.write_bytes(b"")
    missing = str(tmp_path / "missing.npz")
    run = ["--output", str(tmp_path / "run")]
    return [
        (["robotics", "collect", "--task", "reach-v3", "--policy", "learned", "--policy-path", missing, "--output",
          str(tmp_path / "out.npz")], "--policy-path"),
        (["robotics", "label", "--data", missing, *run], "--data"),
        (["robotics", "reward", "--data", str(folder), "--eval-data", missing, *run], "--eval-data"),
        (["robotics", "pearl", "--source", str(folder), "--target", missing, *run], "--target"),
        (["robotics", "pearl", "--source", str(folder), "--target", str(file), "--eval-data", missing, *run],
         "--eval-data"),
        (["robotics", "rapl", "--data", str(file), "--eval-data", missing, *run], "--eval-data"),
        (["robotics", "rapl", "--data", str(file), "--eval-data", str(file), "--demos", missing, *run], "--demos"),
        (["robotics", "rapl", "--data", str(file), "--eval-data", str(file), "--backbone-checkpoint", missing, *run],
         "--backbone-checkpoint"),
        (["robotics", "grape", "--task", "reach-v3", "--demos", missing, *run], "--demos"),
        (["robotics", "grape", "--task", "reach-v3", "--policy", missing, *run], "--policy"),
    ], missing


def test_every_robotics_input_is_checked_before_anything_runs(tmp_path, capsys):
    cases, missing = robotics_inputs(tmp_path)
    for argv, flag in cases:
        assert cli.main(argv) == 1, argv
        err = capsys.readouterr().err
        assert f"error: {flag} {missing}: no such " in err, (argv, err)
        assert not (tmp_path / "run").exists() and not (tmp_path / "out.npz").exists(), "nothing was started"
    assert cli.main(["robotics", "grape", "--task", "reach-v3", "--demos", str(tmp_path / "folder"), "--output",
                     str(tmp_path / "run")]) == 1
    assert f"--demos {tmp_path / 'folder'}: a folder, not the file it names" in capsys.readouterr().err


def test_an_unreadable_input_is_named_with_its_flag(tmp_path, capsys, monkeypatch):
    held_out = tmp_path / "held_out.npz"
    held_out.write_bytes(b"x")
    readable = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != held_out and readable(path, mode))
    assert cli.main(["robotics", "reward", "--data", str(tmp_path), "--eval-data", str(held_out), "--output",
                     str(tmp_path / "run")]) == 1
    assert f"--eval-data {held_out}: the file cannot be read" in capsys.readouterr().err
