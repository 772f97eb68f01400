"""The GPT-2 tokenizer: from the hub, or rebuilt exactly from a file a PyPI package ships.

`openai-whisper` ships `gpt2.tiktoken`, GPT-2's byte-level BPE as base64 token ->
rank. The merges are implied by the ranks: each multi-byte token is the merge of
the two parts that BPE with only lower-ranked merges splits it into. Rebuilt as
the standard `vocab.json` + `merges.txt`, it encodes exactly as GPT-2 does.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from pathlib import Path

from trainers.sources import pypi_members

log = logging.getLogger(__name__)

WHISPER_SDIST = "openai-whisper==20250625"
WHISPER_SDIST_SHA256 = "37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96"
GPT2_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
END_OF_TEXT = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (as in its encoder.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """BPE of `token` using only merges ranked below `max_rank`."""
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            return parts
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def rebuild_gpt2_files(tiktoken_text: str, folder: Path) -> Path:
    """Write vocab.json, merges.txt and the tokenizer configs of GPT-2 into `folder`."""
    ranks = {}
    for line in tiktoken_text.splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    byte_map = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(byte_map[x] for x in b)

    vocab = {text(tok): rank for tok, rank in ranks.items()}
    vocab[END_OF_TEXT] = len(ranks)
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) > 1:
            left, right = _split(ranks, tok, rank)
            merges.append(f"{text(left)} {text(right)}")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024, "bos_token": END_OF_TEXT,
        "eos_token": END_OF_TEXT, "unk_token": END_OF_TEXT, "add_prefix_space": False}))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT, "unk_token": END_OF_TEXT}))
    return folder


def load_gpt2_tokenizer(data_dir: Path, *, offline: bool | None = None):
    """(tokenizer, source). Hub first; else the rebuilt files, cached under data_dir/tokenizers/gpt2."""
    import hashlib

    from transformers import AutoTokenizer

    from trainers.data import _file_lock, hub_reachable

    if offline is None:
        offline = not hub_reachable()
    if not offline:
        try:
            return AutoTokenizer.from_pretrained("distilgpt2"), "hf:distilgpt2"
        except OSError as exc:  # the hub's way of saying "unreachable"
            log.warning("hub unreachable for the tokenizer (%s); rebuilding GPT-2's from %s", exc, WHISPER_SDIST)
    folder = Path(data_dir) / "tokenizers" / "gpt2"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(folder.parent / "gpt2.lock"):
        if not (folder / "merges.txt").exists():
            member = pypi_members(WHISPER_SDIST, WHISPER_SDIST_SHA256, lambda n: n.endswith("assets/gpt2.tiktoken"),
                                  sdist=True)
            raw = next(iter(member.values()))
            if hashlib.sha256(raw).hexdigest() != GPT2_TIKTOKEN_SHA256:
                raise OSError(f"gpt2.tiktoken in {WHISPER_SDIST} is not the known GPT-2 BPE file")
            tmp = folder.with_name("gpt2.tmp")
            rebuild_gpt2_files(raw.decode(), tmp)
            os.replace(tmp, folder)
    # transformers 5.x: passing vocab_file/merges_file to the class gives an empty tokenizer.
    return AutoTokenizer.from_pretrained(str(folder)), f"pypi:{WHISPER_SDIST}"
