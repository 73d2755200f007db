"""The one preset registry, and which errors the `engram` command reports as one line."""

import errno
import os
import subprocess
import sys
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

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
    for bad in ("train.steps=1e3", "train.steps=ten", "train.steps=2.5", "train.compile_engram=2",
                "model.d_model=True"):
        with pytest.raises(ConfigError, match="expected"):
            apply_overrides(base, [bad])
    assert base == run_preset("debug")  # the input config is left as it was


def _get(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("override, want", [
    ("train.steps=7", 7), ("train.steps= 7 ", 7), ("train.lr=2", 2.0), ("train.lr=1e-3", 1e-3),
    ("train.compile_engram=no", False), ("train.compile_engram=YES", True), ("train.compile_engram=0", False),
    ("train.compile_engram=1", True), ("train.compile_engram=true", True), ("train.compile_engram=False", False),
    ("train.engram_optimizer=dense_adamw", "dense_adamw"), ("train.dtype='float32'", "float32"),
    ("model.engram.table_dtype=bfloat16", "bfloat16"), ("model.engram.layer_ids=0,1", [0, 1]),
    ("model.engram.layer_ids=[1]", [1]), ("model.engram.engram_vocab_size=(1009, 1013)", [1009, 1013]),
    ("data.data=a,b", ["a", "b"]), ("data.data=['x y']", ["x y"]), ("data.tokenizer=mistral-sp", "mistral-sp"),
    ("data.tokenizer=None", None), ("model.engram=none", None),
])
def test_overrides_are_parsed_by_the_field_type(override, want):
    got = _get(apply_overrides(run_preset("debug"), [override]), override.split("=")[0])
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize("override, words", [
    ("train.steps=2.5", ["train.steps", "expected int", "'2.5'"]),
    ("train.compile_engram=maybe", ["train.compile_engram", "expected bool", "true/false", "yes/no", "1/0"]),
    ("train.engram_optimizer=adam",
     ["train.engram_optimizer", "one of 'sparse_row_adam', 'dense_adamw', 'torch_sparse_adam'", "'adam'"]),
    ("train.dtype=fp8", ["train.dtype", "one of 'auto', 'bfloat16', 'float32'"]),
    ("model.engram.layer_ids=[0.5]", ["model.engram.layer_ids", "list of int"]),
    ("model.engram.layer_ids=[True]", ["model.engram.layer_ids", "list of int"]),
    ("train.lr=nan", ["train.lr", "expected float"]),
    ("train.lr=inf", ["train.lr", "expected float"]),
    ("train.steps=None", ["train.steps", "expected int"]),  # not Optional
    ("data.vocab_size=[1]", ["data.vocab_size", "expected int"]),
    ("model.engram=3", ["model.engram", "EngramConfig section", "None"]),
    ("train=3", ["train", "TrainConfig section"]),
    ("train.stepz=3", ["no config field 'stepz'", "did you mean 'train.steps'"]),
    ("trian.steps=3", ["no config section 'trian'", "did you mean 'train'"]),
    ("train.steps.x=3", ["train.steps is a field, not a section"]),
    ("preset=demo", ["no config section 'preset'"]),
    ("train.steps", ["must look like section.field=value"]),
])
def test_bad_overrides_name_the_field_its_type_and_the_valid_values(override, words):
    with pytest.raises(ConfigError) as exc:
        apply_overrides(run_preset("debug"), [override])
    msg = str(exc.value)
    assert msg.startswith(f"override {override!r}") and "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


@given(st.integers(-10**12, 10**12), st.floats(allow_nan=False, allow_infinity=False, width=64))
def test_numbers_fit_the_field_type(i, x):
    """An int field takes exactly the integer texts, a float field every finite number."""
    from engram.train.overrides import parse_value

    assert parse_value(str(i), int, "f") == i
    assert parse_value(repr(x), float, "f") == x and parse_value(str(i), float, "f") == float(i)
    if x != int(x) or "e" in repr(x) or "." in repr(x):
        with pytest.raises(ConfigError, match="expected int for f"):
            parse_value(repr(x), int, "f")


def test_every_choice_field_is_a_literal_that_validation_agrees_with():
    """The Literal annotation is the one list of valid values: each passes validation, another name fails."""
    import typing

    from engram.train.overrides import field_types

    base = run_preset("debug")
    found = 0
    for section, cls in (("train", type(base.train)), ("model.engram", type(base.model.engram))):
        for name, tp in field_types(cls).items():
            if typing.get_origin(tp) is not typing.Literal:
                continue
            found += 1
            for choice in typing.get_args(tp):
                assert _get(apply_overrides(base, [f"{section}.{name}={choice}"]), f"{section}.{name}") == choice
            with pytest.raises(ConfigError, match="must be one of|must be 'float32'|must be 'zero'"):
                d = base.to_dict()
                (d["train"] if section == "train" else d["model"]["engram"])[name] = "nonsense"
                RunConfig.from_dict(d).validate()
    # train.engram_optimizer, train.dtype, train.backbone_parallel, model.engram.conv_init, model.engram.table_dtype,
    # model.engram.gate, model.engram.branch_gates, model.engram.flavour
    assert found == 8


# ------------------------------------------------------------------------------ CLI errors

USER_ERRORS = [
    (UserError("bad argument"), "bad argument"), (ConfigError("train.lr must be > 0"), "train.lr must be > 0"),
    (StoreFormatError("bad magic"), "bad magic"), (CheckpointError("checkpoint truncated"), "checkpoint truncated"),
    (FileNotFoundError(2, "No such file or directory", "x.txt"), "No such file or directory: x.txt"),
    (FileNotFoundError("no config.json in m (expected ...)"), "no config.json in m (expected ...)"),
    (PermissionError(13, "Permission denied", "x.txt"), "Permission denied: x.txt"),
    (PermissionError(errno.EPERM, "Operation not permitted", "y"), "Operation not permitted: y"),
    (IsADirectoryError(21, "Is a directory", "d"), "Is a directory: d"),
    (NotADirectoryError(20, "Not a directory", "f"), "Not a directory: f"),
    (OSError(errno.ENOSPC, "No space left on device", "run/ckpt/step-0000010.pt"),
     "No space left on device: run/ckpt/step-0000010.pt"),
    (OSError(errno.EDQUOT, "Disk quota exceeded", "out/layer_1.engram"), "Disk quota exceeded: out/layer_1.engram"),
    (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/run"), "Read-only file system: /mnt/ro/run"),
    (OSError(errno.ENOSPC, "not enough disk space for s/layer_0.engram: needs 9 bytes, 1 free", "s/layer_0.engram"),
     "not enough disk space for s/layer_0.engram: needs 9 bytes, 1 free"),  # the path once
    (OSError(errno.ENOSPC, "not enough disk space for s/x"), "not enough disk space for s/x"),
    (PermissionError(13, "Permission denied", "a", None, "b"), "Permission denied: a -> b"),  # rename
]
BUGS = [RuntimeError("boom"), TypeError("unsupported operand"), AssertionError("invariant"), ValueError("shapes"),
        KeyError("k"), IndexError("i"), OSError(5, "Input/output error"), OSError(errno.EBADF, "Bad file descriptor"),
        OSError(errno.EINVAL, "Invalid argument", "f"), FileExistsError(errno.EEXIST, "File exists", "f"),
        OSError("no errno at all")]


def _raising(exc):
    def command(args):
        raise exc
    return command


@pytest.mark.parametrize("exc, line", USER_ERRORS, ids=lambda e: type(e).__name__ if isinstance(e, Exception) else "")
def test_user_errors_are_one_line(exc, line, monkeypatch, capsys):
    monkeypatch.setattr(cli.commands, "_hash", _raising(exc))
    assert cli.is_user_error(exc)
    assert cli.main(["hash", "x"]) == 2
    assert capsys.readouterr().err == f"engram: error: {line}\n"


@pytest.mark.parametrize("exc", BUGS, ids=lambda e: type(e).__name__)
def test_programming_errors_keep_their_traceback(exc, monkeypatch, capsys):
    monkeypatch.setattr(cli.commands, "_hash", _raising(exc))
    assert not cli.is_user_error(exc)
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
        (["generate", "--model", str(tmp_path / "none"), "--prompt", "x"], f"--model {tmp_path / 'none'}: no such"),
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


# ------------------------------------------------------------- the user's environment, end to end

def _engram(*argv, **kw):
    return subprocess.run([sys.executable, "-m", "engram", *map(str, argv)], capture_output=True, text=True,
                          timeout=120, **kw)


def _one_line(res, *words):
    """A user error: exit status 2, one error line ending stderr, no traceback, naming ``words``."""
    assert res.returncode == 2, res.stderr
    last = res.stderr.splitlines()[-1]  # progress lines (a corpus tokenised) may come first
    assert last.startswith("engram: error: ") and res.stderr.count("engram: error") == 1, res.stderr
    assert "Traceback" not in res.stderr
    for w in words:
        assert str(w) in last, (w, res.stderr)


def test_a_file_where_a_directory_is_expected(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    _one_line(_engram("train", "--run-dir", f, "--set", "train.steps=1"), "--run-dir", f, "not a directory")
    _one_line(_engram("train", "--run-dir", f / "run", "--set", "train.steps=1"), f / "run", f"{f} is a file")
    _one_line(_engram("generate", "--model", f, "--prompt", "x"), "--model", f, "model directory")
    assert f.read_text() == "x"


def test_a_run_directory_is_not_a_model_directory(tmp_path):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "config.json").write_text("{}")  # a run's config, not a model's
    (run / "model" / "model.safetensors").write_bytes(b"")
    _one_line(_engram("generate", "--model", run, "--prompt", "x"), "not a model directory",
              f"did you mean {run / 'model'}?")
    _one_line(_engram("eval", "--model", tmp_path, "--memory", "ram"), "not a model directory", "RUN_DIR/model")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes whatever the permission bits say")
def test_unreadable_and_unwritable_paths(tmp_path, make_corpus):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    _one_line(_engram("train", "--run-dir", locked / "run", "--set", "train.steps=1"), "Permission denied",
              locked / "run")
    secret = make_corpus(tmp_path / "corpus", n_files=2) / "doc000.py"
    secret.chmod(0)
    _one_line(_engram("vocab-stats", secret), "Permission denied", secret)


def test_permission_denied_deep_inside_a_command_is_one_line(tmp_path, make_corpus):
    """As the CLI sees a PermissionError raised by the file system (whoever runs the test, root included)."""
    target = tmp_path / "run" / "config.json"
    corpus = make_corpus(tmp_path / "corpus", n_files=20)
    args = ["train", "--run-dir", str(tmp_path / "run"), "--data", str(corpus), "--set", "data.vocab_size=512",
            "--set", "train.steps=1"]
    code = ("import builtins, sys, engram.cli as c\n"
            "real = builtins.open\n"
            "def deny(path, *a, **k):\n"
            "    if str(path).rsplit('/', 1)[-1].startswith('config.json'):\n"
            "        raise PermissionError(13, 'Permission denied', str(path))\n"
            "    return real(path, *a, **k)\n"
            "import engram.atomic\nengram.atomic.open = deny\n"
            f"sys.exit(c.main({args!r}))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, ENGRAM_CACHE=str(tmp_path / "cache")))
    _one_line(res, "Permission denied", target)  # the final name, not the temporary one


def test_disk_full_while_writing_names_the_file_and_leaves_nothing_torn(tmp_path, monkeypatch, capsys,
                                                                        make_corpus):
    """torch.save hides the writer's OSError in a RuntimeError: the CLI still reports a full disk."""
    import engram.atomic

    real_open = open

    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 4096:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def full_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return Full(f) if ".pt.tmp-" in str(path) else f

    monkeypatch.setattr(engram.atomic, "open", full_open, raising=False)
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / "cache"))
    corpus = make_corpus(tmp_path / "corpus", n_files=20)
    run = tmp_path / "run"
    assert cli.main(["train", "--run-dir", str(run), "--data", str(corpus), "--no-progress", "--set", "train.steps=2",
                     "--set", "data.vocab_size=512", "--set", "train.threads=1"]) == 2
    err = capsys.readouterr().err  # after the corpus's progress lines
    assert err.endswith(f"\nengram: error: {os.strerror(errno.ENOSPC)}: {run / 'ckpt' / 'step-0000002.pt'}\n")
    assert err.count("engram: error") == 1 and "Traceback" not in err
    assert not list((run / "ckpt").glob("*.tmp-*")) and not list((run / "ckpt").glob("*.pt"))


@pytest.mark.parametrize("raised, want", [
    (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"), errno.ENOSPC),
    (RuntimeError("I/O error: Permission denied (os error 13)"), errno.EACCES),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), errno.EDQUOT),
])
def test_atomic_writes_surface_the_os_error_naming_the_final_file(raised, want, tmp_path):
    from engram.atomic import atomic_path

    path = tmp_path / "model.safetensors"
    with pytest.raises(OSError) as exc, atomic_path(path) as tmp:
        tmp.write_bytes(b"partial")
        raise raised
    assert exc.value.errno == want and exc.value.filename == str(path)
    assert cli.is_user_error(exc.value) and list(tmp_path.iterdir()) == []


