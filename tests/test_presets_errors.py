"""The one preset registry, and which errors the `engram` command reports as one line."""

import subprocess
import sys

import pytest

import engram.cli as cli
from engram.config import ConfigError, EngramConfig, UserError, engram_preset, presets, register_preset
from engram.store.format import StoreFormatError
from engram.train.checkpoint import CheckpointError
from engram.train.config import RunConfig, apply_overrides, run_preset

# ---------------------------------------------------------------------------------- registry

def test_one_registry_distinct_names_that_say_what_they_are():
    every, engram, run = presets(), presets("engram"), presets("run")
    assert set(engram) == {"engram-reference", "engram-debug", "engram-demo"}
    assert set(run) == {"debug", "demo"}
    assert set(every) == set(engram) | set(run) and not set(engram) & set(run)
    for name, p in every.items():
        assert p.name == name and p.description and "\n" not in p.description
        assert name.startswith("engram-") == (p.kind == "engram")
    for name in engram:
        assert isinstance(engram_preset(name), EngramConfig)
    for name in run:
        cfg = run_preset(name)
        assert isinstance(cfg, RunConfig) and cfg.preset == name
    assert engram_preset("engram-demo") == engram_preset("engram-demo")  # a fresh config each time
    assert engram_preset("engram-demo") is not engram_preset("engram-demo")


def test_unknown_names_list_the_valid_ones_of_the_right_kind():
    with pytest.raises(ValueError, match=r"unknown Engram-layer preset 'demo' \('demo' is a training-run preset\); "
                                         r"valid: engram-reference, engram-debug, engram-demo"):
        engram_preset("demo")
    with pytest.raises(ValueError, match=r"unknown training-run preset 'engram-demo' .*; valid: debug, demo$"):
        run_preset("engram-demo")
    with pytest.raises(ConfigError, match="valid: debug, demo$"):
        run_preset("nope")


def test_a_name_cannot_mean_two_things():
    with pytest.raises(ValueError, match="'demo' is already taken by the training-run preset"):
        register_preset("demo", "engram", "another demo")(lambda: EngramConfig())
    with pytest.raises(ValueError, match="one-line description"):
        register_preset("x", "engram", "two\nlines")
    with pytest.raises(ValueError, match="preset kind"):
        register_preset("x", "model", "a kind that does not exist")


def test_overrides_keep_field_types():
    base = run_preset("debug")
    assert apply_overrides(base, ["train.lr=1", "data.tokenizer='mistral-sp'"]).train.lr == 1
    for bad in ("train.steps=1e3", "train.steps=ten", "train.compile_engram=1", "model.d_model=True"):
        with pytest.raises(ConfigError, match="expected"):
            apply_overrides(base, [bad])
    assert base == run_preset("debug")  # the input config is left as it was


# ------------------------------------------------------------------------------ CLI errors

USER_ERRORS = [UserError("bad argument"), ConfigError("train.lr must be > 0"), StoreFormatError("bad magic"),
               CheckpointError("checkpoint truncated"), FileNotFoundError(2, "No such file or directory", "x.txt"),
               PermissionError(13, "Permission denied", "x.txt"), IsADirectoryError(21, "Is a directory", "d"),
               NotADirectoryError(20, "Not a directory", "f")]
BUGS = [RuntimeError("boom"), TypeError("unsupported operand"), AssertionError("invariant"), ValueError("shapes"),
        KeyError("k"), IndexError("i"), OSError(5, "Input/output error")]


def _raising(exc):
    def command(args):
        raise exc
    return command


@pytest.mark.parametrize("exc", USER_ERRORS, ids=lambda e: type(e).__name__)
def test_user_errors_are_one_line(exc, monkeypatch, capsys):
    monkeypatch.setattr(cli.commands, "_hash", _raising(exc))
    assert cli.main(["hash", "x"]) == 2
    err = capsys.readouterr().err
    assert err == f"engram: error: {exc}\n"


@pytest.mark.parametrize("exc", BUGS, ids=lambda e: type(e).__name__)
def test_programming_errors_keep_their_traceback(exc, monkeypatch, capsys):
    monkeypatch.setattr(cli.commands, "_hash", _raising(exc))
    with pytest.raises(type(exc)) as got:
        cli.main(["hash", "x"])
    assert got.value is exc
    assert "engram: error" not in capsys.readouterr().err


def test_multi_line_messages_become_one_line(monkeypatch, capsys):
    monkeypatch.setattr(cli.commands, "_hash", _raising(UserError("first\n  second\n")))
    assert cli.main(["hash", "x"]) == 2
    assert capsys.readouterr().err == "engram: error: first second\n"


def test_real_commands_report_user_errors(tmp_path, capsys):
    cases = [
        (["train", "--set", "train.steps=ten"], "override 'train.steps=ten': expected int"),
        (["train", "--set", "train.lr=-1"], "train.lr must be > 0"),
        (["train", "--set", "nosuch.x=1"], "no config section 'nosuch'"),
        (["compare", "--experts-moved", "40"], "n_experts_moved"),
        (["generate", "--model", str(tmp_path / "none"), "--prompt", "x"], "No such file"),
    ]
    bogus = tmp_path / "tok.json"
    bogus.write_text("{}")
    cases.append((["vocab-stats", str(bogus)], "neither a Hugging Face tokenizer.json nor a tekken file"))
    for argv, want in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("engram: error: ") and want in err and err.count("\n") == 1, (argv, err)


def test_subprocess_user_error_and_bug():
    user = subprocess.run([sys.executable, "-m", "engram", "train", "--preset", "debug", "--set", "train.steps=0"],
                          capture_output=True, text=True, timeout=120)
    assert user.returncode == 2 and user.stderr == "engram: error: train.steps must be >= 1, got 0\n"
    code = ("import sys, engram.cli as c\n"
            "def bad(args):\n    raise TypeError('a bug')\n"
            "c.commands._hash = bad\nsys.exit(c.main(['hash', 'x']))\n")
    bug = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert bug.returncode == 1
    assert "Traceback (most recent call last)" in bug.stderr and bug.stderr.rstrip().endswith("TypeError: a bug")
