"""Checkpoints: atomic, verifiable, and loadable without unpickling anything.

Layout of a run directory (what `minsota train` writes and `--resume` reads):

    RUN_DIR/recipe.json                 the resolved recipe (`loader.recipe_record`); --resume rebuilds from it
    RUN_DIR/.lock                       held (flock) by the one trainer writing the run; says its pid and host
    RUN_DIR/metrics.jsonl               one JSON object per optimizer step and per evaluation, appended
    RUN_DIR/checkpoints/step-N/         N = optimizer steps completed
        model.safetensors               weights by module path (`layers.0.attention.wqkv.weight`), as trained
                                        (fp32); tensors sharing storage (tied embeddings) are stored once and
                                        listed in the metadata entry "aliases" ({alias: stored name})
        optimizer.safetensors           the optimizer's tensor state, "{parameter path}/{key}" (AdamW: exp_avg,
                                        exp_avg_sq, step); its other state and param groups are in trainer.json
        rng.safetensors                 torch RNG states: "cpu", "cuda:I"
        trainer.json                    step, data position, Python/NumPy RNG, loss-scaler and skipped-step counts
        recipe.json                     the resolved recipe this checkpoint was trained with
        manifest.json                   {"format": 1, "step": N, "files": {name: {"bytes", "sha256"}}}, written last

Only model.safetensors, recipe.json and manifest.json are required: a weights-only checkpoint (an imported
model, say) resumes as a fresh run from those weights. A checkpoint is written into a hidden temporary
directory, every file fsynced, the manifest last, then renamed into place (rename is atomic on POSIX), so a
kill at any instant leaves the new checkpoint whole or absent. A checkpoint whose manifest is missing, or
whose files differ from it in size or sha256, is never loaded. Nothing here unpickles: tensors are
safetensors, everything else JSON. Resuming from a named older checkpoint moves the later ones into
``checkpoints/abandoned-after-step-N/`` (`set_aside_after`): no longer resumable, never deleted.
The run directory's lock and the choice of the checkpoint a resume continues from are `minsota.rundir`'s.

`save_weights` / `load_weights` read and write one weights file in that format for other tools
(`minsota.hf` import/export).
"""

import functools
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from minsota.errors import DivergedError, SaveError, UserError

FORMAT = 1
MODEL, OPTIMIZER, RNG, TRAINER, RECIPE, MANIFEST = (
    "model.safetensors",
    "optimizer.safetensors",
    "rng.safetensors",
    "trainer.json",
    "recipe.json",
    "manifest.json",
)
LOCK = ".lock"
STEP_DIR = re.compile(r"step-(\d+)")
OLD_DIR = re.compile(r"\.old-step-(\d+)-\d+")  # a checkpoint being replaced by a redone step's save


class CorruptCheckpoint(UserError):
    """A checkpoint that does not match its manifest; the message names the file."""


# ---------------------------------------------------------------------------------------------- files


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
    _fsync(path)


def write_json(path: Path, obj) -> None:
    """Write JSON durably and atomically (temporary file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    _write_json(tmp, obj)
    os.replace(tmp, path)


def save_weights(path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    """Write a state dict as safetensors (fsynced); a tensor that appears under several names (tied
    weights) is stored once, the other names recorded in the metadata entry "aliases"."""
    tensors, aliases, seen, storages = {}, {}, {}, set()
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu()
        storage = tensor.untyped_storage().data_ptr()
        key = (storage, tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        # safetensors refuses two tensors over one storage: another view of a stored one gets its own copy
        tensors[name] = tensor.clone() if storage in storages else tensor.contiguous()
        storages.add(storage)
    save_file(tensors, str(path), metadata={"format": "pt", "aliases": json.dumps(aliases)})
    _fsync(path)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read a weights file written by `save_weights` (aliases restored as the same tensor)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    tensors = load_file(str(path))
    return {**tensors, **{alias: tensors[name] for alias, name in aliases.items()}}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


@functools.lru_cache(maxsize=64)
def _sha256_as_of(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file as it was at this size and mtime: finding a checkpoint to resume and then loading it
    verify it twice, and a 7B run's checkpoint is ~90 GB to hash."""
    return _sha256(Path(path))


# ----------------------------------------------------------------------------------------------- save


def _non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return name
    return None


