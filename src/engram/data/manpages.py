"""A prose corpus from the machine's manual pages, rendered to plain text by groff.

Results on the default corpus (Python source) must not be an artefact of code, so the experiments also
train on prose. Manual pages are English prose present on any Debian-like machine with no download; the
installed set differs between machines, so the corpus records what it holds (`.manifest.json`, hidden so
the corpus loader skips it: pages, bytes, groff version) and the data pipeline fingerprints the text like
any other ``--data`` folder.

Pages are rendered without hyphenation or justification (``-rHY=0 -dAD=l``) so words are not split at
line ends, and without overstrike or colour codes (``-P-cbou``); ``.so`` redirects and duplicate pages
(the same text under two names) are skipped. Generated families of near-identical pages (a cloud SDK
installs thousands of ``tool_group_command`` pages) are capped at ``max_per_family`` pages, so one package
does not become most of the corpus.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from engram.atomic import fsync_dir, write_json_atomic
from engram.config import UserError

DEFAULT_ROOT = "/usr/share/man"
DEFAULT_SECTIONS = ("1", "5", "7", "8")
MANIFEST = ".manifest.json"
_GROFF = ["groff", "-mandoc", "-Tutf8", "-P-cbou", "-rHY=0", "-dAD=l", "-rLL=90n"]


def _pages(root: Path, sections) -> list[Path]:
    out = []
    for s in sections:
        d = root / f"man{s}"
        if d.is_dir():
            out += [p for p in sorted(d.iterdir()) if p.is_file() and not p.is_symlink()]
    return out


def family(p: Path) -> str:
    """A page's family: its name up to the first ``_``, ``-`` or ``.`` (``gcloud_compute_ssh`` -> ``gcloud``)."""
    return re.split(r"[_.-]", p.name, maxsplit=1)[0].lower()


def _read_source(p: Path) -> bytes:
    raw = p.read_bytes()
    return gzip.decompress(raw) if p.suffix == ".gz" else raw


def render_page(p: Path) -> str | None:
    """The page's text, or None for a redirect (``.so``), an empty page or one groff cannot render."""
    try:
        src = _read_source(p)
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    if src.lstrip().startswith(b".so ") or not src.strip():
        return None
    try:
        res = subprocess.run(_GROFF, input=src, capture_output=True, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        return None
    text = res.stdout.decode("utf-8", "replace")
    # Drop the running header/footer (first and last non-blank lines) and runs of blank lines.
    lines = [ln.rstrip() for ln in text.splitlines()]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    lines = lines[1:-1]
    out, blank = [], False
    for ln in lines:
        if ln or not blank:
            out.append(ln)
        blank = not ln
    body = "\n".join(out).strip()
    return body + "\n" if len(body) > 200 else None


def build_man_corpus(out_dir: str | os.PathLike, *, root: str | os.PathLike = DEFAULT_ROOT,
                     sections=DEFAULT_SECTIONS, max_mb: float = 40.0, max_per_family: int = 25,
                     workers: int = 2) -> dict:
    """Render the manual pages under ``root`` (English, ``man<section>`` folders) into ``out_dir``.

    One ``.txt`` per page; pages are taken in a fixed pseudo-random order (a hash of the file name) until
    ``max_mb`` of text, so a cap keeps a spread of packages, not the alphabet's start. Built in a temporary
    folder and renamed into place: an interrupted build leaves nothing half-written. An existing complete
    corpus (its manifest present) is reused as it is. Returns the manifest.
    """
    out = Path(out_dir)
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        return json.loads(manifest_path.read_text())
    if shutil.which("groff") is None:
        raise UserError("building the manual-page corpus needs groff (Debian: apt install groff-base)")
    pages = _pages(Path(root), sections)
    if not pages:
        raise UserError(f"no manual pages under {root} (sections {', '.join(sections)}); "
                        f"pass a prose corpus with --prose DIR instead")
    pages.sort(key=lambda p: hashlib.sha1(f"{p.parent.name}/{p.name}".encode()).hexdigest())
    per_family: dict[str, int] = {}
    capped = []
    for p in pages:
        f = family(p)
        per_family[f] = per_family.get(f, 0) + 1
        if per_family[f] <= max_per_family:
            capped.append(p)
    n_seen, pages = len(pages), capped
    tmp = out.with_name(out.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    seen, kept, total, cap = set(), [], 0, int(max_mb * 2**20)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        batch = 64
        for i in range(0, len(pages), batch):
            if total >= cap:
                break
            for p, text in zip(pages[i:i + batch], pool.map(render_page, pages[i:i + batch]), strict=True):
                if text is None or total >= cap:
                    continue
                digest = hashlib.sha1(text.encode()).hexdigest()
                if digest in seen:
                    continue
                seen.add(digest)
                name = p.name.removesuffix(".gz")
                dest = tmp / p.parent.name / f"{name}.txt"
                dest.parent.mkdir(exist_ok=True)
                dest.write_text(text, encoding="utf-8")
                kept.append(f"{p.parent.name}/{name}")
                total += len(text.encode())
    groff = subprocess.run(["groff", "--version"], capture_output=True, text=True).stdout.splitlines()
    manifest = {"format": "engram-man-corpus-1", "root": str(root), "sections": list(sections),
                "pages_seen": n_seen, "max_per_family": max_per_family, "pages": len(kept), "bytes": total,
                "max_mb": max_mb,
                "groff": groff[0] if groff else None}
    write_json_atomic(tmp / MANIFEST, manifest)
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    return manifest
