"""Data: sources -> tokenizer -> packing -> batches.

Sources (``data.source``) and tokenizers (``data.tokenizer``) come from the registries plugins fill; the
built-ins live in `plugins/data.py` and `plugins/tokenizers.py`. A spec is a registered name (``stdlib``,
``c4``, ``bytes``, ``gpt-neox-20b``), ``NAME:ARGUMENT`` (``hf:allenai/c4:en``), or a path, glob or hub name
with a slash, which goes to the source ``files`` or the tokenizer ``hf``. As a recipe is resolved, a local
path among them is made absolute (`absolute_spec`), so a run's recipe.json names the same files from any
working directory.

The contract the trainer relies on:
  build_tokenizer(recipe) -> Tokenizer  (.name, .vocab_size, .eos_id, .encode(str) -> list[int], .decode(ids) -> str)
  build_batches(recipe, tokenizer, split="train", rank=0, world_size=1) -> Batches
  Batches: iterator of micro-batches, dicts of int64 tensors (train.micro_batch_size, train.seq_len):
      tokens, targets, positions, document_ids
    .state_dict() -> JSON-serialisable position just after the last micro-batch yielded
    .load_state_dict(state)
    .epoch -> int  (added) how many times the source had run out before the next window
  build_source(recipe, split) -> Source  (added) the documents alone, in order
  hub_reachable, HFSource, hf_source, no_argument  (added) for source and tokenizer plugins
  absolute_spec, absolute_local_paths  (added) for `minsota.recipe`

Packing. Each document's tokens and then EOS are appended to one stream; empty (or whitespace-only)
documents are skipped and counted. Window g is stream[g·T : g·T + T + 1] with T = train.seq_len: consecutive
windows share one token, so every token is a target exactly once and none is dropped. A long document runs on
into the next window, and a finite source that runs out starts its next epoch in the same stream. tokens and
targets are a window's first and last T tokens. document_ids number the documents inside a window from 0 (a
document carried over from the previous window is 0; an EOS belongs to the document it ends). positions:
  causal    0..T-1 in every window: plain causal attention across documents (the seed's behaviour)
  document  restart at 0 at every document start and at the window start, so they stay below T
document_ids are produced in both modes; the trainer gives them to the model only for "document".

Order and sharding. The window order depends only on the source, the tokenizer and T. Optimizer step s uses
windows [s·B, (s+1)·B) (B = train.batch_size), dealt in micro-batches of M windows: micro-batch q goes to
rank q mod world_size. Every world size sees the same global batch, and the ranks' union is the
single-process stream.

Shuffled order. ``data.shuffle = true`` puts the training documents in an order seeded by train.seed, new each
epoch (`epoch_order`), so seeds differ in data order as well as initialisation: on the fly each epoch's blocks
of ``data.block_docs`` documents are permuted (a block keeps its documents' order), a prepared split permutes
its documents. Packing, sharding and resuming work as above on the permuted stream; validation keeps the
source's order. It needs a finite source (one pass reads the epoch's block positions): the hub sources
refuse it; prepare them first.

Loading. Tokenizing runs off the training thread in ``data.num_workers`` DataLoader workers (0: in process;
unset: `default_workers`) that prefetch. Documents come in blocks of ``data.block_docs``; worker w of W tokenizes blocks w, w+W, … and
the DataLoader's round-robin hands them back in order, so the worker count changes speed, never data. Each
worker reads the whole document stream and skips the other workers' blocks: reading is cheap next to
tokenizing. The main process packs, which is only tensor slicing, and pins each micro-batch when training on
CUDA. Packing needs every document's length, so every rank tokenizes the whole stream and keeps its own
micro-batches. Tokenizing work therefore grows with world size: `minsota.prepared` tokenizes once, ahead of
training, and a rank then reads only its own windows (a source whose object has ``batches`` deals them).

Resume. The position is a global window counter plus the place of the next window's first token: the
epoch, the source's resumable state at the start of a block (shuffled: the block's index in the epoch's order),
and a token offset into that block. For every
built-in source that state is a ``datasets.IterableDataset.state_dict()``, with no shuffle buffer on the path.
Resuming re-reads and re-tokenizes one block.
"""

