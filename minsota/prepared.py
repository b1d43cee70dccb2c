"""Prepared data: a source tokenized once into memory-mapped token shards, read back window by window.

nanoGPT (``train.bin``), OLMo-core (numpy token files) and modded-nanogpt (FineWeb ``.bin`` shards) tokenize
once and train from memory-mapped tokens; tokenizing on the fly (`minsota.data.Batches`) makes every rank
tokenize the whole stream, so it gets no faster with more ranks. `minsota prepare SOURCE --tokenizer T --out
DIR` (`prepare`) writes both splits of a source, as `minsota.data.build_source` splits them, and
``data.source = DIR`` trains from it (the source ``files`` hands a prepared directory to `PreparedSource`).

Layout of DIR (written under a temporary name and renamed into place: a directory that exists is complete):
  prepared.json               the format, the tokenizer's identity, the data settings, per split: the token
                              dtype, counts, shard files
  SPLIT/tokens-NNNNN.bin      SPLIT's token stream for one epoch, raw little-endian uint16 (a vocabulary of at
                              most 65,536 tokens) or uint32: each non-empty document's tokens, then EOS
  SPLIT/documents.bin         int64: the stream offset of every document's first token

The batches are exactly the on-the-fly ones (`minsota.data`'s packing, order and sharding): window g is
stream[g·T : g·T + T + 1] of the endless stream, epoch after epoch, and micro-batch q of the global order
goes to rank q mod world_size. Here a rank reads only its own windows: data work per rank falls as ranks
are added. The position is the global window counter alone, so resume is exact at any world size, and a
run that streamed a source can continue from that source prepared (``--allow-change data.source``).
``data.shuffle`` permutes each epoch's documents (`PreparedSource.read_shuffled`); the position stays the window
counter, so it too resumes exactly at any world size. (On the fly, blocks of documents are permuted instead: the
two orders differ.)

The tokenizer's identity is its name, vocabulary size, EOS id and a fingerprint (a hash of the ids it gives
a fixed probe text); training with any other tokenizer is refused in one line.
"""

import hashlib
import json
import os
import shutil
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from minsota.data import Batches, TokenizedBlocks, Tokenizer, build_source, build_tokenizer, epoch_order, shuffle_seed
from minsota.errors import UserError

FORMAT = "minsota-prepared-1"
MANIFEST = "prepared.json"
SPLITS = ("train", "validation")
# Text the fingerprint tokenizes: prose, code, digits, whitespace runs and non-ASCII, where tokenizers differ.
PROBE = (
    "The quick brown fox jumps over the lazy dog. def f(x):\n\treturn x ** 2  # 1234567890\n\n"
    "Ünïcödé — naïve café, 東京, Москва, ☃ <|endoftext|> </s>   end."
)


def is_prepared(path) -> bool:
    return (Path(path).expanduser() / MANIFEST).is_file()


def identity(tokenizer: Tokenizer) -> dict:
    fingerprint = hashlib.sha256(json.dumps(tokenizer.encode(PROBE)).encode()).hexdigest()[:16]
    return {
        "name": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "fingerprint": fingerprint,
    }


# --------------------------------------------------------------------------------------------- writing


def prepare(recipe, out: Path, workers: int, shard_tokens: int = 1 << 28, max_tokens: int | None = None) -> dict:
    """Tokenize ``recipe``'s data.source with its data.tokenizer into the new directory ``out``; returns the
    manifest. ``workers`` tokenize in parallel (DataLoader workers, the order unchanged); ``max_tokens`` ends each
    split after the block that reaches it (its stream is then a prefix of the source's)."""
    out = Path(out)
    if out.exists():
        raise UserError(f"--out {out} exists: prepare writes a new directory")
    tokenizer = build_tokenizer(recipe, check_model=False)
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    d = recipe.data
    manifest = {
        "format": FORMAT,
        "tokenizer": identity(tokenizer),
        "dtype": np.dtype(dtype).name,
        "data": {"source": d.source, "text_field": d.text_field, "holdout_every": d.holdout_every},
        "splits": {},
    }
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        for split in SPLITS:
            source = build_source(recipe, split)
            manifest["splits"][split] = _write_split(
                source, tokenizer, d.block_docs, workers, partial / split, dtype, shard_tokens, max_tokens
            )
            counts = manifest["splits"][split]
            print(
                f"minsota: {split}: {counts['tokens']:,} tokens, {counts['documents']:,} documents "
                f"({counts['empty_documents']} empty skipped) in {len(counts['shards'])} shard(s)",
                file=sys.stderr,
            )
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return manifest


