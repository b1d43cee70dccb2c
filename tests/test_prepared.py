"""Prepared data (`minsota prepare`, `minsota.prepared`): the same micro-batches as the source tokenized on the fly,
for every split, packing, rank and world size, across shard and epoch boundaries; exact resume; the same training
losses; a tokenizer that is not the prepared one refused in one line."""

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from minsota.data import build_batches, build_tokenizer, default_workers, epoch_order
from minsota.loader import load_recipe
from minsota.prepared import PreparedSource, prepare

from conftest import ENV, losses, run, sets
from test_data import assert_same, corpus, packed, take, tiny


@pytest.fixture
def prepared(tmp_path):
    """DOCS as a jsonl.gz source and the same prepared in 40-token shards -> (source spec, prepared directory)."""
    spec, _ = corpus(tmp_path, "jsonl.gz")
    prepare(tiny(source=spec), tmp_path / "prepared", workers=0, shard_tokens=40)
    return spec, str(tmp_path / "prepared")


def test_the_prepared_stream_is_the_sources_tokens_in_shards(prepared):
    spec, directory = prepared
    manifest = json.loads((PreparedSource(directory, "train").path / "prepared.json").read_text())
    train = manifest["splits"]["train"]
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["name"] == "bytes"
    assert len(train["shards"]) > 3 and all(s["tokens"] == 40 for s in train["shards"][:-1])
    # DOCS has 24 documents: number 0 is held out for validation, 5 and 9 are (whitespace-)empty
    assert (train["documents"], train["empty_documents"], manifest["splits"]["validation"]["documents"]) == (21, 2, 1)


