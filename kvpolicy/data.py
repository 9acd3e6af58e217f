"""Real text for demos and evaluation: Jane Austen's six novels from Debian's ``r-cran-janeaustenr``.

The package ships the novels in an R data file (``data/Rdata.rdb``): a sequence of blocks, each a 4-byte
big-endian length then a zlib stream holding an R-serialized character vector (one string per line).
:func:`austen_books` reads it with a small pure-Python reader. :func:`ensure_austen` locates the file
or fetches the ``.deb`` with ``apt-get download`` and unpacks it with ``dpkg -x`` (no R needed).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
import zlib
from functools import lru_cache
from pathlib import Path

from kvpolicy.models import cache_dir

RDB = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
SYSTEM_RDB = Path("/") / RDB
TITLES = ("Sense & Sensibility", "Pride & Prejudice", "Mansfield Park", "Emma", "Northanger Abbey",
          "Persuasion")
HOW = ("Jane Austen's novels come from the Debian package r-cran-janeaustenr. Run "
       "`apt-get update && apt-get download r-cran-janeaustenr && dpkg -x r-cran-janeaustenr_*.deb DIR` "
       "and set KVPOLICY_AUSTEN=DIR/" + RDB)


class DataUnavailable(RuntimeError):
    """The text corpus could not be located or fetched; the message says how to get it."""


def ensure_austen() -> Path:
    """Path of ``Rdata.rdb``: ``$KVPOLICY_AUSTEN``, the system install, the kvpolicy cache, or fetched."""
    env = os.environ.get("KVPOLICY_AUSTEN")
    if env and Path(env).is_file():
        return Path(env)
    for cand in (SYSTEM_RDB, cache_dir() / "janeaustenr" / RDB):
        if cand.is_file():
            return cand
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise DataUnavailable("apt-get/dpkg not found. " + HOW)
    dest = cache_dir() / "janeaustenr"
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run(["apt-get", "download", "r-cran-janeaustenr"], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("r-cran-janeaustenr_*.deb"))
        if got.returncode != 0 or not debs:
            raise DataUnavailable(f"apt-get download failed ({got.stderr.strip()[-300:]}). " + HOW)
        dest.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg", "-x", str(debs[0]), str(dest)], check=True)
    path = dest / RDB
    if not path.is_file():
        raise DataUnavailable(f"{path} missing after unpacking. " + HOW)
    return path


def _read_strsxp(buf: bytes) -> list[str]:
    if buf[:2] != b"X\n":
        raise ValueError("not an XDR R serialization")
    pos = 2
    version = struct.unpack(">i", buf[pos:pos + 4])[0]
    pos += 12
    if version == 3:
        n = struct.unpack(">i", buf[pos:pos + 4])[0]
        pos += 4 + n
    flags, length = struct.unpack(">ii", buf[pos:pos + 8])
    pos += 8
    if flags & 0xFF != 16:
        raise ValueError(f"expected a character vector (STRSXP), got SEXP type {flags & 0xFF}")
    out = []
    for _ in range(length):
        _cflags, n = struct.unpack(">ii", buf[pos:pos + 8])
        pos += 8
        if n < 0:
            out.append("")
            continue
        out.append(buf[pos:pos + n].decode("utf-8", errors="replace"))
        pos += n
    return out


@lru_cache(maxsize=1)
def austen_books() -> dict[str, str]:
    """The six novels as ``{title: text}`` (lines joined with newlines)."""
    data = ensure_austen().read_bytes()
    pos, books = 0, []
    while pos + 4 <= len(data):
        d = zlib.decompressobj()
        raw = d.decompress(data[pos + 4:])
        books.append(_read_strsxp(raw))
        pos = len(data) - len(d.unused_data)
    texts = ["\n".join(lines) for lines in books]
    # the blocks are stored in alphabetical order of the R object names
    by_first = {t.split("\n", 1)[0].strip().upper(): t for t in texts}
    out: dict[str, str] = {}
    for title in TITLES:
        key = next((k for k in by_first if k.replace("AND", "&").startswith(title.upper()[:8])), None)
        if key is not None:
            out[title] = by_first.pop(key)
    out.update({k.title(): v for k, v in by_first.items()})
    return out


def austen_text(book: str = "Pride & Prejudice") -> str:
    """One novel's text."""
    books = austen_books()
    if book not in books:
        raise KeyError(f"unknown book {book!r}; allowed: {', '.join(books)}")
    return books[book]


def austen_passage(tokenizer, n_tokens: int, *, book: str = "Pride & Prejudice", offset_chars: int = 2000) -> str:  # noqa: ANN001
    """A passage of about ``n_tokens`` tokens from ``book`` (starting after ``offset_chars``)."""
    text = austen_text(book)[offset_chars:]
    ids = tokenizer(text[: n_tokens * 8], add_special_tokens=False)["input_ids"][:n_tokens]
    return tokenizer.decode(ids)
