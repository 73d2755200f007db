"""Load any supported tokenizer offline, through `transformers.AutoTokenizer`.

Compression must be bit-exact with DeepSeek's reference, which decodes every id with
`AutoTokenizer.from_pretrained(path).decode([id], skip_special_tokens=False)`. So every
input form is routed through that same call: a directory is passed as it is; a single file
(`tokenizer.json`, a Mistral `tekken*.json`, a SentencePiece model) is linked into a private
temporary directory under the file name transformers looks for, and loaded from there.

Bundled tokenizers (from the `mistral-common` package, so no download is ever needed) have
short names: see `BUNDLED`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

# Short names for tokenizer files that ship inside the `mistral-common` wheel.
BUNDLED = {
    "mistral-tekken": "tekken_240911.json",  # Tekken, 131,072 ids (byte-level BPE)
    "mistral-tekken-240718": "tekken_240718.json",
    "mistral-sp": "mistral_instruct_tokenizer_240323.model.v3",  # SentencePiece, 32,768 ids
    "mistral-sp-v1": "tokenizer.model.v1",  # SentencePiece, 32,000 ids
    "mistral-sp-v7": "mistral_instruct_tokenizer_241114.model.v7",
}


def bundled_path(name: str) -> Path:
    """Path of a tokenizer file bundled with `mistral-common`, by its short name."""
    if name not in BUNDLED:
        raise KeyError(f"unknown bundled tokenizer {name!r}; known: {', '.join(sorted(BUNDLED))}")
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / BUNDLED[name]
    if not path.is_file():
        raise FileNotFoundError(
            f"bundled tokenizer {name!r} expected at {path}, but the installed mistral-common "
            f"does not ship it"
        )
    return path


def _file_kind(path: Path) -> str:
    """Classify a single tokenizer file: 'hf-json', 'tekken' or 'sentencepiece'."""
    name = path.name
    if name.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            head = f.read(4096)
        # Both formats are JSON objects; tekken files start with a "config" holding a "pattern".
        if '"model"' in head and '"type"' in head and '"config"' not in head[:200]:
            return "hf-json"
        try:
            obj = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if isinstance(obj, dict) and "model" in obj:
            return "hf-json"
        if isinstance(obj, dict) and "config" in obj and "vocab" in obj:
            return "tekken"
        raise ValueError(f"{path} is JSON but neither a Hugging Face tokenizer.json nor a tekken file")
    if ".model" in name:
        with open(path, "rb") as f:
            if f.read(1) != b"\n":  # a serialised SentencePiece ModelProto starts with field 1
                raise ValueError(f"{path} does not look like a SentencePiece model file")
        return "sentencepiece"
    raise ValueError(
        f"cannot tell the tokenizer format of {path}: expected a directory, a tokenizer.json, "
        f"a tekken*.json or a SentencePiece *.model file"
    )


_LINK_NAME = {"hf-json": "tokenizer.json", "tekken": "tekken.json", "sentencepiece": "tokenizer.model"}


def resolve(spec: str | os.PathLike) -> Path:
    """Turn a tokenizer spec (bundled short name or path) into an existing path."""
    spec_s = str(spec)
    if spec_s in BUNDLED:
        return bundled_path(spec_s)
    path = Path(spec_s).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"tokenizer {spec_s!r} not found: give a directory, a tokenizer file, or one of the "
            f"bundled names {', '.join(sorted(BUNDLED))}"
        )
    return path


def load_tokenizer(spec: str | os.PathLike, *, trust_remote_code: bool = False):
    """Load a tokenizer offline and return the `transformers` tokenizer object.

    `spec` is a bundled short name, a Hugging Face tokenizer directory, or a single tokenizer
    file. Nothing is downloaded: loading is local-only.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = resolve(spec)
    kwargs = dict(local_files_only=True, trust_remote_code=trust_remote_code)
    if path.is_dir():
        return AutoTokenizer.from_pretrained(str(path), **kwargs)
    kind = _file_kind(path)
    with tempfile.TemporaryDirectory(prefix="engram-tok-") as tmp:
        link = Path(tmp) / _LINK_NAME[kind]
        try:
            os.symlink(path.resolve(), link)
        except OSError:  # filesystems without symlinks
            import shutil

            shutil.copyfile(path, link)
        tok = AutoTokenizer.from_pretrained(tmp, **kwargs)
        # Some backends read files lazily; make sure everything is loaded before tmp goes.
        len(tok)
    return tok