import contextlib
import copy
import logging
import multiprocessing
import os
import re
import signal
import threading
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from minsota.errors import UserError
from minsota.plugins import LoadedPlugins, load_plugins

log = logging.getLogger(__name__)


class Tokenizer(Protocol):
    name: str
    vocab_size: int  # every id encode() can return is below this
    eos_id: int  # appended after every document

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids) -> str: ...


class Source(Protocol):
    def blocks(self, size: int, state: dict | None = None) -> Iterator[tuple[list[str], dict]]:
        """One epoch of documents in a fixed order, as (texts, state) per block of ``size`` documents (the last
        may be shorter, and texts may be fewer when the source filters). It starts at the epoch's beginning
        (state None) or after the block whose yielded ``state`` is given. The state is JSON-serialisable."""


def no_argument(name: str, argument: str) -> None:
    """For factories that take no argument: ``NAME:ARGUMENT`` is refused, not silently ignored."""
    if argument:
        raise UserError(f"{name} takes no argument, got '{argument}'")


def is_empty(text: str | None) -> bool:
    """Documents with nothing but whitespace are skipped (and counted)."""
    return not text or text.isspace()


# ------------------------------------------------------------------------------------- the Hugging Face hub


@cache
def _hub_answers(timeout: float) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    answers = []

    def probe():
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
        except urllib.error.HTTPError:
            pass  # any HTTP status is an answer
        except (OSError, ValueError):
            return
        answers.append(True)

    # A thread, because name resolution ignores socket timeouts and can hang for longer than `timeout`.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answers)


