"""The data pipeline: real tokenizers and real `datasets` loading on local files, packing, sharding, resume, offline.

Corpora are small local files written per test (or the offline stdlib corpus); the real gpt-neox-20b tokenizer
and the C4 sample come from ../shared/data and the tests that need them skip without it.
"""

import gzip
import json
import logging
import math
import re
import signal
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import minsota
from minsota.data import (
    _outlive_stop_signals,
    absolute_spec,
    build_batches,
    build_source,
    build_tokenizer,
    epoch_order,
)
from minsota.errors import UserError
from minsota.loader import recipe_from_dict

from conftest import SHARED_DATA, run

NEOX = SHARED_DATA / "gpt-neox-20b"
C4_SAMPLE = SHARED_DATA / "c4-sample"
needs_neox = pytest.mark.skipif(not NEOX.is_dir(), reason=f"real tokenizer not found at {NEOX}")
needs_c4 = pytest.mark.skipif(not (C4_SAMPLE.is_dir() and NEOX.is_dir()), reason=f"C4 sample not found at {C4_SAMPLE}")

# Short documents of uneven length, an empty and a whitespace-only one: windows cross documents, blocks and epochs.
DOCS = [f"doc {i}: " + "abcdefghij"[: i % 7] * (1 + i % 4) for i in range(24)]
DOCS[5], DOCS[9] = "", "  \n"


def tiny(overrides=None, **data):
    """The tiny recipe with a small batch: 2 windows of 16 tokens per micro-batch, 4 per optimizer step."""
    settings = {
        "train.seq_len": 16,
        "train.batch_size": 4,
        "train.micro_batch_size": 2,
        "data.num_workers": 0,
        "data.block_docs": 2,
        **{f"data.{k}": v for k, v in data.items()},
        **(overrides or {}),
    }
    return minsota.load_recipe("tiny", settings)


def write_jsonl_gz(path, texts):
    """C4's layout: text, url and a `date` that datasets reads as a timestamp (only text may be read)."""
    with gzip.open(path, "wt") as f:
        for i, text in enumerate(texts):
            f.write(
                json.dumps({"text": text, "url": f"https://example.org/{i}", "date": "2019-04-21T18:54:04Z"}) + "\n"
            )
    return path


def corpus(tmp_path, kind):
    """DOCS as a data.source of the given kind -> (spec, the training documents in order)."""
    train = [t for i, t in enumerate(DOCS) if i % 100]  # holdout_every = 100 keeps document 0 for validation
    if kind == "jsonl.gz":
        return str(write_jsonl_gz(tmp_path / "docs.jsonl.gz", DOCS)), train
    if kind == "txt":
        for i, text in enumerate(DOCS):
            (tmp_path / f"{i:03}.txt").write_text(text)
        return str(tmp_path / "*.txt"), train
    if kind == "parquet":
        pq.write_table(pa.table({"id": list(range(len(DOCS))), "text": DOCS}), tmp_path / "docs.parquet")
        return str(tmp_path), train
    if kind == "hf-dir":  # a dataset directory with its own validation split: nothing is held out of train
        write_jsonl_gz(tmp_path / "train.jsonl.gz", DOCS)
        write_jsonl_gz(tmp_path / "validation.jsonl.gz", ["held out"])
        return f"hf:{tmp_path}", DOCS
    raise ValueError(kind)


def packed(texts, tokenizer):
    """The token stream by definition: each non-empty document, then EOS; and its document-start flags."""
    ids, starts = [], []
    for text in texts:
        if text.strip():
            doc = tokenizer.encode(text) + [tokenizer.eos_id]
            ids += doc
            starts += [True] + [False] * (len(doc) - 1)
    return ids, starts


