"""The run directory: who may write it, what a resume finds there and may change, the metrics file, trackers.

Layout and checkpoint format: `minsota.checkpoint`. Here: one trainer at a time per run directory (`lock_run`
holds RUN_DIR/.lock exclusively for the whole run, so a double launch or a requeued job whose predecessor still
runs is refused instead of interleaving), taken by the process that writes (rank 0); reading a run to resume
(its ``recipe.json``, newest valid checkpoint: `find_resumable`, the keys a resume may not change: `GUARDED`),
preparing it to be written, ``metrics.jsonl`` and the trackers that mirror it (TensorBoard, W&B).
"""

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import sys
from pathlib import Path

from minsota import checkpoint
from minsota.errors import UserError, did_you_mean
from minsota.loader import read_recipe_json, recipe_record
from minsota.recipe import SECTIONS, Recipe

# Keys a resumed run may not change unnoticed: they change what the weights mean or what the saved data
# position points at. `--allow-change KEY` (or a whole table, `--allow-change model`) accepts a change.
GUARDED = (
    "model",
    "data.source",
    "data.tokenizer",
    "data.text_field",
    "data.holdout_every",
    "data.shuffle",
    "train.seed",  # with data.shuffle it orders the documents the saved position counts through
    "train.batch_size",
    "train.seq_len",
    "train.optimizer",
    "train.param_groups",
)


_held_locks: set[int] = set()  # lock file descriptors of this process


def _drop_inherited_locks() -> None:
    """In a forked child (a data worker): close the inherited lock descriptors, so that the lock ends with the
    trainer (a kill -9 included) rather than with the last worker to notice its parent is gone."""
    for fd in _held_locks:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_locks.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