def hub_reachable(for_datasets: bool = False, timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers: False at once when HF_HUB_OFFLINE (or, ``for_datasets``,
    HF_DATASETS_OFFLINE) is set, as the libraries read them; otherwise one request to HF_ENDPOINT, DNS
    included, given ``timeout`` seconds. The libraries' own retries take 24–47 s to give up."""
    switches = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if for_datasets else ("HF_HUB_OFFLINE",)
    if any(os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE") for name in switches):
        return False
    return _hub_answers(timeout)


# --------------------------------------------------------------------------- sources over `datasets`


class HFSource:
    """A Source over a streaming `datasets.IterableDataset` with a text column; it resumes through the dataset's
    own state_dict. ``holdout = (every, validation)`` keeps only the documents whose index i in the epoch has
    i % every == 0 (validation), or only the others."""

    def __init__(self, dataset, text_field: str = "text", holdout: tuple[int, bool] | None = None):
        self.dataset, self.text_field, self.holdout = dataset, text_field, holdout

    def blocks(self, size: int, state: dict | None = None):
        dataset = copy.deepcopy(self.dataset)  # a fresh position, never the one an earlier load_state_dict left
        seen, previous = 0, None
        if state is not None:
            dataset.load_state_dict(state["dataset"])
            seen = state["documents"]
        # .iter(), not iter(): inside a DataLoader worker iter() would read only that worker's shards. No .map()
        # on this path: it skips examples after load_state_dict (datasets #8145).
        for batch in dataset.iter(batch_size=size):
            position = dataset.state_dict()
            if position == previous:
                raise RuntimeError(
                    "datasets stopped advancing its state_dict after a resume (datasets #8308); upgrade datasets"
                )
            texts = batch[self.text_field]
            if self.holdout:
                every, validation = self.holdout
                texts = [text for i, text in enumerate(texts, seen) if (i % every == 0) == validation]
            seen += len(batch[self.text_field])
            previous = position
            yield texts, {"dataset": position, "documents": seen}


def hf_source(split: str, data_cfg, *args, text_field: str | None = None, **kwargs) -> HFSource:
    """Stream ``split`` of ``datasets.load_dataset(*args, **kwargs)`` as a Source, reading only the text column.
    A dataset without a validation split holds every ``data.holdout_every``-th training document out for it:
    a deterministic slice, the same in every epoch."""
    import datasets

    field = text_field or data_cfg.text_field
    try:
        splits = datasets.load_dataset(*args, streaming=True, **kwargs)
        held_out = "validation" not in splits
        name = "train" if held_out else split
        if name not in splits:
            raise UserError(f"it has no '{name}' split (only {', '.join(splits)})")
        # Extra columns (C4's timestamp/date, url) are never read: they cost parsing and break tensor formatting.
        dataset = splits[name].select_columns([field])
    except (OSError, ValueError) as e:
        raise UserError(str(e).strip().splitlines()[0]) from None
    return HFSource(dataset, field, (data_cfg.holdout_every, split == "validation") if held_out else None)


# -------------------------------------------------------------------------------------------- building


# data.KEY -> (registry kind, the factory a path, glob or hub name goes to)
SPECS = {"source": ("source", "files"), "tokenizer": ("tokenizer", "hf")}


def _route(key: str, spec: str, loaded: LoadedPlugins) -> tuple[str, str, bool]:
    """(registered name, argument, prefixed) of a data.source / data.tokenizer spec: a registered name,
    NAME:ARGUMENT (prefixed), or a path / glob / hub name for the fallback. An unknown name comes back as is,
    for the registry to refuse."""
    kind, fallback = SPECS[key]
    registry = loaded.registry(kind)
    if spec in registry:
        return spec, "", False
    prefix, colon, rest = spec.partition(":")
    if colon and prefix in registry:
        return prefix, rest, True
    if any(c in spec for c in "/\\*?") or Path(spec).expanduser().exists():
        return fallback, spec, False
    return spec, "", False


def _factory_for(key: str, spec: str, loaded: LoadedPlugins):
    """(factory, argument) of a data.source / data.tokenizer spec (see `_route`)."""
    name, argument, _ = _route(key, spec, loaded)
    try:
        return loaded.registry(SPECS[key][0]).get(name), argument
    except UserError as e:
        raise UserError(f"{e}; a local path, or hf:NAME for the Hugging Face hub, also works") from None


def absolute_spec(key: str, spec: str, loaded: LoadedPlugins) -> str:
    """``spec`` (of data.source or data.tokenizer) with its local path made absolute (``~`` expanded, glob
    characters kept), so a run's recipe.json names the same files from any working directory. A path or glob
    for the ``files`` source always is one; for ``hf`` (the tokenizer's bare path or hub name, or
    ``hf:NAME[:CONFIG]``) only one that exists, so hub names stay. Registered names and other plugins' arguments
    are left as they are."""
    name, argument, prefixed = _route(key, spec, loaded)
    if not argument or name not in {"source": ("files", "hf"), "tokenizer": ("hf",)}[key]:
        return spec
    path, colon, rest = argument.partition(":") if prefixed else (argument, "", "")  # hf:NAME:CONFIG
    if name == "hf" and not Path(path).expanduser().exists():
        return spec  # a hub name
    path = os.path.abspath(os.path.expanduser(path))
    return f"{name}:{path}{colon}{rest}" if prefixed else path


def absolute_local_paths(data_cfg, loaded: LoadedPlugins, keys=("source", "tokenizer")) -> None:
    """Make the local paths in ``data_cfg``'s ``keys`` (of data.source, data.tokenizer) absolute, in place
    (`absolute_spec`): `minsota.loader` calls it as a recipe is loaded."""
    for key in keys:
        setattr(data_cfg, key, absolute_spec(key, getattr(data_cfg, key), loaded))


def _build_from_spec(recipe, key: str, *args):
    """The source or tokenizer ``data.KEY`` names, built; an error names the recipe key."""
    spec = getattr(recipe.data, key)
    where = f"{recipe.where(f'data.{key}')}: data.{key} = '{spec}'"
    try:
        factory, argument = _factory_for(key, spec, load_plugins(recipe.plugins))
        return factory(argument, recipe.data, *args)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def build_tokenizer(recipe, check_model: bool = True) -> Tokenizer:
    """The recipe's tokenizer; refused when it has more tokens than the model's embedding rows (``check_model``)."""
    tokenizer = _build_from_spec(recipe, "tokenizer")
    if check_model and tokenizer.vocab_size > recipe.model.vocab_size:
        raise UserError(
            f"{recipe.where('model.vocab_size')}: tokenizer '{tokenizer.name}' has {tokenizer.vocab_size} "
            f"tokens but model.vocab_size = {recipe.model.vocab_size}"
        )
    return tokenizer


@contextlib.contextmanager
def _datasets_log_held(held: list):
    """Hold back what `datasets` logs (its own stderr handler), passing it on only if the block succeeds. Its
    loaders log the failing file before they raise: a failure is then reported in one line that names it."""
    import datasets  # noqa: F401  (configures its logger first, so restoring the handlers keeps its own)

    class Hold(logging.Handler):
        def emit(self, record):
            held.append(record)

    logger = logging.getLogger("datasets")
    handlers, propagate = logger.handlers, logger.propagate
    logger.handlers, logger.propagate = [Hold()], False
    try:
        yield
    finally:
        logger.handlers, logger.propagate = handlers, propagate
    for record in held:
        logger.handle(record)


def _failing_file(held: list) -> str | None:
    """The first existing file an error `datasets` logged names, if any."""
    for record in held:
        if record.levelno >= logging.ERROR:
            for name in re.findall(r"'([^']+)'", record.getMessage()):
                if os.path.isfile(name):
                    return name
    return None


def build_source(recipe, split: str = "train") -> Source:
    """The recipe's documents for ``split`` ("train" or "validation"), checked to hold at least one non-empty
    document, so a wrong path, column or split, an empty or unparsable file, or a text column that is not text
    fails here, in one line, and not in a worker process. Only the documents up to the first non-empty one are
    read: a bad row further on still fails in the DataLoader worker that reaches it."""
    from datasets.exceptions import DatasetGenerationError
    from pyarrow import ArrowException

    where = f"{recipe.where('data.source')}: data.source = '{recipe.data.source}'"
    held, kept, state = [], 0, None

    def failed(reason: str) -> UserError:
        file = _failing_file(held)
        return UserError(f"{reason} (in {file})" if file and file not in reason else reason)

    try:
        with _datasets_log_held(held):
            source = _build_from_spec(recipe, "source", split)
            if hasattr(source, "batches"):  # already tokens (minsota.prepared): it checks itself
                return source
            for texts, state in source.blocks(recipe.data.block_docs):  # noqa: B007 (read after the loop)
                odd = next((t for t in texts if t is not None and not isinstance(t, str)), None)
                if odd is not None:
                    raise UserError(
                        f"{where}: data.text_field = '{recipe.data.text_field}' holds "
                        f"{type(odd).__name__} values, not text: {odd!r:.60}"
                    )
                kept += len(texts)
                if not all(map(is_empty, texts)):
                    return source
    except UserError as e:
        raise failed(str(e)) from None
    except KeyError as e:
        raise UserError(
            f"{where}: documents have no field {e} (data.text_field = '{recipe.data.text_field}')"
        ) from None
    except StopIteration:  # datasets' json loader, inferring the columns from a first row it cannot find
        raise failed(f"{where}: no documents: every file is empty") from None
    # What reading bad files raises: pyarrow's parse errors, datasets' pandas/ujson fallback and undecodable text
    # (ValueError), a corrupt or truncated archive (OSError, EOFError). The cause stays for MINSOTA_DEBUG=1.
    except (ArrowException, DatasetGenerationError, ValueError, OSError, EOFError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise failed(f"{where}: cannot read the documents: {reason}") from e
    documents = state.get("documents", 0) if isinstance(source, HFSource) and state else 0
    if split == "train" and not kept and documents and source.holdout:
        every = source.holdout[0]
        held_out = "its only document is" if documents == 1 else f"all {documents} of its documents are"
        fix = (
            "set data.holdout_every to 2 or more"
            if every == 1
            else "give it several documents: a .jsonl with one per line, or a directory of files"
        )
        raise UserError(
            f"{where}: {held_out} held out for validation, none is left to train on "
            f"(data.holdout_every = {every} holds out documents 0, {every}, {2 * every}, …, the first "
            f"included; a .txt file is one document): {fix}"
        )
    raise UserError(f"{where}: no non-empty {split} documents")


def build_batches(recipe, tokenizer: Tokenizer, split: str = "train", rank: int = 0, world_size: int = 1) -> "Batches":
    """Micro-batches of ``split`` for ``rank`` of ``world_size``: its share of the one global order."""
    t = recipe.train
    if t.batch_size % (t.micro_batch_size * world_size):
        raise UserError(
            f"{recipe.where('train.batch_size')}: train.batch_size = {t.batch_size} is not a multiple of "
            f"train.micro_batch_size × world size = {t.micro_batch_size} × {world_size}"
        )
    source = build_source(recipe, split)
    if hasattr(source, "batches"):  # a source that is already tokens (minsota.prepared) deals its own windows
        return source.batches(recipe, tokenizer, split, rank, world_size)
    return Batches(recipe, tokenizer, source, split, rank, world_size)


# --------------------------------------------------------------------------------- tokenizing and packing


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of ``n`` units (blocks of documents, prepared documents) in ``epoch`` under data.shuffle: a
    permutation from numpy's PCG64 seeded by (seed, epoch), the same on every machine and new each epoch."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class TokenizedBlocks(IterableDataset):
    """From a position on, every block of the endless (epoch after epoch) document stream, tokenized and joined
    with EOS. Worker w of W yields blocks w, w+W, …, which the DataLoader's round-robin puts back in order.
    With ``order_seed`` (data.shuffle) each epoch's blocks come in `epoch_order`, and a position is
    ``{"block": k}``, the k-th block of that order."""

    def __init__(
        self,
        source: Source,
        tokenizer: Tokenizer,
        block_docs: int,
        epoch: int,
        state: dict | None,
        order_seed: int | None = None,
    ):
        self.source, self.tokenizer, self.block_docs = source, tokenizer, block_docs
        if state is not None and ("block" in state) != (order_seed is not None):
            state = None  # a position in the other order (--allow-change data.shuffle): the epoch starts afresh
        self.epoch, self.state, self.order_seed = epoch, state, order_seed
        self._starts = None  # shuffled: the source's state before each of its blocks

    def __iter__(self):
        info = get_worker_info()
        workers, me = (info.num_workers, info.id) if info else (1, 0)
        if info is not None:
            import fsspec.asyn

            fsspec.asyn.reset_lock()  # a lock inherited through fork hangs hub streaming (datasets does the same)
        epoch, state, n = self.epoch, self.state, 0
        while True:
            for before, texts in self._epoch(epoch, state):
                if n % workers == me:
                    yield {"epoch": epoch, "source": before, **self.tokenize(texts())}
                n += 1
            epoch, state = epoch + 1, None

    def _epoch(self, epoch: int, state: dict | None):
        """(the position before it, a function that reads its texts) for each block of ``epoch`` from ``state``.
        Shuffled, a block is read only when asked (other workers' blocks are skipped unread), by resuming the
        source at the state before it; those states come from one pass of reading, without tokenizing."""
        if self.order_seed is None:
            for texts, after in self.source.blocks(self.block_docs, state):
                yield state, lambda texts=texts: texts
                state = after
            return
        if self._starts is None:
            self._starts = [None] + [after for _, after in self.source.blocks(self.block_docs)][:-1]
        order = epoch_order(self.order_seed, epoch, len(self._starts))
        for k in range(state["block"] if state else 0, len(order)):
            start = self._starts[order[k]]
            yield {"block": k}, lambda start=start: next(self.source.blocks(self.block_docs, start))[0]

    def tokenize(self, texts: list[str]) -> dict:
        """tokens (N,), starts (N,) true at each document's first token, and the number of empty documents."""
        ids, starts, empty = [], [], 0
        for text in texts:
            if is_empty(text):
                empty += 1
                continue
            starts.append(len(ids))
            ids += self.tokenizer.encode(text)
            ids.append(self.tokenizer.eos_id)
        first = torch.zeros(len(ids), dtype=torch.bool)
        first[starts] = True
        return {"tokens": torch.tensor(ids, dtype=torch.int64), "starts": first, "empty": empty}


def _outlive_stop_signals(worker_id: int) -> None:
    """A DataLoader worker ignores SIGINT/SIGTERM from anyone but the process that started it.

    Ctrl-C, Slurm's scancel and container stops signal every process, workers included. Dying at once (torch's
    default) would fail the trainer's current step, and torch's SIGCHLD handler would raise anywhere in it,
    checkpointing included. So a worker serves on; the trainer finishes its step and closes the loader
    (`Batches.close`), which ends the workers normally, and a worker whose trainer dies ends by torch's
    watchdog. The DataLoader's own SIGTERM (`terminate()` at shutdown or interpreter exit) still ends it: the
    sender's pid, which a handler cannot see, is read with sigwaitinfo on a thread of its own.
    """
    if not hasattr(signal, "sigwaitinfo"):  # macOS: no sigwaitinfo; workers keep torch's default (die with it)
        return
    starter = multiprocessing.parent_process()
    starter_pid = starter.pid if starter else os.getppid()
    stops = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)  # before any other thread exists: all inherit the mask

    def wait():
        while True:
            received = signal.sigwaitinfo(stops)
            if received.si_pid == starter_pid:
                os._exit(0)  # a requested end: 0, or torch's SIGCHLD handler in the starter reports a failure

    threading.Thread(target=wait, name="minsota-stop-signals", daemon=True).start()


def shuffle_seed(recipe, split: str) -> int | None:
    """The seed of the training documents' order (data.shuffle: train.seed), None for the source's own order;
    the validation split always keeps its own, so every run is evaluated on the same windows."""
    return recipe.train.seed if recipe.data.shuffle and split == "train" else None


def default_workers(cuda: bool) -> int:
    """data.num_workers left unset: 1 on CPU, where the cores also train; on CUDA this rank's share of the cores
    less one for the trainer, up to 8: one worker tokenizes ~0.34M tokens/s (gpt-neox, one core of the 2-core
    CPU machine), and on the fly every rank tokenizes the whole stream (`minsota prepare` removes that work)."""
    if not cuda:
        return 1
    share = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, share - 1))