def take(batches, n):
    return [next(batches) for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


# ------------------------------------------------------------------------------------------- tokenizers


@needs_neox
@pytest.mark.parametrize("path", ["dir", "tokenizer.json"])
def test_gpt_neox_tokenizer_exact_ids(path):
    spec = NEOX if path == "dir" else NEOX / "tokenizer.json"
    tokenizer = build_tokenizer(tiny({"model.vocab_size": 50304}, tokenizer=str(spec)))
    assert (tokenizer.vocab_size, tokenizer.eos_id) == (50277, 0)
    assert tokenizer.encode("Hello world") == [12092, 1533]
    assert tokenizer.encode("Hello world! This is a test.") == [12092, 1533, 2, 831, 310, 247, 1071, 15]
    assert tokenizer.decode([12092, 1533]) == "Hello world"
    assert 0 not in tokenizer.encode("a<|endoftext|>b")  # text that spells EOS is not a document boundary


def test_tokenizer_larger_than_the_model_is_refused():
    with pytest.raises(UserError, match=r"256 tokens but model.vocab_size = 128"):
        build_tokenizer(tiny({"model.vocab_size": 128}))


def test_unknown_names_suggest_close_ones():
    with pytest.raises(UserError, match=r"data.source = 'stdlb'.*did you mean 'stdlib'"):
        build_source(tiny(source="stdlb"))
    with pytest.raises(UserError, match=r"data.tokenizer = 'byte'.*did you mean 'bytes'"):
        build_tokenizer(tiny(tokenizer="byte"))
    with pytest.raises(UserError, match=r"data.source = 'stdlib:py': stdlib takes no argument"):
        build_source(tiny(source="stdlib:py"))


# ---------------------------------------------------------------------------------------------- sources


def documents(recipe, split="train"):
    return [text for texts, _ in build_source(recipe, split).blocks(8) for text in texts]


def test_stdlib_corpus_is_real_python_with_a_held_out_slice():
    train, validation = documents(tiny(), "train"), documents(tiny(), "validation")
    assert len(validation) == math.ceil((len(train) + len(validation)) / 100)  # documents 0, 100, 200, …
    assert len(train) > 500 and sum(map(len, train)) > 5_000_000
    assert "def " in train[0] + train[1] and "import " in train[0] + train[1]


@pytest.mark.parametrize("kind", ["jsonl.gz", "txt", "parquet"])
def test_local_files_hold_out_every_nth_document_for_validation(tmp_path, kind):
    spec, _ = corpus(tmp_path, kind)
    recipe = tiny(source=spec, holdout_every=10)
    assert documents(recipe, "validation") == [DOCS[0], DOCS[10], DOCS[20]]
    assert documents(recipe, "train") == [t for i, t in enumerate(DOCS) if i % 10]


def test_hf_dataset_directory_uses_its_validation_split(tmp_path):
    spec, train = corpus(tmp_path, "hf-dir")
    recipe = tiny(source=spec)
    assert documents(recipe, "train") == train
    assert documents(recipe, "validation") == ["held out"]


def test_bad_sources_fail_in_one_line(tmp_path):
    with pytest.raises(UserError, match="no files match"):
        build_source(tiny(source=str(tmp_path / "nothing-*.jsonl")))
    path = write_jsonl_gz(tmp_path / "blank.jsonl.gz", ["", " ", "\n"])
    with pytest.raises(UserError, match="no non-empty train documents"):
        build_source(tiny(source=str(path)))
    with pytest.raises(UserError, match="'body'"):
        build_source(tiny(source=str(path), text_field="body"))


def write_jsonl(path, rows):
    path.write_text("".join(row if isinstance(row, str) else json.dumps(row) + "\n" for row in rows))
    return path


BAD_FILES = {  # name: (rows, or raw bytes; what the one line says)
    "empty.jsonl": (b"", r"no documents: every file is empty"),
    "empty.json.gz": (gzip.compress(b""), r"no documents: every file is empty"),
    "malformed.jsonl": (
        [{"text": "one"}, {"text": "two"}, {"text": "three"}, '{"text": "fo\n', {"text": "five"}],
        r"cannot read the documents: JSON parse error: .* in row 3$",
    ),
    "not-json.jsonl": (
        [f"plain line {i}\n" for i in range(4)],
        r"cannot read the documents: JSON parse error: .* row 0$",
    ),
    "numbers.jsonl": ([{"text": i} for i in range(4)], r"data.text_field = 'text' holds int values, not text: 1$"),
    "lists.jsonl": ([{"text": ["a", "b"]}] * 4, r"data.text_field = 'text' holds list values, not text: \['a', 'b'\]$"),
    "truncated.jsonl.gz": (
        gzip.compress(b'{"text": "a document"}\n' * 500)[:30],
        r"cannot read the documents: Compressed file ended before the end-of-stream marker",
    ),
    "latin-1.txt": ("café ".encode("latin-1") * 10, r"cannot read the documents: 'utf-8' codec can't decode byte 0xe9"),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_files_fail_in_one_line_naming_the_source(tmp_path, name):
    content, message = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(content) if isinstance(content, bytes) else write_jsonl(path, content)
    with pytest.raises(UserError, match=rf"^--set data.source: data.source = '{re.escape(str(path))}': {message}"):
        build_source(tiny(source=str(path)))


def test_a_bad_file_in_a_glob_is_named_in_one_line_and_exit_2(tmp_path):
    """Through the CLI: datasets' own log line about the file is folded into minsota's one line."""
    write_jsonl(tmp_path / "a.jsonl", [{"text": f"doc {i}"} for i in range(3)])
    write_jsonl(tmp_path / "b.jsonl", [{"text": "fine"}, '{"text": "unterminated\n'])
    result = run(
        "train",
        "tiny",
        "--set",
        f"data.source={tmp_path}/*.jsonl",
        "--set",
        "data.num_workers=0",
        "--out",
        tmp_path / "run",
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "data.source" in result.stderr and "JSON parse error" in result.stderr
    assert f"(in {tmp_path / 'b.jsonl'})" in result.stderr


def test_a_source_whose_documents_are_all_held_out_says_so(tmp_path):
    single = tmp_path / "big.txt"
    single.write_text("A long single document. " * 1000)
    with pytest.raises(
        UserError,
        match=r"its only document is held out for validation, none is left to train on "
        r"\(data.holdout_every = 100 holds out documents 0, 100, 200, …, the first "
        r"included; a .txt file is one document\): give it several documents: a "
        r".jsonl with one per line, or a directory of files$",
    ):
        build_source(tiny(source=str(single)))
    assert documents(tiny(source=str(single)), "validation") == [single.read_text()]
    spec, _ = corpus(tmp_path, "jsonl.gz")
    with pytest.raises(
        UserError,
        match=rf"all {len(DOCS)} of its documents are held out .*: set data.holdout_every "
        r"to 2 or more$",
    ):
        build_source(tiny(source=spec, holdout_every=1))


# ------------------------------------------------------------------------------ local paths, stored absolute


def test_local_paths_are_made_absolute_and_names_are_not(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tok").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs.jsonl").write_text('{"text": "a document"}\n')
    plugins = minsota.load_plugins()
    expected = {
        ("source", "docs.jsonl"): str(tmp_path / "docs.jsonl"),
        ("source", "sub/missing.jsonl"): str(tmp_path / "sub" / "missing.jsonl"),  # a path to `files`, existing or not
        ("source", "../data/*.json.gz"): str(tmp_path.parent / "data" / "*.json.gz"),  # a glob stays a glob
        ("source", "~/corpus/*.txt"): str(Path.home() / "corpus" / "*.txt"),
        ("source", "files:docs.jsonl"): f"files:{tmp_path / 'docs.jsonl'}",
        ("source", "hf:docs:en"): f"hf:{tmp_path / 'docs'}:en",  # a local dataset directory
        ("tokenizer", "tok"): str(tmp_path / "tok"),
        ("tokenizer", "./tok"): str(tmp_path / "tok"),
        ("tokenizer", "hf:tok"): f"hf:{tmp_path / 'tok'}",
    }
    for (key, spec), absolute in expected.items():
        assert absolute_spec(key, spec, plugins) == absolute, spec
    for key, spec in [
        ("source", "stdlib"),
        ("source", "c4"),
        ("source", "hf:allenai/c4:en"),
        ("source", "stdlb"),
        ("source", "missing.jsonl"),  # not (yet) paths: refused as unknown names
        ("tokenizer", "bytes"),
        ("tokenizer", "gpt-neox-20b"),
        ("tokenizer", "EleutherAI/pythia-160m"),
        ("tokenizer", "hf:EleutherAI/pythia-160m"),
    ]:
        assert absolute_spec(key, spec, plugins) == spec
    recipe = tiny(source="docs.jsonl", tokenizer="tok")
    assert (recipe.data.source, recipe.data.tokenizer) == (str(tmp_path / "docs.jsonl"), str(tmp_path / "tok"))
    # a resumed run's override is made absolute; its saved values are kept as written
    saved = {**tiny().to_dict(), "data": {**tiny().to_dict()["data"], "source": "kept.jsonl"}}
    assert recipe_from_dict(saved, "recipe.json").data.source == "kept.jsonl"
    again = recipe_from_dict(saved, "recipe.json", {"data.source": "docs.jsonl", "data.tokenizer": "./tok"})
    assert (again.data.source, again.data.tokenizer) == (str(tmp_path / "docs.jsonl"), str(tmp_path / "tok"))


def test_a_relative_source_trains_resumes_and_evaluates_on_the_same_data_from_anywhere(tmp_path, monkeypatch, cli):
    """Trained from one directory with data.source=docs.jsonl, a run resumes and evaluates on that file from any
    other, even one holding a different docs.jsonl; a relative --set data.source on resume is made absolute."""
    here, elsewhere, empty, run_dir = tmp_path / "here", tmp_path / "elsewhere", tmp_path / "empty", tmp_path / "run"
    for directory in (here, elsewhere, empty):
        directory.mkdir()
    write_jsonl(here / "docs.jsonl", [{"text": text} for text in DOCS])
    write_jsonl(elsewhere / "docs.jsonl", [{"text": text.upper() + " OTHER"} for text in DOCS])
    quick = [
        f"--set=train.{key}"
        for key in ("steps=2", "sample_tokens=0", "eval_batches=1", "batch_size=2", "micro_batch_size=2", "seq_len=32")
    ]
    monkeypatch.chdir(here)
    code, _, err = cli(
        "train", "tiny", "--set", "data.source=docs.jsonl", "--set", "data.num_workers=0", *quick, "--out", run_dir
    )
    assert code == 0, err
    assert json.loads((run_dir / "recipe.json").read_text())["data"]["source"] == str(here / "docs.jsonl")
    code, evaluated_here, err = cli("eval", run_dir)
    assert code == 0, err

    monkeypatch.chdir(elsewhere)  # its own docs.jsonl is other data
    code, evaluated_elsewhere, err = cli("eval", run_dir)
    assert code == 0, err
    assert evaluated_elsewhere == evaluated_here and str(here / "docs.jsonl") in evaluated_here
    monkeypatch.chdir(empty)  # where docs.jsonl names nothing
    code, _, err = cli("train", "--resume", run_dir, "--set", "train.steps=3")
    assert code == 0, err
    assert (run_dir / "checkpoints" / "step-3").is_dir()

    monkeypatch.chdir(elsewhere)
    code, _, err = cli("train", "--resume", run_dir, "--set", "train.steps=4", "--set", "data.source=docs.jsonl")
    assert code == 2 and f"data.source changed from '{here / 'docs.jsonl'}' to '{elsewhere / 'docs.jsonl'}'" in err
    code, _, err = cli(
        "train",
        "--resume",
        run_dir,
        "--set",
        "train.steps=4",
        "--set",
        "data.source=docs.jsonl",
        "--allow-change",
        "data.source",
    )
    assert code == 0, err
    assert json.loads((run_dir / "recipe.json").read_text())["data"]["source"] == str(elsewhere / "docs.jsonl")


@needs_c4
def test_c4_sample_streams_with_the_real_tokenizer():
    recipe = tiny({"model.vocab_size": 50304}, source=str(C4_SAMPLE / "*.json.gz"), tokenizer=str(NEOX))
    tokenizer = build_tokenizer(recipe)
    train, validation = documents(recipe, "train"), documents(recipe, "validation")
    assert (len(train), len(validation)) == (29, 1)  # 30 documents, the first held out for validation
    assert sum(len(tokenizer.encode(text)) for text in train + validation) == 11811  # shared/data/README.md
    stream, _ = packed(train, tokenizer)
    batch = next(build_batches(recipe, tokenizer))
    assert batch["tokens"].flatten().tolist() == stream[:16] + stream[16:32]
    assert int(batch["tokens"].max()) < tokenizer.vocab_size


# ---------------------------------------------------------------------------------------------- packing


def test_causal_packing_drops_no_token_and_runs_into_the_next_epoch(tmp_path, caplog):
    spec, train = corpus(tmp_path, "jsonl.gz")
    recipe = tiny(source=spec)
    tokenizer = build_tokenizer(recipe)
    stream, starts = packed(train, tokenizer)
    n = 2 * len(stream) // 32 + 1  # micro-batches (of 2 × 16 tokens) whose next window lies in the third epoch
    stream, starts = stream * 3, starts * 3
    with caplog.at_level(logging.INFO, logger="minsota.data"):
        batches = build_batches(recipe, tokenizer)
        got = take(batches, n)
    for q, batch in enumerate(got):
        for row in range(2):
            g = 2 * q + row  # the global window index
            window = stream[g * 16 : g * 16 + 17]
            assert batch["tokens"][row].tolist() == window[:-1]
            assert batch["targets"][row].tolist() == window[1:]
            assert batch["positions"][row].tolist() == list(range(16))
            expected_ids = torch.tensor(starts[g * 16 : g * 16 + 16]).cumsum(0)
            assert batch["document_ids"][row].tolist() == (expected_ids - expected_ids[0]).tolist()
    assert batches.epoch == 2 and batches.state_dict()["epoch"] == 2
    assert batches.state_dict()["empty_documents"] >= 2  # "" and "  \n", skipped and counted in each epoch
    assert any("epoch 1 begins" in r.getMessage() for r in caplog.records)


def test_document_packing_restarts_positions_per_document(tmp_path):
    spec, train = corpus(tmp_path, "jsonl.gz")
    recipe = tiny(source=spec, packing="document")
    tokenizer = build_tokenizer(recipe)
    _, starts = packed(train, tokenizer)
    batch = next(build_batches(recipe, tokenizer))
    for row in range(2):
        flags = starts[row * 16 : row * 16 + 16]
        position, expected = 0, []
        for i, first in enumerate(flags):
            position = 0 if first or i == 0 else position + 1
            expected.append(position)
        assert batch["positions"][row].tolist() == expected
        assert batch["document_ids"][row].max() >= 1  # the window does hold several documents


def test_document_masking_keeps_documents_apart(tmp_path):
    """Perturbing document 1's tokens leaves document 2's logits unchanged under document packing (and changes
    them under plain causal attention, so the test can fail)."""
    spec, _ = corpus(tmp_path, "jsonl.gz")
    recipe = tiny({"train.seq_len": 48}, source=spec, packing="document")
    batch = next(build_batches(recipe, build_tokenizer(recipe)))
    tokens, positions, document_ids = batch["tokens"][:1], batch["positions"][:1], batch["document_ids"][:1]
    first, second = document_ids[0] == 0, document_ids[0] == 1
    assert first.sum() > 1 and second.sum() > 1
    perturbed = tokens.clone()
    perturbed[0, first] = (tokens[0, first] + 7) % 256
    model = minsota.build_model(recipe).eval()
    with torch.no_grad():
        masked = [model(t, positions, document_ids)[0] for t in (tokens, perturbed)]
        causal = [model(t, positions)[0] for t in (tokens, perturbed)]
    diff = (masked[0][second] - masked[1][second]).abs()
    assert diff.max() < 1e-6, f"document 2 leaked: max abs diff {diff.max():.3g}, mean {diff.mean():.3g}"
    assert (masked[0][first] - masked[1][first]).abs().max() > 1e-3
    assert (causal[0][second] - causal[1][second]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------- sharding and resume


@pytest.mark.parametrize("shuffle", [False, True])
def test_ranks_and_workers_split_the_single_process_stream(tmp_path, shuffle):
    spec, _ = corpus(tmp_path, "jsonl.gz")
    overrides = {"train.batch_size": 8, "data.block_docs": 1, "data.shuffle": shuffle}
    single = take(build_batches(tiny(overrides, source=spec), build_tokenizer(tiny())), 16)
    recipe = tiny(overrides, source=spec, num_workers=2)
    tokenizer = build_tokenizer(recipe)
    ranks = [build_batches(recipe, tokenizer, rank=r, world_size=2) for r in range(2)]
    per_rank = [take(b, 8) for b in ranks]
    # micro-batch q of the global order goes to rank q % 2: together the ranks read every window exactly once
    assert_same([per_rank[q % 2][q // 2] for q in range(16)], single)
    assert ranks[0].state_dict() == ranks[1].state_dict()
    assert ranks[0].state_dict()["windows"] == 4 * 8  # four optimizer steps of 8 sequences


@pytest.mark.parametrize(
    "kind, shuffle", [("jsonl.gz", False), ("txt", False), ("parquet", False), ("hf-dir", False), ("txt", True)]
)
def test_resume_is_exact_twice_over_and_across_worker_counts(tmp_path, kind, shuffle):
    spec, _ = corpus(tmp_path, kind)
    recipe = tiny(source=spec, shuffle=shuffle)
    tokenizer = build_tokenizer(recipe)
    original = build_batches(recipe, tokenizer)
    take(original, 3)
    saved = json.loads(json.dumps(original.state_dict()))  # as the trainer stores it
    reference = take(original, 12)
    assert original.epoch >= 1  # the resumed stretch crosses into the next epoch

    first = build_batches(tiny(source=spec, num_workers=2, shuffle=shuffle), tokenizer)
    first.load_state_dict(saved)
    assert_same(take(first, 6), reference[:6])
    second = build_batches(tiny(source=spec, num_workers=1, shuffle=shuffle), tokenizer)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))  # a resumed run's position resumes again
    assert_same(take(second, 6), reference[6:])
    assert second.state_dict() == json.loads(json.dumps(original.state_dict()))


def test_shuffle_permutes_each_epochs_blocks_by_the_seed_and_leaves_validation_alone(tmp_path):
    """data.shuffle: epoch e's blocks (2 source documents each, document 0 held out) in epoch_order(seed, e),
    packed as ever; another seed, another order; the validation windows are the unshuffled ones."""
    spec, _ = corpus(tmp_path, "jsonl.gz")
    blocks = [[t for i, t in enumerate(DOCS[b : b + 2], b) if i % 100] for b in range(0, len(DOCS), 2)]
    tokenizer = build_tokenizer(tiny())
    streams = {}
    for seed in (0, 1):
        recipe = tiny({"train.seed": seed}, source=spec, shuffle=True)
        batches = build_batches(recipe, tokenizer)
        got = torch.cat([b["tokens"] for b in take(batches, 12)]).flatten().tolist()
        assert batches.epoch >= 1  # the stretch crossed into a second epoch, which has an order of its own
        orders = [epoch_order(seed, epoch, len(blocks)) for epoch in range(3)]
        texts = [t for order in orders for k in order for t in blocks[k]]
        stream, _ = packed(texts, tokenizer)
        assert got == [token for g in range(24) for token in stream[g * 16 : g * 16 + 16]]
        streams[seed] = got
    assert streams[0] != streams[1] and list(orders[0]) != list(orders[1])
    plain = tiny(source=spec)
    assert_same(
        take(build_batches(recipe, tokenizer, "validation"), 3), take(build_batches(plain, tokenizer, "validation"), 3)
    )


@pytest.mark.parametrize("before, after", [(False, True), (True, False)])
def test_a_position_in_the_other_order_restarts_its_epoch(tmp_path, before, after):
    """--allow-change data.shuffle: a saved position of the other order is not the source's to resume."""
    spec, _ = corpus(tmp_path, "jsonl.gz")
    tokenizer = build_tokenizer(tiny())
    saved = build_batches(tiny(source=spec, shuffle=before), tokenizer)
    take(saved, 3)
    resumed = build_batches(tiny(source=spec, shuffle=after), tokenizer)
    resumed.load_state_dict(json.loads(json.dumps(saved.state_dict())))
    assert next(resumed)["tokens"].shape == (2, 16) and resumed.epoch == 0


def test_shuffling_a_hub_stream_is_refused_naming_the_key():
    with pytest.raises(UserError, match=r"data.source = 'c4': data.shuffle = true needs a finite local source"):
        build_source(tiny({"data.source": "c4", "data.shuffle": True}))


# --------------------------------------------------------------------------------------------- offline


def timed_train(tmp_path, sets: list[str], env: dict, out: str):
    """(`minsota train tiny` with these --set options, its wall time in seconds)."""
    start = time.monotonic()
    result = run(
        "train", "tiny", *(arg for s in sets for arg in ("--set", s)), "--out", tmp_path / out, timeout=120, env=env
    )
    return result, time.monotonic() - start


def fails_fast_in_one_line(tmp_path, sets: list[str], env: dict, *words: str) -> None:
    """`minsota train tiny` with these --set options exits 2 in one stderr line holding ``words``, and no later
    than a start-up that fails on a missing local file, measured beside it, plus 8 s: the libraries' retries
    take 24-47 s with the hub unreachable, and a loaded machine slows both runs alike."""
    result, elapsed = timed_train(tmp_path, sets, env, "run")
    assert result.returncode == 2, result.stderr
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert all(word in result.stderr for word in words), result.stderr
    local, baseline = timed_train(tmp_path, [f"data.source={tmp_path / 'missing.jsonl'}"], env, "local")
    assert local.returncode == 2, local.stderr
    assert elapsed < baseline + 8, f"took {elapsed:.1f} s, a local mistake {baseline:.1f} s"


def test_c4_without_the_hub_fails_fast_in_one_line(tmp_path):
    fails_fast_in_one_line(
        tmp_path,
        ["data.source=c4"],
        {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "", "HF_DATASETS_OFFLINE": ""},
        "data.source",
        "json.gz",
    )


def test_hub_tokenizer_offline_fails_fast_in_one_line(tmp_path):
    fails_fast_in_one_line(
        tmp_path,
        ["data.tokenizer=gpt-neox-20b", "model.vocab_size=50304"],
        {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
        "data.tokenizer",
        "local copy",
    )


def test_workers_keep_torchs_signal_handling_where_sigwaitinfo_is_missing(monkeypatch):
    """macOS has no sigwaitinfo: the worker hook must then change nothing (and not fail the worker)."""
    monkeypatch.delattr(signal, "sigwaitinfo")
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    _outlive_stop_signals(0)
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == blocked and signal.SIGTERM not in blocked
