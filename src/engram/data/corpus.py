"""Text corpora: the default (this interpreter's standard library source) or user files.

A corpus is a list of documents, each with a stable *name* (a relative path, plus a line
number for JSONL) and its text. Train/validation membership is a pure function of the name,
so adding or reordering files never moves an existing document to the other split.

Everything here is local: the default corpus is the ``*.py`` source of the running Python's
standard library (code and docstrings, ~30 MB), present on every machine with no download.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

# Folders that hold third-party code, not the standard library (Debian uses dist-packages).
_THIRD_PARTY_DIRS = frozenset({"site-packages", "dist-packages"})
# Folder walks skip these: VCS metadata and caches are not text a user means to train on.
_SKIP_DIRS = frozenset({".git", ".hg", ".svn", "__pycache__", ".ipynb_checkpoints"})
# A file whose first bytes hold a NUL is treated as binary and skipped in folder walks (git's rule).
_SNIFF_BYTES = 8192


@dataclass(frozen=True)
class Document:
    """One document: `name` is stable across machines for the same data (used for the split)."""

    name: str
    text: str


@dataclass
class Corpus:
    """Documents split into train and validation lists, in a deterministic order.

    `source` describes where the documents came from; `skipped` lists files of a folder walk
    that were left out because they looked binary.
    """

    train: list[Document]
    val: list[Document]
    source: str = ""
    val_permille: int = 50
    skipped: list[str] = field(default_factory=list)
    _fingerprint: str | None = field(default=None, repr=False, compare=False)

    @property
    def documents(self) -> list[Document]:
        """All documents, train first."""
        return self.train + self.val

    def num_chars(self, split: str = "train") -> int:
        """Characters in one split ("train" or "val")."""
        return sum(len(d.text) for d in self._split(split))

    def _split(self, split: str) -> list[Document]:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return self.train if split == "train" else self.val

    def fingerprint(self) -> str:
        """sha256 over every document's split, name and content hash: the cache key of this corpus."""
        if self._fingerprint is None:
            h = hashlib.sha256(b"engram-corpus-v1\n")
            for split, docs in (("train", self.train), ("val", self.val)):
                for d in docs:
                    digest = hashlib.sha1(d.text.encode("utf-8", errors="surrogatepass")).hexdigest()
                    h.update(f"{split}\t{d.name}\t{digest}\n".encode("utf-8", errors="surrogatepass"))
            self._fingerprint = h.hexdigest()
        return self._fingerprint