def _write_split(source, tokenizer, block_docs, workers, folder: Path, dtype, shard_tokens, max_tokens) -> dict:
    """One epoch of ``source``, tokenized in order (the on-the-fly loader's own blocks), into shards."""
    folder.mkdir(parents=True)
    blocks = DataLoader(TokenizedBlocks(source, tokenizer, block_docs, 0, None), batch_size=None, num_workers=workers)
    shards, tokens, empty, shard, in_shard = [], 0, 0, None, 0
    with open(folder / "documents.bin", "wb") as documents:
        for block in blocks:
            if block["epoch"] > 0 or (max_tokens is not None and tokens >= max_tokens):
                break
            ids = block["tokens"].numpy().astype(dtype)
            documents.write((torch.nonzero(block["starts"]).flatten().numpy() + tokens).astype(np.int64).tobytes())
            while len(ids):
                if shard is None or in_shard == shard_tokens:
                    if shard:
                        shard.close()
                    shards.append({"file": f"tokens-{len(shards):05}.bin", "tokens": 0})
                    shard, in_shard = open(folder / shards[-1]["file"], "wb"), 0
                piece, ids = ids[: shard_tokens - in_shard], ids[shard_tokens - in_shard :]
                shard.write(piece.astype(np.dtype(dtype).newbyteorder("<")).tobytes())
                in_shard += len(piece)
                shards[-1]["tokens"] += len(piece)
            tokens += len(block["tokens"])
            empty += block["empty"]
    if shard:
        shard.close()
    return {
        "tokens": tokens,
        "documents": (folder / "documents.bin").stat().st_size // 8,
        "empty_documents": empty,
        "shards": shards,
    }


# --------------------------------------------------------------------------------------------- reading


