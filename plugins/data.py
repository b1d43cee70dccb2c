"""Built-in data sources: `stdlib` (offline, the default of `quickstart`), `c4`, `hf:NAME[:CONFIG]`, local `files`
(which include directories `minsota prepare` wrote: `minsota.prepared`).

Every one is streamed through `datasets` (`minsota.data.hf_source`), so it resumes through
`IterableDataset.state_dict()`. The hub sources probe the hub first and, when it cannot be reached, fail at once
in one line that says how to use a local copy.
"""

import functools
import glob
import random
import sysconfig
from pathlib import Path

from minsota import hookimpl
from minsota.data import hf_source, hub_reachable, no_argument
from minsota.errors import UserError
from minsota.prepared import PreparedSource, is_prepared

# datasets' builder for each file type; compressed files (.gz, .zst, ...) are read by the same builder.
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
COMPRESSIONS = {".gz", ".bz2", ".xz", ".zst", ".lz4"}
STDLIB_SKIP = {"site-packages", "test", "tests", "idle_test"}  # installed packages, and tests full of odd data


def _builder(path: str) -> str | None:
    suffixes = Path(path).suffixes
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return BUILDERS.get(suffixes[-1]) if suffixes else None


def _text_files(paths: list[str], data_cfg, split: str):
    return hf_source(split, data_cfg, "text", data_files=paths, sample_by="document", text_field="text")


def files(spec: str, data_cfg, split: str):
    """Local files: a path, a glob or a directory of *.txt (a document each), *.jsonl, *.json(.gz) or *.parquet;
    or a directory `minsota prepare` wrote"""
    path = Path(spec).expanduser()
    if is_prepared(path):
        return PreparedSource(path, split)
    if path.is_dir():
        found = sorted(str(p) for p in path.rglob("*") if p.is_file() and _builder(str(p)))
    else:
        found = sorted(glob.glob(str(path), recursive=True))
    if not found and path.is_dir():
        raise UserError(
            f"directory '{spec}' holds no file of a supported type ({', '.join(f'*{s}' for s in BUILDERS)}, "
            f"optionally {'/'.join(sorted(COMPRESSIONS))}-compressed)"
        )
    if not found:
        raise UserError(f"no files match '{spec}' (for a Hugging Face hub dataset write hf:NAME)")
    kinds = {_builder(f) for f in found}
    if len(kinds) != 1 or None in kinds:
        raise UserError(
            f"expected files of one type ({', '.join(BUILDERS)}, optionally compressed), got "
            f"{', '.join(sorted({''.join(Path(f).suffixes) or Path(f).name for f in found}))}"
        )
    builder = kinds.pop()
    if builder == "text":
        return _text_files(found, data_cfg, split)  # one document per file, not per line
    return hf_source(split, data_cfg, builder, data_files=found)


def stdlib(arg: str, data_cfg, split: str):
    """The Python standard library's own modules, code and docstrings (~12 MB on CPython 3.11): real text, offline"""
    no_argument("stdlib", arg)
    return _text_files(list(_stdlib_modules()), data_cfg, split)


@functools.cache
def _stdlib_modules() -> tuple[str, ...]:
    """The modules' paths in a fixed order that mixes packages, so a short run sees many of them; walked once per
    process (0.3-0.5 s here, for each split of each run a process trains: a `compare`, the tests)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    modules = sorted(str(p) for p in root.rglob("*.py") if not STDLIB_SKIP & set(p.relative_to(root).parts))
    random.Random(0).shuffle(modules)
    return tuple(modules)


def _require_hub(what: str, local_hint: str, data_cfg):
    if data_cfg.shuffle:  # a seeded order needs one pass over the epoch: not of an endless stream
        raise UserError(
            f"data.shuffle = true needs a finite local source, and {what} streams from the Hugging Face hub: "
            "`minsota prepare` it (--max-tokens N) and train from that directory"
        )
    if not hub_reachable(for_datasets=True):
        raise UserError(
            f"the Hugging Face hub is unreachable (or HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set), "
            f"so {what} cannot be streamed: {local_hint}"
        )


def c4(arg: str, data_cfg, split: str):
    """C4 (allenai/c4, en: 365M web documents) streamed from the Hugging Face hub; eval uses its validation split"""
    no_argument("c4", arg)
    _require_hub(
        "C4",
        "point data.source at local copies of its json.gz files, e.g. "
        "--set data.source='PATH/c4/en/c4-train.*.json.gz'",
        data_cfg,
    )
    return hf_source(split, data_cfg, "allenai/c4", "en", text_field="text")


def hf(spec: str, data_cfg, split: str):
    """Any Hugging Face dataset, hf:NAME[:CONFIG], streamed from the hub or a local dataset directory"""
    name, _, config = spec.partition(":")
    if not name:
        raise UserError("hf: needs a dataset, e.g. hf:HuggingFaceFW/fineweb-edu:sample-10BT")
    if not Path(name).expanduser().is_dir():
        _require_hub(f"'{name}'", "point data.source at a local copy of its files (a path or glob)", data_cfg)
    return hf_source(split, data_cfg, name, config or None)


@hookimpl
def minsota_register_data_sources():
    return {"stdlib": stdlib, "c4": c4, "hf": hf, "files": files}
