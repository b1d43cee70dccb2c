"""Data loading: the tokens/s one rank receives, prepared data (`minsota.prepared`) against tokenizing on the fly.

A case builds rank 0's training batches of world size 1, 2 or 8 and takes a fixed number of micro-batches, in
the process (data.num_workers = 0, so the figure is one core's work: workers multiply both loaders alike). On
the fly every rank tokenizes the whole stream and keeps its share, so a rank's rate falls with the world size;
prepared, a rank reads its own windows from the memory map. "global tok/s" is the rate times the world size:
what the data path can feed all ranks together. The first micro-batch (opening files, a first block) is
inside the timing: a loader is built once per run, and resuming builds it again.

Sizes: the Python standard library (source ``stdlib``) with the gpt-neox-20b tokenizer from ../shared/data when
present (else bytes), its first 2M tokens prepared, 32 micro-batches of 8 x 1024; --smoke: bytes, 50k tokens,
4 micro-batches of 2 x 64.
"""

import statistics
from pathlib import Path

import pytest

from minsota.data import build_batches, build_tokenizer
from minsota.loader import load_recipe
from minsota.prepared import prepare

NEOX = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt-neox-20b"


@pytest.fixture(scope="module")
def corpus(setting, tmp_path_factory):
    """(recipe settings, micro-batches per case, prepared directory)."""
    smoke = setting.smoke
    tokenizer = str(NEOX) if NEOX.is_dir() and not smoke else "bytes"
    seq, micro, count = (64, 2, 4) if smoke else (1024, 8, 32)
    settings = {
        "data.source": "stdlib",
        "data.tokenizer": tokenizer,
        "data.num_workers": 0,
        "model.vocab_size": 50304,
        "train.seq_len": seq,
        "model.max_seq_len": seq,
        "train.micro_batch_size": micro,
        "train.batch_size": micro * 8,
        "train.device": "cpu",
    }
    out = tmp_path_factory.mktemp("prepared") / "stdlib"
    prepare(load_recipe("tiny", settings), out, workers=0, max_tokens=50_000 if smoke else 2_000_000)
    return settings, count, out


@pytest.mark.parametrize("world", [1, 2, 8])
@pytest.mark.parametrize("loader", ["prepared", "on-the-fly"])
def test_loader(benchmark, record, setting, corpus, loader, world):
    settings, count, prepared = corpus
    recipe = load_recipe("tiny", {**settings, **({"data.source": str(prepared)} if loader == "prepared" else {})})
    tokenizer = build_tokenizer(recipe)
    per_rank = count * recipe.train.micro_batch_size * recipe.train.seq_len

    def take():
        batches = build_batches(recipe, tokenizer, "train", rank=0, world_size=world)
        for _ in range(count):
            assert next(batches)["tokens"].shape == (recipe.train.micro_batch_size, recipe.train.seq_len)
        batches.close()

    benchmark.pedantic(take, rounds=min(setting.rounds, 3), warmup_rounds=0)
    if benchmark.enabled:
        rate = per_rank / statistics.median(benchmark.stats.stats.data)
        record(tokens_per_s=rate, global_tokens_per_s=rate * world, tokenizer=tokenizer.name.rsplit("/", 1)[-1])