class PreparedSource:
    """``split`` of a prepared directory: its tokens and document starts, memory-mapped (nothing read yet)."""

    def __init__(self, path, split: str):
        self.path = Path(path).expanduser()
        try:
            self.manifest = json.loads((self.path / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read {self.path / MANIFEST}: {e}") from None
        if self.manifest.get("format") != FORMAT:
            raise UserError(f"{self.path} holds format '{self.manifest.get('format')}', not {FORMAT}: prepare it again")
        meta = self.manifest["splits"][split]
        folder, dtype = self.path / split, np.dtype(self.manifest["dtype"]).newbyteorder("<")
        self.length = meta["tokens"]
        self.shards = [np.memmap(folder / s["file"], dtype=dtype, mode="r") for s in meta["shards"] if s["tokens"]]
        self.shard_starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.documents = np.fromfile(folder / "documents.bin", dtype="<i8")
        self._laid_out = (None, None)
        if not self.length:
            raise UserError(f"{self.path}: its {split} split holds no tokens")

    def batches(self, recipe, tokenizer: Tokenizer, split: str, rank: int, world_size: int) -> "PreparedBatches":
        """This rank's micro-batches (`minsota.data.build_batches` hands a source with this method its work)."""
        prepared, given = self.manifest["tokenizer"], identity(tokenizer)
        if prepared != given:
            differs = next(key for key in given if given[key] != prepared.get(key))
            raise UserError(
                f"{recipe.where('data.tokenizer')}: data.tokenizer = '{recipe.data.tokenizer}' is not the "
                f"tokenizer {self.path} was prepared with ('{prepared['name']}': {differs} "
                f"{prepared.get(differs)} vs {given[differs]}): set data.tokenizer to it, or prepare again"
            )
        return PreparedBatches(recipe, self, rank, world_size, shuffle_seed(recipe, split))

    def read(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """``count`` tokens of the endless stream from ``start`` (wrapping into the next epoch), and whether each
        begins a document."""
        positions = (start + np.arange(count)) % self.length
        pieces, at, left = [], start % self.length, count
        while left:  # to the epoch's end, then on from its start (a split may be shorter than a window)
            end = min(self.length, at + left)
            pieces += self._range(at, end)
            at, left = 0, left - (end - at)
        found = np.minimum(np.searchsorted(self.documents, positions), len(self.documents) - 1)
        return np.concatenate(pieces).astype(np.int64), self.documents[found] == positions

    def read_shuffled(self, start: int, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """`read` of the stream whose epoch e holds the documents (each whole, its EOS included) in
        `minsota.data.epoch_order` (seed, e): data.shuffle."""
        tokens, firsts = [], []
        while count:
            epoch, at = divmod(start, self.length)
            order, starts = self._layout(epoch, seed)  # starts[i]: where the i-th document of the order begins
            end = min(self.length, at + count)
            for i in range(np.searchsorted(starts, at, "right") - 1, np.searchsorted(starts, end, "left")):
                lo, hi = max(at, starts[i]), min(end, starts[i + 1])
                origin = self.documents[order[i]] + lo - starts[i]
                tokens += self._range(origin, origin + hi - lo)
                firsts.append(np.arange(lo, hi) == starts[i])
            start, count = start + end - at, count - (end - at)
        return np.concatenate(tokens).astype(np.int64), np.concatenate(firsts)

    def _layout(self, epoch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(the epoch's document order, each one's start in the permuted epoch and the epoch's length last),
        kept for the epoch being read."""
        if self._laid_out[:2] != (epoch, seed):
            order = epoch_order(seed, epoch, len(self.documents))
            lengths = np.diff(self.documents, append=self.length)[order]
            self._laid_out = (epoch, seed, order, np.concatenate([[0], np.cumsum(lengths)]))
        return self._laid_out[2:]

    def _range(self, start: int, end: int) -> list[np.ndarray]:
        shard = int(np.searchsorted(self.shard_starts, start, side="right")) - 1
        pieces = []
        while start < end:
            offset = start - self.shard_starts[shard]
            piece = self.shards[shard][offset : offset + end - start]
            pieces.append(piece)
            start, shard = start + len(piece), shard + 1
        return pieces


class PreparedBatches(Batches):
    """`minsota.data.Batches` over a prepared split: the same micro-batches (its packing), read from the memory
    map, with no worker processes."""

    def __init__(
        self, recipe, source: PreparedSource, rank: int = 0, world_size: int = 1, order_seed: int | None = None
    ):
        self.source, self.rank, self.world_size, self.order_seed = source, rank, world_size, order_seed
        self.seq_len, self.micro = recipe.train.seq_len, recipe.train.micro_batch_size
        self.document_positions = recipe.data.packing == "document"
        self.pin_memory = torch.cuda.is_available() and recipe.train.device != "cpu"
        self.windows = 0

    def state_dict(self) -> dict:
        """windows: global windows consumed (the same on every rank, at every world size)."""
        return {"windows": self.windows, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.windows = state["windows"]

    def close(self) -> None:
        """Nothing runs in the background."""

    @property
    def epoch(self) -> int:
        return self.windows * self.seq_len // self.source.length

    def __next__(self) -> dict:
        first = self.windows + self.rank * self.micro
        read = self.source.read if self.order_seed is None else partial(self.source.read_shuffled, seed=self.order_seed)
        rows = [read((first + i) * self.seq_len, self.seq_len + 1) for i in range(self.micro)]
        self.windows += self.micro * self.world_size
        windows, starts = (torch.from_numpy(np.stack(x)) for x in zip(*rows))
        return self._micro_batch(windows, starts)