def save(
    directory: Path,
    step: int,
    *,
    model: dict,
    recipe: dict,
    optimizer: dict | None = None,
    rng: dict | None = None,
    trainer: dict | None = None,
    keep: int | None = None,
) -> Path:
    """Write ``directory/step-{step}`` atomically and return it; then keep only the newest ``keep`` up to it.

    ``model``, ``optimizer`` and ``rng`` map names to tensors, ``trainer`` and ``recipe`` are JSON objects.
    Raises `DivergedError` (nothing written) if a tensor is non-finite, `SaveError` on an I/O error (disk
    full, ...) after removing the temporary directory and putting back the step-{step} a redone step was
    replacing; earlier checkpoints are untouched either way.
    """
    tensors = {MODEL: model, OPTIMIZER: optimizer, RNG: rng}
    for file, contents in tensors.items():
        bad = contents and _non_finite(contents)
        if bad:
            raise DivergedError(f"step {step}: refusing to checkpoint a non-finite tensor ({file}: {bad})")
    final = directory / f"step-{step}"
    tmp = directory / f".tmp-step-{step}-{os.getpid()}"
    old = directory / f".old-step-{step}-{os.getpid()}"
    moved = placed = False  # how far the swap of a redone step got, for the error path to undo
    try:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for file, contents in tensors.items():
            if contents is not None:
                save_weights(tmp / file, contents)
        for file, obj in ((TRAINER, trainer), (RECIPE, recipe)):
            if obj is not None:
                _write_json(tmp / file, obj)
        files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
        _write_json(tmp / MANIFEST, {"format": FORMAT, "step": step, "files": files})
        _fsync(tmp)
        if final.exists():  # a step re-done after resuming from an earlier checkpoint replaces its old self
            shutil.rmtree(old, ignore_errors=True)  # a stale one of a dead process with this pid: step-N exists
            final.rename(old)
            moved = True
        tmp.rename(final)
        placed = True
        _fsync(directory)
    except (OSError, SafetensorError) as e:  # safetensors reports a failed write as its own error
        reason = e.strerror if isinstance(e, OSError) and e.strerror else e
        kept = "earlier checkpoints are intact"
        if moved:  # the checkpoint this save was replacing goes back in place
            try:
                if placed:  # the new one got there, but the rename may not be durable
                    final.rename(tmp)
                old.rename(final)
            except OSError:  # the next start restores it (remove_temporary)
                kept = f"the previous {final.name} is kept as {old}"
        shutil.rmtree(tmp, ignore_errors=True)
        raise SaveError(f"could not write checkpoint {final}: {reason} ({kept})") from None
    shutil.rmtree(old, ignore_errors=True)
    if keep:
        for path in [p for p in checkpoints(directory) if _step(p) <= step][:-keep]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def remove_temporary(directory: Path) -> None:
    """Remove what interrupted saves left behind (hidden .tmp-*/.old-* directories); a replaced checkpoint
    (.old-step-N-PID) whose step-N is missing, because the save replacing it never finished, is put back."""
    for path in sorted(directory.glob(".old-step-*")):
        match = OLD_DIR.fullmatch(path.name)
        final = directory / f"step-{match.group(1)}" if match else None
        if final and path.is_dir() and not final.exists():
            path.rename(final)
            print(
                f"minsota: warning: restored {final} from {path.name}, left by a save that did not finish",
                file=sys.stderr,
            )
    for path in directory.glob(".*-step-*"):
        shutil.rmtree(path, ignore_errors=True)


def set_aside_after(directory: Path, step: int) -> Path | None:
    """Move the checkpoints after ``step`` (the branch a resume from ``step-{step}`` abandons) into
    ``directory/abandoned-after-step-{step}[-K]/``, which no listing, resume or pruning looks into, so that a
    later plain resume cannot continue that branch; nothing is deleted. Returns the folder, None if none."""
    later = [path for path in checkpoints(directory) if _step(path) > step]
    if not later:
        return None
    target, k = directory / f"abandoned-after-step-{step}", 1
    while target.exists():
        k += 1
        target = directory / f"abandoned-after-step-{step}-{k}"
    try:
        target.mkdir()
        for path in reversed(later):  # newest first
            path.rename(target / path.name)
        _fsync(directory)
    except OSError as e:
        raise SaveError(
            f"could not move the checkpoints after step {step} aside to {target}: {e.strerror or e}"
        ) from None
    print(
        f"minsota: resuming from step-{step}: moved the later checkpoints {', '.join(p.name for p in later)} "
        f"of the abandoned branch to {target} (nothing deleted)",
        file=sys.stderr,
    )
    return target


# ----------------------------------------------------------------------------------------------- load