def stdlib_root() -> Path:
    """Directory of the running interpreter's standard library source."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
    """All ``*.py`` files of the standard library as (relative posix path, path), sorted by relative path.

    Third-party packages (anything under ``site-packages`` / ``dist-packages``) are excluded.
    """
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"standard library source not found at {root}: this Python ships no .py sources")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _THIRD_PARTY_DIRS and d != "__pycache__"]
        for fn in filenames:
            if fn.endswith(".py"):
                p = Path(dirpath) / fn
                found.append((p.relative_to(root).as_posix(), p))
    found.sort(key=lambda t: t[0])
    return found


def _read_text(path: Path) -> str:
    # errors="replace": a stray Latin-1 byte (the stdlib test suite has a few on purpose) must not stop a run.
    return path.read_bytes().decode("utf-8", errors="replace")


def _looks_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(_SNIFF_BYTES)


def _jsonl_documents(path: Path, name: str) -> list[Document]:
    """One document per non-blank line of a JSONL file, named ``name:LINE`` (1-based)."""
    docs = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict) or "text" not in obj:
                raise ValueError(f'{path}, line {lineno}: expected a JSON object with a "text" field, '
                                 f"got {type(obj).__name__}{' without text' if isinstance(obj, dict) else ''}")
            if not isinstance(obj["text"], str):
                raise ValueError(f'{path}, line {lineno}: "text" must be a string, got {type(obj["text"]).__name__}')
            docs.append(Document(f"{name}:{lineno}", obj["text"]))
    return docs


def _user_files(data: list[str]) -> tuple[list[tuple[str, Path]], list[str]]:
    """Expand files and folders (recursively) into (name, path) pairs plus skipped binary files.

    A file's name is its path relative to the parent of the argument that led to it, so
    ``--data corpus/`` gives names like ``corpus/a/b.txt`` whatever the working directory.
    """
    out: dict[Path, str] = {}
    skipped = []
    for arg in data:
        p = Path(arg).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"data path {arg!r} does not exist")
        base = p.resolve().parent
        if p.is_file():
            out.setdefault(p.resolve(), p.resolve().relative_to(base).as_posix())
            continue
        for dirpath, dirnames, filenames in os.walk(p.resolve()):
            dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
            for fn in filenames:
                f = Path(dirpath) / fn
                if fn.startswith(".") or not f.is_file():
                    continue
                if _looks_binary(f):
                    skipped.append(str(f))
                    continue
                out.setdefault(f, f.relative_to(base).as_posix())
    # Two different files may share a name (a/train.jsonl and b/train.jsonl passed as files):
    # those fall back to their absolute path, so every document name stays unique.
    by_name: dict[str, list[Path]] = {}
    for path, name in out.items():
        by_name.setdefault(name, []).append(path)
    pairs = []
    for name, paths in by_name.items():
        pairs.extend((name if len(paths) == 1 else path.as_posix(), path) for path in paths)
    pairs.sort(key=lambda t: t[0])
    return pairs, sorted(skipped)


def split_bucket(name: str) -> int:
    """Stable bucket in [0, 1000) of a document name: sha1 of the UTF-8 name, mod 1000."""
    return int(hashlib.sha1(name.encode("utf-8", errors="surrogatepass")).hexdigest(), 16) % 1000


def split_documents(docs: list[Document], val_permille: int = 50) -> tuple[list[Document], list[Document]]:
    """Split by name hash: a document is validation when ``split_bucket(name) < val_permille``.

    With two or more documents both splits are non-empty: if the hash leaves one empty, the
    document closest to the boundary moves over. A single document is cut in two at a line
    break, its last ``val_permille``/1000 going to validation (at least one character).
    """
    if not 0 <= val_permille <= 1000:
        raise ValueError(f"val_permille must be in [0, 1000], got {val_permille}")
    if not docs:
        raise ValueError("the corpus is empty: no non-empty documents were found")
    if len(docs) == 1:
        return _split_single(docs[0], val_permille)
    docs = sorted(docs, key=lambda d: d.name)
    buckets = {d.name: split_bucket(d.name) for d in docs}
    train = [d for d in docs if buckets[d.name] >= val_permille]
    val = [d for d in docs if buckets[d.name] < val_permille]
    if not val:  # move the train document with the lowest bucket (ties: first name)
        mover = min(train, key=lambda d: (buckets[d.name], d.name))
        train.remove(mover)
        val = [mover]
    elif not train:
        mover = max(val, key=lambda d: (buckets[d.name], d.name))
        val.remove(mover)
        train = [mover]
    return train, val


def _split_single(doc: Document, val_permille: int) -> tuple[list[Document], list[Document]]:
    if len(doc.text) < 2:
        raise ValueError(f"the corpus holds a single document ({doc.name}) of {len(doc.text)} character(s): "
                         f"too little to make a train and a validation split")
    target = len(doc.text) - max(1, len(doc.text) * max(val_permille, 1) // 1000)
    # Cut right after the newline nearest the target, when there is one, so no line is torn.
    before, after = doc.text.rfind("\n", 0, target), doc.text.find("\n", target)
    candidates = [i + 1 for i in (before, after) if 0 <= i < len(doc.text) - 1]
    cut = min(candidates, key=lambda c: abs(c - target)) if candidates else target
    cut = min(max(cut, 1), len(doc.text) - 1)
    return [Document(f"{doc.name}#train", doc.text[:cut])], [Document(f"{doc.name}#val", doc.text[cut:])]


def load_corpus(data: list[str] | str | None = None, val_permille: int = 50) -> Corpus:
    """Load a corpus and split it into train and validation documents.

    `data` None means the standard library source of the running Python. Otherwise it is a
    list of files and/or folders (searched recursively; hidden and binary files skipped). ``*.jsonl``
    files hold one JSON object per line with a "text" field, one document per line; any other
    file is one document, decoded as UTF-8 with undecodable bytes replaced. Empty documents
    are dropped (they would only add an end-of-text token).
    """
    if isinstance(data, (str, os.PathLike)):
        data = [str(data)]
    skipped: list[str] = []
    docs: list[Document] = []
    if data is None:
        root = stdlib_root()
        files = stdlib_files(root)
        source = f"stdlib:{root}"
        docs = [Document(name, _read_text(path)) for name, path in files]
    else:
        if not data:
            raise ValueError("data is an empty list: give files/folders, or None for the standard library")
        files, skipped = _user_files(list(data))
        source = ",".join(str(d) for d in data)
        for name, path in files:
            if path.suffix.lower() == ".jsonl":
                docs.extend(_jsonl_documents(path, name))
            else:
                docs.append(Document(name, _read_text(path)))
    docs = [d for d in docs if d.text]
    if not docs:
        raise ValueError(f"the corpus {source!r} is empty: no non-empty text documents were found "
                         f"({len(skipped)} binary file(s) skipped)")
    train, val = split_documents(docs, val_permille)
    return Corpus(train=train, val=val, source=source, val_permille=val_permille, skipped=skipped)
