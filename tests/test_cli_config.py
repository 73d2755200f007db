"""The `engram` command, config presets/validation and the demo."""

import json

import pytest

from engram.cli import main
from engram.config import EngramConfig, engram_preset, presets


def test_vocab_stats_json_and_save(capsys, tmp_path):
    out = tmp_path / "sp.safetensors"
    assert main(["vocab-stats", "mistral-sp", "--top", "2", "--json", "--save", str(out)]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["original_size"] == 32768 and s["compressed_size"] == 21831 and len(s["top_groups"]) == 2
    assert main(["vocab-stats", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["compressed_size"] == 21831


def test_cli_errors_are_clear(capsys, tmp_path):
    assert main(["vocab-stats", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse: --preset takes the registered names only
        main(["hash", "x", "--tokenizer", "mistral-sp", "--preset", "demo"])
    assert exc.value.code == 2
    assert "invalid choice: 'demo'" in capsys.readouterr().err


def test_hash_command(capsys):
    assert main(["hash", "Hello world", "--tokenizer", "mistral-sp", "--preset", "engram-debug"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["rows"]["1"]) == len(out["ids"]) and len(out["rows"]["1"][0]) == 2 * 4


def test_presets_valid_and_roundtrip():
    for name in presets("engram"):
        cfg = engram_preset(name)
        assert EngramConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown Engram-layer preset 'nope'"):
        engram_preset("nope")


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_ngram_size=1, engram_vocab_size=[]), ">= 2"),
    (dict(engram_vocab_size=[100]), "needs 2 sizes"),
    (dict(engram_vocab_size=[4, 100]), "smaller than n_head_per_ngram"),
    (dict(n_embed_per_ngram=100), "divisible"),
    (dict(layer_ids=[1, 1]), "distinct"),
    (dict(table_dtype="float16"), "table_dtype"),
    (dict(conv_init="xavier"), "conv_init"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EngramConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown EngramConfig fields"):
        EngramConfig.from_dict({"bogus": 1})


def test_demo_runs(capsys):
    from engram.demo import run

    res = run("mistral-sp")
    assert res["compressed_size"] == 21831
    assert res["decode_err"] < 1e-4  # token-by-token decode matches the full forward


# ------------------------------------------------------------------ --version, --help, --list-presets

def _subcommands():
    import argparse

    from engram.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices


def test_version_names_the_package_and_torch():
    import importlib.metadata
    import subprocess
    import sys

    import torch

    res = subprocess.run([sys.executable, "-m", "engram", "--version"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stderr == ""
    assert res.stdout == f"engram {importlib.metadata.version('engram')} (torch {torch.__version__})\n"


def test_every_option_of_every_command_has_help_and_shows_its_default(capsys):
    import argparse

    parser, commands = _subcommands()
    assert set(commands) == {"vocab-stats", "hash", "train", "compare", "generate", "export-memory", "verify", "eval",
                             "demo", "sweep", "report", "prose-corpus", "gates", "probe", "import-v41"}
    for name, sub in commands.items():
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal width
        for action in sub._actions:
            assert action.help, (name, action.dest)  # one line of help for each option
            if action.option_strings and not (action.default is None or action.default is False
                                              or action.default == argparse.SUPPRESS):
                shown = " ".join(map(str, action.default)) if isinstance(action.default, list) else action.default
                assert f"(default: {shown})" in text.replace("[", "").replace("]", "").replace(",", ""), \
                    (name, action.dest)
        assert "(default: None)" not in text and "(default: False)" not in text


def test_list_presets_prints_each_preset_with_its_description(capsys):
    for command, kind in (("train", "run"), ("compare", "run"), ("hash", "engram")):
        with pytest.raises(SystemExit) as exc:
            main([command, "--list-presets"])  # hash's required TEXT is not needed for the listing
        assert exc.value.code == 0
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == len(presets(kind))
        for line, (name, p) in zip(lines, presets(kind).items(), strict=True):
            assert line.split(None, 1) == [name, p.description]
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for name, p in presets("run").items():  # the help lists them too
        assert f"{name} {' '.join(p.description.split())}" in out


def test_readme_commands_name_their_run_and_output_directories():
    """The README's and the guide's commands work on any checkout with any number of earlier runs: a
    train names its --run-dir, an export its --out, and the later commands use those paths (no globs)."""
    import re
    import shlex
    from pathlib import Path

    root = Path(__file__).parent.parent
    docs = (root / "README.md").read_text() + (root / "docs" / "GUIDE.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", docs, flags=re.S)
    lines = [shlex.split(c) for b in blocks for c in b.replace("\\\n", " ").splitlines() if "engram " in c]
    made, checked = set(), 0
    for argv in lines:
        argv = argv[argv.index(next(a for a in argv if a.endswith("engram"))) + 1:]
        opts = dict(zip(argv, argv[1:], strict=False))
        assert not any("*" in a or "?" in a for a in argv), argv
        if argv[0] == "train":
            made.add(opts["--run-dir"])
            made.add(f"{opts['--run-dir']}/model")
        elif argv[0] in ("export-memory", "compare"):
            made.add(opts["--out"])
        for key in ("--model", "--store"):
            if key in opts:
                assert opts[key] in made, (key, opts[key], made)  # made by an earlier command
                checked += 1
    assert checked >= 4