def test_atomic_writes_keep_a_bug_a_bug(tmp_path):
    from engram.atomic import atomic_path

    bug = RuntimeError("shape mismatch in the writer")
    with pytest.raises(RuntimeError) as exc, atomic_path(tmp_path / "x") as tmp:
        tmp.write_bytes(b"partial")
        raise bug
    assert exc.value is bug and not cli.is_user_error(exc.value) and list(tmp_path.iterdir()) == []


def test_a_write_removes_the_temporaries_of_killed_writers_only(tmp_path):
    """A kill -9 mid-write leaves ``<path>.tmp-<pid>``; the next write of that path deletes it once its writer
    is gone and it is old, and keeps a live writer's, a fresh one, and other files' temporaries."""
    from engram.atomic import STALE_TEMP_S, atomic_write

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    path = tmp_path / "table.bin"
    old = time.time() - 2 * STALE_TEMP_S
    stale = tmp_path / f"table.bin.tmp-{dead_pid}"
    fresh = tmp_path / f"table.bin.tmp-{dead_pid}0"  # a pid that is (almost surely) not running, but new
    live = tmp_path / f"table.bin.tmp-{os.getppid()}"
    other = tmp_path / f"other.bin.tmp-{dead_pid}"
    for p in (stale, fresh, live, other):
        p.write_bytes(b"half a table")
    for p in (stale, live, other):
        os.utime(p, (old, old))
    atomic_write(path, b"whole")
    assert path.read_bytes() == b"whole"
    assert not stale.exists() and fresh.exists() and live.exists() and other.exists()
