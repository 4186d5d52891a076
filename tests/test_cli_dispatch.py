"""The command line itself: help per group, close matches, quiet pipes, and which errors are one-line messages."""

import errno
import subprocess
import sys
import types

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

    class Config:
        output = None

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