def _step(path: Path) -> int:
    return int(STEP_DIR.fullmatch(path.name).group(1))


def checkpoints(directory: Path) -> list[Path]:
    """The ``step-N`` directories under ``directory``, oldest first (verified only when loaded)."""
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if STEP_DIR.fullmatch(p.name) and p.is_dir()), key=_step)


def verify(path: Path, unread=()) -> dict:
    """The manifest of checkpoint ``path``; raises `CorruptCheckpoint` naming the first file that disagrees.
    Every file it lists must be there at its size; all but those in ``unread`` must also match their sha256
    and parse. A process that never reads a file (the ranks but 0 of a resume never read the weights and
    optimizer state, ~12 bytes per parameter: `load`) leaves hashing it to the one that does."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpoint(f"{path / MANIFEST}: missing or unreadable manifest ({e})") from None
    if manifest.get("step") != _step(path):
        raise CorruptCheckpoint(
            f"{path / MANIFEST}: says step {manifest.get('step')!r}, the directory step {_step(path)}"
        )
    for required in (MODEL, RECIPE):
        if required not in files:
            raise CorruptCheckpoint(f"{path / MANIFEST}: does not list {required}")
    for name, expected in files.items():
        file = path / name
        try:
            stat = file.stat()
        except OSError:
            raise CorruptCheckpoint(f"{file}: missing") from None
        if stat.st_size != expected["bytes"]:
            raise CorruptCheckpoint(f"{file}: {stat.st_size} bytes, manifest says {expected['bytes']} (truncated?)")
        if name in unread:
            continue
        if _sha256_as_of(str(file), stat.st_size, stat.st_mtime_ns) != expected["sha256"]:
            raise CorruptCheckpoint(f"{file}: sha256 differs from the manifest (corrupted)")
        _check_readable(file)
    return manifest


def _check_readable(file: Path) -> None:
    """A file that matches the manifest can still be one no reader takes (a faulty writer hashed what it wrote):
    parse JSON files, and a safetensors file's header and its size, without reading the tensors."""
    from safetensors import safe_open

    try:
        if file.suffix == ".json":
            json.loads(file.read_text(encoding="utf-8"))
        elif file.suffix == ".safetensors":
            with safe_open(str(file), "pt") as f:
                f.metadata()
    except (SafetensorError, ValueError, OSError) as e:  # ValueError: bad JSON or not UTF-8
        reason = " ".join(str(e).split())[:200]
        raise CorruptCheckpoint(f"{file}: matches the manifest but cannot be read ({reason})") from None


def does_not_fit(path: Path, error: Exception) -> UserError:
    """A checkpoint's weights refused by the model built from the recipe: the error names the first mismatch
    (torch's message starts with a line that only introduces them)."""
    reason = " ".join(line.strip() for line in str(error).strip().splitlines()[:2])
    return UserError(f"{path}: does not fit this model: {reason}")


def unread_by(weights_only: bool = False, tensors_of_the_model: bool = True) -> tuple[str, ...]:
    """The files `load` leaves unread (and `verify` unhashed) with these arguments."""
    unread = (OPTIMIZER, RNG, TRAINER) if weights_only else ()
    return unread if tensors_of_the_model else (*unread, MODEL, OPTIMIZER)


def load(path: Path, weights_only: bool = False, tensors_of_the_model: bool = True) -> dict:
    """A verified checkpoint's parts: step, model, recipe; optimizer, rng, trainer (None when absent, and with
    ``weights_only``: inference and export need no AdamW state, which is twice the model's size). Without
    ``tensors_of_the_model`` model and optimizer stay None: the ranks but 0 of a resume, which receive them
    from rank 0 (`minsota.train_state.restore`), never hold the whole ~12 bytes per parameter in memory. Only
    the files read are hashed (`verify`)."""
    unread = unread_by(weights_only, tensors_of_the_model)
    files = [name for name in verify(path, unread)["files"] if name not in unread]  # verified: read

    def tensors(name):
        try:
            return load_weights(path / name) if name in files else None
        except SafetensorError as e:  # past the header `verify` reads: the tensors themselves
            raise CorruptCheckpoint(f"{path / name}: matches the manifest but cannot be read ({e})") from None

    def obj(name):
        return json.loads((path / name).read_text()) if name in files else None

    return {
        "path": path,
        "step": _step(path),
        "model": tensors(MODEL),
        "optimizer": tensors(OPTIMIZER),
        "rng": tensors(RNG),
        "trainer": obj(TRAINER),
        "recipe": obj(RECIPE),
    }