class Batches:
    """This rank's micro-batches of the global window order (see the module docstring), resumable exactly."""

    def __init__(
        self, recipe, tokenizer: Tokenizer, source: Source, split: str = "train", rank: int = 0, world_size: int = 1
    ):
        self.source, self.tokenizer, self.split = source, tokenizer, split
        self.seq_len, self.micro = recipe.train.seq_len, recipe.train.micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.document_positions = recipe.data.packing == "document"
        self.pin_memory = torch.cuda.is_available() and recipe.train.device != "cpu"
        workers = recipe.data.num_workers
        self.num_workers = default_workers(self.pin_memory) if workers is None else workers
        self.block_docs = recipe.data.block_docs
        self.order_seed = shuffle_seed(recipe, split)
        self.load_state_dict({"windows": 0, "epoch": 0, "source": None, "offset": 0, "empty_documents": 0})

    def state_dict(self) -> dict:
        """windows: global windows consumed; epoch, source and offset: where the next window starts;
        empty_documents: skipped so far. Every rank holds the same state, and one saved at a step boundary
        resumes at any world size."""
        return copy.deepcopy(self._position)

    def load_state_dict(self, state: dict) -> None:
        self._position = copy.deepcopy(state)
        self.close()  # the next micro-batch restarts the workers from this position

    def close(self) -> None:
        """End the workers now (dropping the DataLoader iterator shuts them down); the position is kept."""
        self._loader = None

    @property
    def epoch(self) -> int:
        return self._position["epoch"]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._loader is None:
            self._start()
        rows = []
        for j in range(self.micro * self.world_size):  # one round: every rank's next micro-batch; keep ours
            window = self._take()
            if j // self.micro == self.rank:
                rows.append(window)
        self._drop_consumed()
        first = self._blocks[0]
        self._position = {
            "windows": self._position["windows"] + self.micro * self.world_size,
            "epoch": first["epoch"],
            "source": first["source"],
            "offset": self._offset,
            "empty_documents": self._empty,
        }
        windows, starts = (torch.stack(x) for x in zip(*rows))
        return self._micro_batch(windows, starts)

    def _start(self):
        p = self._position
        blocks = TokenizedBlocks(self.source, self.tokenizer, self.block_docs, p["epoch"], p["source"], self.order_seed)
        # its own generator: starting an iterator draws a worker seed, which from the global RNG would shift
        # what training draws next (dropout) on every (re)start, so a resumed run would no longer repeat
        self._loader = iter(
            DataLoader(
                blocks,
                batch_size=None,
                num_workers=self.num_workers,
                worker_init_fn=_outlive_stop_signals,
                generator=torch.Generator(),
            )
        )
        self._blocks = deque()  # blocks not yet fully consumed: epoch, source state at their start, length, empty
        self._tokens = torch.empty(0, dtype=torch.int64)  # their tokens, concatenated
        self._starts = torch.empty(0, dtype=torch.bool)
        self._offset, self._empty, self._announced = p["offset"], p["empty_documents"], p["epoch"]

    def _pull(self):
        block = next(self._loader)
        if block["epoch"] > self._announced:
            self._announced = block["epoch"]
            log.info("%s data ran out: epoch %d begins", self.split, block["epoch"])
        self._blocks.append(
            {
                "epoch": block["epoch"],
                "source": block["source"],
                "length": len(block["tokens"]),
                "empty": block["empty"],
            }
        )
        self._tokens = torch.cat([self._tokens, block["tokens"]])
        self._starts = torch.cat([self._starts, block["starts"]])

    def _take(self):
        """The next window's T + 1 tokens and document-start flags."""
        end = self._offset + self.seq_len + 1
        while len(self._tokens) < end:
            self._pull()
        window = self._tokens[self._offset : end], self._starts[self._offset : end]
        self._offset += self.seq_len
        return window

    def _drop_consumed(self):
        # The first block stays until a later one exists: it anchors the resumable position.
        while len(self._blocks) > 1 and self._offset >= self._blocks[0]["length"]:
            block = self._blocks.popleft()
            self._tokens, self._starts = self._tokens[block["length"] :], self._starts[block["length"] :]
            self._offset -= block["length"]
            self._empty += block["empty"]

    def _micro_batch(self, windows: torch.Tensor, starts: torch.Tensor) -> dict:
        starts = starts[:, :-1]  # (M, T)
        document_ids = starts.cumsum(1)
        document_ids = document_ids - document_ids[:, :1]
        index = torch.arange(self.seq_len).expand_as(starts)
        if self.document_positions:
            positions = index - torch.where(starts, index, 0).cummax(1).values  # distance from the segment start
        else:
            positions = index.clone()
        batch = {
            "tokens": windows[:, :-1].contiguous(),
            "targets": windows[:, 1:].contiguous(),
            "positions": positions,
            "document_ids": document_ids,
        }
        return {k: v.pin_memory() for k, v in batch.items()} if self.pin_memory else batch