@pytest.mark.parametrize("packing", ["causal", "document"])
@pytest.mark.parametrize("split", ["train", "validation"])
def test_prepared_batches_are_the_sources_own_for_every_rank(prepared, packing, split):
    spec, directory = prepared
    overrides = {"train.batch_size": 8, "data.packing": packing}
    tokenizer = build_tokenizer(tiny())
    streamed = take(build_batches(tiny(overrides, source=spec), tokenizer, split), 24)
    assert_same(take(build_batches(tiny(overrides, source=directory), tokenizer, split), 24), streamed)
    for world in (2, 4):  # micro-batch q of the global order on rank q % world, as the stream deals them
        ranks = [build_batches(tiny(overrides, source=directory), tokenizer, split, r, world) for r in range(world)]
        per_rank = [take(b, 24 // world) for b in ranks]
        assert_same([per_rank[q % world][q // world] for q in range(24)], streamed)
    assert ranks[0].epoch >= 1  # the stretch crossed at least one epoch's end


def test_resume_is_exact_at_another_world_size_and_from_a_streamed_position(prepared):
    spec, directory = prepared
    tokenizer = build_tokenizer(tiny())
    streamed = build_batches(tiny(source=spec), tokenizer)
    take(streamed, 3)
    saved = json.loads(json.dumps(streamed.state_dict()))  # a position saved while streaming the source
    reference = take(streamed, 8)
    alone = build_batches(tiny(source=directory), tokenizer)
    alone.load_state_dict(saved)
    assert_same(take(alone, 4), reference[:4])
    halves = [build_batches(tiny(source=directory), tokenizer, rank=r, world_size=2) for r in range(2)]
    for batches in halves:
        batches.load_state_dict(json.loads(json.dumps(alone.state_dict())))
    per_rank = [take(b, 2) for b in halves]
    assert_same([per_rank[q % 2][q // 2] for q in range(4)], reference[4:])
    assert halves[0].state_dict() == halves[1].state_dict() and halves[0].state_dict()["windows"] == 11 * 2


def test_shuffled_prepared_documents_follow_the_seed_at_every_world_size_and_resume(prepared, tmp_path):
    """data.shuffle on a prepared split: epoch e holds its documents whole in epoch_order(seed, e), across
    shard and epoch boundaries; ranks deal the one order; a saved position resumes at another world size."""
    spec, directory = prepared
    _, train = corpus(tmp_path, "jsonl.gz")
    documents = [t for t in train if t.strip()]
    recipe = tiny({"train.seed": 3, "train.batch_size": 8}, source=directory, shuffle=True)
    tokenizer = build_tokenizer(recipe)
    texts = [documents[i] for epoch in range(3) for i in epoch_order(3, epoch, len(documents))]
    stream, starts = packed(texts, tokenizer)
    alone = build_batches(recipe, tokenizer)
    reference = take(alone, 24)
    for q, batch in enumerate(reference):
        for row in range(2):
            g = 2 * q + row
            assert batch["tokens"][row].tolist() == stream[g * 16 : g * 16 + 16]
            assert batch["targets"][row].tolist() == stream[g * 16 + 1 : g * 16 + 17]
    assert alone.epoch >= 1 and texts[: len(documents)] != documents
    ranks = [build_batches(recipe, tokenizer, rank=r, world_size=4) for r in range(4)]
    for batches in ranks:
        batches.load_state_dict({"windows": 8 * 2, "epoch": 0})  # after micro-batch 8 of the single process
    per_rank = [take(b, 4) for b in ranks]
    assert_same([per_rank[q % 4][q // 4] for q in range(16)], reference[8:])
    plain = take(build_batches(tiny({"train.seed": 3}, source=directory), tokenizer, "validation"), 3)
    assert_same(take(build_batches(recipe, tokenizer, "validation"), 3), plain)


def test_training_on_prepared_data_gives_the_streamed_losses(tmp_path):
    """stdlib's first ~300k tokens prepared (in 2 worker processes): tiny's losses and validation loss are equal."""
    out = tmp_path / "stdlib"
    process = run(
        "prepare",
        "stdlib",
        "--tokenizer",
        "bytes",
        "--out",
        out,
        "--recipe",
        "tiny",
        "--max-tokens",
        300_000,
        "--workers",
        2,
        env=ENV,
    )
    assert process.returncode == 0, process.stderr
    assert "train from it with --set data.source=" in process.stdout
    runs = {}
    for name, source in (("streamed", "stdlib"), ("prepared", out)):
        overrides = {"train.steps": 4, "train.eval_batches": 2, "train.sample_tokens": 0, "data.source": source}
        process = run("train", "tiny", "--out", tmp_path / name, *sets(overrides), env=ENV)
        assert process.returncode == 0, process.stderr
        runs[name] = tmp_path / name
    assert losses(runs["prepared"]) == losses(runs["streamed"])
    last = [json.loads(line) for line in (runs["prepared"] / "metrics.jsonl").read_text().splitlines()][-1]
    first = [json.loads(line) for line in (runs["streamed"] / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["val_loss"] == first["val_loss"]


def word_tokenizer(path):
    """A real (if small) Hugging Face tokenizer.json: a word-level vocabulary with an end-of-text token."""
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate("doc abcdefghij : 0 1 2".split())}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))
    return path


def test_another_tokenizer_is_refused_in_one_line(prepared, tmp_path):
    _, directory = prepared
    other = word_tokenizer(tmp_path / "tokenizer.json")
    process = run(
        "train",
        "tiny",
        "--out",
        tmp_path / "run",
        *sets({"data.source": directory, "data.tokenizer": other, "train.steps": 1}),
        env=ENV,
    )
    assert process.returncode == 2, process.stderr
    line = process.stderr.strip()
    assert "\n" not in line and "data.tokenizer" in line and "prepared with ('bytes'" in line, line


def test_prepare_refuses_an_existing_directory(prepared, cli):
    spec, directory = prepared
    code, _, err = cli("prepare", spec, "--tokenizer", "bytes", "--out", directory, "--recipe", "tiny")
    assert code == 2 and "exists" in err and len(err.strip().splitlines()) == 1


def test_a_large_vocabulary_is_stored_as_uint32(tmp_path):
    ids = np.array([70_000, 3, 65_536], dtype="<u4")
    (tmp_path / "train").mkdir()
    ids.tofile(tmp_path / "train" / "tokens-00000.bin")
    np.array([0, 2], dtype="<i8").tofile(tmp_path / "train" / "documents.bin")
    shards = [{"file": "tokens-00000.bin", "tokens": 3}]
    (tmp_path / "prepared.json").write_text(
        json.dumps(
            {"format": "minsota-prepared-1", "dtype": "uint32", "splits": {"train": {"tokens": 3, "shards": shards}}}
        )
    )
    tokens, starts = PreparedSource(tmp_path, "train").read(1, 5)  # wraps into the next epoch twice
    assert tokens.tolist() == [3, 65_536, 70_000, 3, 65_536] and starts.tolist() == [False, True, True, False, True]


def test_streaming_workers_default_to_one_on_cpu_and_to_the_ranks_share_of_the_cores_on_cuda(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 32)
    assert default_workers(cuda=False) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_workers(cuda=True) == 3  # 4 cores per rank, one of them the trainer's
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert default_workers(cuda=True) == 8
    assert load_recipe("tiny").data.num_workers is None