@contextlib.contextmanager
def lock_run(run_dir: Path, create: bool = False):
    """Hold ``run_dir/.lock`` exclusively (flock, never waiting) for the body: one trainer per run directory.

    Another holder is refused with a `UserError` naming the directory and the holder's pid and host. With
    ``create`` (a new run), a missing ``run_dir`` is made first (a path that cannot be one is a `UserError`), and
    removed again if the body leaves nothing in it but the lock file (a run refused before it wrote anything).
    The lock file stays; the kernel releases the lock when the holder exits, however it exits.
    """
    run_dir = Path(run_dir)
    made = []  # directories this call created, deepest first
    if create and not run_dir.is_dir():
        made = [run_dir, *(p for p in run_dir.parents if not p.exists())]
        try:
            run_dir.mkdir(parents=True)
        except FileExistsError:
            if not run_dir.is_dir():
                raise UserError(f"{run_dir}: exists and is not a directory; choose another --out") from None
            made = []  # another process made it meanwhile
        except OSError as e:
            raise UserError(
                f"{run_dir}: cannot create the run directory ({e.strerror or e}); choose another --out"
            ) from None
    path, fd = run_dir / checkpoint.LOCK, None
    try:
        while fd is None:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UserError(f"{path}: cannot open the run directory's lock file ({e.strerror or e})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                fd = None
                then = "choose another --out" if create else f"let it finish or stop it, then --resume {run_dir}"
                raise UserError(
                    f"{run_dir} is being written by another trainer ({holder}, holding {path}): {then}"
                ) from None
            except OSError as e:  # a file system without locks
                print(
                    f"minsota: warning: {path}: cannot lock ({e.strerror or e}); make sure no other trainer "
                    f"writes {run_dir}",
                    file=sys.stderr,
                )
                break
            try:  # the file locked must still be the one at the path (a refused new run removes it)
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                fd = None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        _held_locks.add(fd)
        yield path
    finally:
        if fd is not None:
            _held_locks.discard(fd)
            with contextlib.suppress(OSError):  # unlinked while still held: no one locks a stale file
                if made and os.listdir(run_dir) == [checkpoint.LOCK]:
                    path.unlink()
                    for directory in made:
                        directory.rmdir()
            os.close(fd)


@contextlib.contextmanager
def lock(run_dir: Path, create: bool):
    """Hold the run directory's lock (`lock_run`) in the process that writes it (rank 0; RANK is
    set by torchrun, the process group is joined later). A resume of what is no run directory takes none:
    `find_resumable` then says what it is not."""
    with contextlib.ExitStack() as stack:
        if int(os.environ.get("RANK", "0")) == 0 and (create or (run_dir / checkpoint.RECIPE).is_file()):
            stack.enter_context(lock_run(run_dir, create=create))
        yield


def refuse_existing(run_dir: Path) -> None:
    """A new run never writes into another run's directory."""
    if (run_dir / checkpoint.RECIPE).exists():
        raise UserError(f"{run_dir} holds a run already: continue it with --resume {run_dir}, or choose another --out")


def find_resumable(path: Path, unread=()) -> tuple[Path, Path | None]:
    """(run directory, checkpoint to resume from) for ``--resume PATH``.

    PATH is a run directory (its newest valid checkpoint; a corrupt one is skipped with a one-line warning;
    None if the run never checkpointed; `CorruptCheckpoint` if it has checkpoints but none verifies, rather than
    starting it over) or one named checkpoint ``RUN_DIR/checkpoints/step-N`` (refused with `CorruptCheckpoint`,
    exit 2, if it does not verify). Files in ``unread`` are not hashed (`checkpoint.verify`): a rank that
    never reads them picks the newest checkpoint whose other files verify, and follows rank 0 if that one
    turns out corrupt (`minsota.train_state.restore`).
    """
    path = Path(path)
    if checkpoint.STEP_DIR.fullmatch(path.name):
        checkpoint.verify(path, unread)
        return path.parent.parent, path
    if not (path / checkpoint.RECIPE).is_file():
        raise UserError(f"--resume {path}: not a run directory (no {checkpoint.RECIPE})")
    found = checkpoint.checkpoints(path / "checkpoints")
    for candidate in reversed(found):
        try:
            checkpoint.verify(candidate, unread)
            return path, candidate
        except checkpoint.CorruptCheckpoint as e:
            print(f"minsota: warning: skipping corrupt checkpoint: {e}", file=sys.stderr)
    if found:
        raise checkpoint.CorruptCheckpoint(
            f"{path}: every checkpoint is corrupt ({', '.join(p.name for p in found)}; see "
            f"above): restore one, or move them out of {path / 'checkpoints'} to start the run "
            f"again from step 0"
        )
    return path, None


def open_resumed(path: Path, overrides: dict | None, plugin_specs, allow_changes) -> tuple[Path, Recipe, dict | None]:
    """(run directory, its recipe with ``overrides``, the checkpoint to continue from or None) for ``--resume
    PATH``; a change of a `GUARDED` key is refused unless ``allow_changes`` names it."""
    reads = os.environ.get("RANK", "0") == "0"  # rank 0 alone reads the weights and optimizer state, and broadcasts
    run_dir, ckpt_path = find_resumable(path, checkpoint.unread_by(tensors_of_the_model=reads))
    recipe = read_recipe_json(run_dir / checkpoint.RECIPE, overrides, plugin_specs)
    if ckpt_path is None:
        print(f"minsota: warning: {run_dir} has no checkpoint yet; starting it again from step 0", file=sys.stderr)
        return run_dir, recipe, None
    ckpt = checkpoint.load(ckpt_path, tensors_of_the_model=reads)
    check_changes(ckpt["recipe"], recipe, ckpt_path, allow_changes)
    if ckpt["trainer"] and ckpt["recipe"]["train"].get("optimizer", "adamw") != recipe.to_dict()["train"]["optimizer"]:
        print("minsota: warning: train.optimizer changed (allowed): its state starts afresh", file=sys.stderr)
        ckpt = {**ckpt, "optimizer": {}, "trainer": {**ckpt["trainer"], "optimizer": None}}
    return run_dir, recipe, ckpt


def prepare(run_dir: Path, recipe: Recipe, abandon_after: int | None) -> None:
    """Ready the run directory to be written: what interrupted saves left is cleaned up; when resuming from a
    named checkpoint (``abandon_after``: its step), the later checkpoints, the branch this resume abandons,
    are set aside so that a plain resume cannot find them; the resolved recipe is (re)written."""
    checkpoint.remove_temporary(run_dir / "checkpoints")
    if abandon_after is not None:
        checkpoint.set_aside_after(run_dir / "checkpoints", abandon_after)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.write_json(run_dir / checkpoint.RECIPE, recipe_record(recipe))


def _defaults(cls) -> dict:
    """A recipe table's defaults, as JSON would hold them."""
    return {
        f.name: json.loads(json.dumps(f.default if f.default_factory is dataclasses.MISSING else f.default_factory()))
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    }


def check_changes(saved: dict, recipe: Recipe, where: Path, allowed) -> None:
    """Refuse a resume whose recipe changes a GUARDED key of the checkpoint's, unless allowed; report the rest."""
    now = json.loads(json.dumps(recipe.to_dict()))
    check_allowed(allowed, now)
    defaults = {section: _defaults(cls) for section, cls in SECTIONS.items()}

    def covered(key, prefixes):
        return any(key == p or key.startswith(p + ".") for p in prefixes)

    changed = []
    for section in ("model", "train", "data"):
        for key in sorted(set(saved[section]) | set(now[section])):
            # a key the saved recipe lacks had its default then (a run from before the key existed)
            old = saved[section].get(key, defaults[section].get(key))
            new, dotted = now[section].get(key), f"{section}.{key}"
            if old == new:
                continue
            if covered(dotted, GUARDED) and not covered(dotted, allowed):
                raise UserError(
                    f"{dotted} changed from {old!r} to {new!r} since {where}; resuming would "
                    f"continue a different run (pass --allow-change {dotted} to accept)"
                )
            changed.append(f"{dotted} {old!r} -> {new!r}")
    if changed:
        print(f"minsota: resuming with {', '.join(changed)}", file=sys.stderr)


def check_allowed(allowed, recipe: dict) -> None:
    """Refuse an --allow-change KEY that names no table or key of the recipe (a typo would allow nothing)."""
    keys = [*("model", "train", "data"), *(f"{s}.{k}" for s in ("model", "train", "data") for k in recipe[s])]
    for key in allowed:
        if key not in keys:
            hint = did_you_mean(key, keys)
            raise UserError(
                f"--allow-change {key}: no such recipe key (a table such as model, or a key such as "
                f"data.source){'; ' + hint if hint else ''}"
            )


def discard_unstarted(run_dir: Path) -> None:
    """Remove what a new run wrote before its first step (recipe.json, an empty metrics.jsonl, ...), so that
    neither a half-made run directory nor a refused `--out` is left behind by a Ctrl-C during start-up."""
    metrics = run_dir / "metrics.jsonl"
    if checkpoint.checkpoints(run_dir / "checkpoints") or (metrics.exists() and metrics.stat().st_size):
        return  # it has trained: never the case during start-up, but nothing trained is deleted
    for name in (checkpoint.RECIPE, "metrics.jsonl"):
        (run_dir / name).unlink(missing_ok=True)
    for name in ("checkpoints", "tensorboard", "wandb"):
        shutil.rmtree(run_dir / name, ignore_errors=True)


def _not_installed(name: str) -> UserError:
    return UserError(f"train.trackers asks for {name}, which is not installed (pip install {name})")


def check_trackers(recipe: Recipe) -> None:
    """Refuse a tracker whose package is not installed, before the run directory is written."""
    for name in recipe.train.trackers:
        try:
            missing = importlib.util.find_spec(name) is None  # each tracker is named after its package
        except (ImportError, ValueError):  # ValueError: imported already, without a spec
            missing = False
        if missing:
            raise _not_installed(name)


def open_trackers(recipe: Recipe, run_dir: Path, stack: contextlib.ExitStack) -> list:
    """A ``track(step, scalars)`` per tracker in ``train.trackers``, closed with ``stack``: TensorBoard event
    files in RUN_DIR/tensorboard; W&B project "minsota", one W&B run per run directory, continued on resume."""
    trackers = []
    for name in recipe.train.trackers:
        try:
            if name == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                writer = stack.enter_context(SummaryWriter(str(run_dir / "tensorboard")))

                def track(step, scalars, writer=writer):
                    for key, value in scalars.items():
                        writer.add_scalar(key, value, step)
            else:
                import wandb

                run_id = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
                run = wandb.init(
                    project="minsota",
                    name=run_dir.name,
                    id=run_id,
                    resume="allow",
                    dir=str(run_dir),
                    config=recipe_record(recipe),
                )
                stack.callback(run.finish)

                def track(step, scalars, run=run):
                    run.log(scalars, step=step)
        except ImportError:
            raise _not_installed(name) from None
        trackers.append(track)
    return trackers


def open_metrics(path: Path):
    """metrics.jsonl opened for appending; a record a kill cut short is dropped so every line parses."""
    if path.exists():
        with open(path, "r+b") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - 65536))
            tail = f.read()
            if tail and not tail.endswith(b"\n"):
                f.truncate(size - len(tail) + tail.rfind(b"\n") + 1)
    return open(path, "a")
