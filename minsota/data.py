"""Data: sources -> tokenizer -> packing -> batches.

(Core version: the offline Python-stdlib corpus, the byte tokenizer and causal packing. The data issue
extends this module; the public functions below are the contract the trainer uses.)

Contract:
  build_tokenizer(recipe) -> Tokenizer  (.name, .vocab_size, .eos_id, .encode(str) -> list[int], .decode(ids) -> str)
  build_batches(recipe, tokenizer, split="train", rank=0, world_size=1) -> Batches
  Batches: iterator of micro-batches, dicts of int64 tensors (micro_batch_size, seq_len):
      tokens, targets, positions, document_ids
    .state_dict() -> JSON-serialisable position just after the last micro-batch yielded
    .load_state_dict(state)
"""

import sysconfig
from pathlib import Path

import torch

from minsota.errors import UserError


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256); byte 0 (NUL, absent from text) doubles as end-of-document."""

    name = "bytes"
    vocab_size = 256
    eos_id = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 < int(i) < 256).decode("utf-8", errors="replace")


def stdlib_documents(split: str):
    """The Python standard library's own sources: real text every machine has. Every 50th file is validation."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)
    for i, path in enumerate(files):
        if (i % 50 == 0) == (split == "validation"):
            yield path.read_text(encoding="utf-8", errors="replace")


def build_tokenizer(recipe):
    if recipe.data.tokenizer != "bytes":
        raise UserError(f"{recipe.where('data.tokenizer')}: unknown tokenizer '{recipe.data.tokenizer}'")
    tokenizer = ByteTokenizer()
    if tokenizer.vocab_size > recipe.model.vocab_size:
        raise UserError(f"{recipe.where('model.vocab_size')}: tokenizer '{tokenizer.name}' has {tokenizer.vocab_size} "
                        f"tokens but model.vocab_size = {recipe.model.vocab_size}")
    return tokenizer


class Batches:
    """Packs documents, joined by EOS, into windows of seq_len + 1 tokens; yields micro-batches."""

    def __init__(self, recipe, tokenizer, split="train", rank=0, world_size=1):
        if recipe.data.source != "stdlib":
            raise UserError(f"{recipe.where('data.source')}: unknown data source '{recipe.data.source}'")
        self.recipe, self.tokenizer, self.split = recipe, tokenizer, split
        self.rank, self.world_size = rank, world_size
        self.seq_len, self.micro = recipe.train.seq_len, recipe.train.micro_batch_size
        self.windows_done = 0
        self._windows = None

    def _all_windows(self):
        epoch, n = 0, self.seq_len + 1
        while True:
            buf, docs, pos, doc_id = [], [], [], 0
            for text in stdlib_documents(self.split):
                ids = self.tokenizer.encode(text) + [self.tokenizer.eos_id]
                buf += ids
                docs += [doc_id] * len(ids)
                pos += range(len(ids))
                doc_id += 1
                while len(buf) >= n:
                    yield buf[:n], docs[:n], pos[:n]
                    buf, docs, pos = buf[n:], docs[n:], pos[n:]
            epoch += 1

    def __iter__(self):
        self._windows = self._all_windows()
        for _ in range(self.windows_done):  # resume: skip what was consumed
            next(self._windows)
        return self

    def __next__(self):
        if self._windows is None:
            iter(self)
        rows = []
        while len(rows) < self.micro:
            window = next(self._windows)
            index = self.windows_done
            self.windows_done += 1
            if index % self.world_size == self.rank:
                rows.append(window)
        tokens = torch.tensor([r[0] for r in rows])
        docs = torch.tensor([r[1] for r in rows])
        pos = torch.tensor([r[2] for r in rows])
        return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "positions": pos[:, :-1],
                "document_ids": docs[:, :-1]}

    def state_dict(self):
        return {"windows_done": self.windows_done}

    def load_state_dict(self, state):
        self.windows_done = state["windows_done"]
        self._windows = None


def build_batches(recipe, tokenizer, split="train", rank=0, world_size=1):
    return Batches(recipe, tokenizer, split, rank, world_size)
