"""TOML recipes: named, inheritable (`extends`), overridable (`--set table.key=value`), validated up front.

A recipe has a top-level ``description``, optional ``extends`` (a recipe name, or a path relative to the
file) and ``plugins`` (files or modules to load), and the tables ``[model]``, ``[train]`` and ``[data]``
whose keys and types are the dataclasses below (their comments are the reference). Validation runs
before anything is built and each error is one line naming the file and the key. Overrides are
type-checked against the schema, as nanoGPT's configurator checks them against the defaults.

This module is the schema only: it never loads plugins or data. The registries a recipe is validated
against are handed to it; `minsota.loader` composes plugin loading, the ``extends`` chain and data paths.
"""

import dataclasses
import inspect
import json
import math
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

from minsota.errors import UserError, did_you_mean
from minsota.registry import Registry

Component = str | dict  # a registry name, or an inline table {name = "...", option = ...}


@dataclass
class ModelConfig:
    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    n_kv_heads: int | None = None  # grouped-query attention; default n_heads (MHA), 1 = MQA
    head_dim: int | None = None  # default dim // n_heads
    ffn_dim: int | None = None  # feed-forward hidden width; default per feed-forward (8/3·dim SwiGLU, 4·dim MLP)
    ffn_multiple_of: int = 256  # derived widths round up to this
    max_seq_len: int = 2048  # longest sequence the positional encoding must serve (learned positions)
    norm: Component = "rmsnorm"
    positional: Component = "rope"
    attention: Component = "sdpa"
    feedforward: Component = "swiglu"
    block: Component = "prenorm"
    tie_embeddings: bool = False
    final_norm: bool = True  # norm before the LM head; false for post-norm blocks, which end on a norm already
    init_std: float = 0.02  # normal(0, init_std); residual output projections (wo, w2) / sqrt(2·n_layers)
    z_loss: float = 0.0  # PaLM's auxiliary log(Z)^2 loss coefficient (1e-4 in PaLM)
    logit_softcap: float = 0.0  # final-logit soft-capping cap·tanh(logits/cap) (Gemma 2); 0 = off
    embed_scale: float = 1.0  # token embeddings are multiplied by it (Gemma: sqrt(dim)); the LM head is not
    # Layers that differ (see `resolve_layers`): a layer's components are the ones above, then its type's table,
    # then its override; each key given replaces that component whole.
    layer_pattern: list[str] = field(default_factory=list)  # layer type names, cycled over n_layers; [] = all alike
    layer_types: dict = field(default_factory=dict)  # type name -> {component key: component}; {} is a valid type
    layer_overrides: dict = field(default_factory=dict)  # "index" (negative from the end) -> {component key: ...}

    def ffn_width(self, ratio: float) -> int:
        """``ffn_dim`` if set, else ratio·dim rounded up to ``ffn_multiple_of``."""
        if self.ffn_dim:
            return self.ffn_dim
        return self.ffn_multiple_of * math.ceil(ratio * self.dim / self.ffn_multiple_of)


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps
    batch_size: int = 8  # global batch: sequences per optimizer step over all ranks and micro-steps
    micro_batch_size: int | None = None  # sequences one device runs at once; default batch_size
    seq_len: int = 256
    lr: float = 3e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # the schedule decays to min_lr_ratio·lr
    warmup_steps: int | float = 0.03  # steps, or a fraction of `steps` when < 1
    warmup_shape: str = "linear"  # linear | cosine | none
    schedule: Component = (
        "cosine"  # cosine | wsd | constant | linear | inverse-sqrt | a plugin's (`minsota list schedules`)
    )
    decay_fraction: float = 0.2  # wsd: the final fraction of steps that decays
    optimizer: Component = "adamw"  # adamw | muon | lion | schedulefree-adamw | a plugin's; options inline
    # [[train.param_groups]]: {params = ["glob", ...], lr_scale = x, weight_decay = y}; the first match wins
    param_groups: list[dict] = field(default_factory=list)
    weight_decay: float = 0.1  # applied to matrices only, never to norms, gains or biases
    decay_embeddings: bool = False
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    compile: bool = False
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    log_every: int = 10  # progress-bar refresh (metrics.jsonl gets every step)
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 4
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 3
    max_bad_steps: int = 0  # non-finite steps skipped before giving up (exit 3)
    sample_tokens: int = 64  # generated at the end so a user sees what the model learned; 0 = off
    parallelism: str = "none"  # none | ddp | fsdp (under torchrun)
    activation_checkpointing: str = "none"  # none | full | selective: recompute in backward (minsota.recompute)
    trackers: list[str] = field(default_factory=list)  # also log to "tensorboard" (RUN_DIR/tensorboard), "wandb"
    check_memory: bool = True  # refuse a run whose estimated memory (minsota.memory) exceeds the device's
    # Downstream tasks of lm-evaluation-harness (pip install -e ".[eval]"), e.g. ["hellaswag", "arc_easy"]: each
    # task's main metric goes to metrics.jsonl (tasks/TASK/METRIC) and the trackers; minsota.harness
    eval_tasks: list[str] = field(default_factory=list)
    eval_tasks_every: int = 0  # steps between task evaluations; 0: only at the end
    eval_tasks_limit: int = 0  # examples per task (the harness's --limit); 0: all
    eval_tasks_path: str = ""  # a directory of task YAML files (the harness's --include-path): tasks on local files

    def warmup_count(self) -> int:
        """Warmup in optimizer steps (``warmup_steps`` may be a fraction of ``steps``)."""
        if self.warmup_shape == "none":
            return 0
        return self.warmup_steps if isinstance(self.warmup_steps, int) else round(self.warmup_steps * self.steps)


@dataclass
class DataConfig:
    source: str = "stdlib"  # a registered source, hf:NAME[:CONFIG], or a local path/glob
    tokenizer: str = "bytes"  # a registered tokenizer, an HF name, or a local directory / tokenizer.json
    packing: str = "causal"  # causal | document (attention and positions restart per document)
    text_field: str = "text"  # the column holding each document's text (json, parquet, hub datasets)
    num_workers: int | None = None  # DataLoader processes tokenizing ahead; 0 = in the trainer; default 1, on CUDA more
    holdout_every: int = 100  # sources without a validation split: documents 0, N, 2N, … are held out for it
    block_docs: int = 32  # documents per unit of tokenizing work handed to a worker (a resume re-reads one)
    shuffle: bool = False  # train documents in an order seeded by train.seed, new each epoch (local sources only)


SECTIONS = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig}
TOP_LEVEL = {"description": str, "extends": str, "plugins": list}
COMPONENT_KEYS = ("norm", "positional", "attention", "feedforward", "block")
LAYER_TABLES = ("layer_types", "layer_overrides")  # merged one level deep through `extends` (a type or index whole)
TRAIN_PLUGIN_KEYS = {"optimizer": "optimizer", "schedule": "schedule"}  # train key -> registry kind
GROUP_RULE_KEYS = {"params": list, "lr_scale": float, "weight_decay": float}


@dataclass
class Recipe:
    name: str
    source: str  # where it came from (a path, or "recipe.json" of a run)
    description: str
    model: ModelConfig
    train: TrainConfig
    data: DataConfig
    plugins: list[str] = field(default_factory=list)  # local plugin specs, resolved to absolute paths
    origins: dict[str, str] = field(default_factory=dict, repr=False)  # dotted key -> file that set it

    def where(self, key: str) -> str:
        """The file (or ``--set``) that set a dotted key: a ``--set`` inside it, else it, else the table above it."""
        inner = [origin for k, origin in self.origins.items() if k.startswith(key + ".") and origin.startswith("--set")]
        if inner:
            return inner[-1]
        while key not in self.origins and "." in key:
            key = key.rsplit(".", 1)[0]
        return self.origins.get(key, self.source)

    def to_dict(self) -> dict:
        """The resolved recipe as plain data (`minsota.loader.recipe_record` adds the plugins' versions)."""
        return {
            "name": self.name,
            "description": self.description,
            "plugins": list(self.plugins),
            **{section: dataclasses.asdict(getattr(self, section)) for section in SECTIONS},
            "layers": layer_specs(self.model),  # derived from [model]: what each layer was built from
        }

    def get(self, dotted: str):
        section, key = dotted.split(".", 1)
        return getattr(getattr(self, section), key)


def component(spec: Component) -> tuple[str, dict]:
    """(name, options) of a component spec."""
    if isinstance(spec, str):
        return spec, {}
    options = dict(spec)
    return options.pop("name"), options


class LayerComponent(typing.NamedTuple):
    spec: Component
    key: str  # the dotted recipe key it came from, for error messages ("model.layer_types.local.attention")


def resolve_layers(m: ModelConfig) -> list[dict[str, LayerComponent]]:
    """Each layer's components: [model]'s, then its type's table (``layer_pattern`` cycled), then its
    ``layer_overrides`` entry (by index; negative counts from the end). A key given replaces the component
    whole, as an inline table does. Assumes a validated recipe (`_validate_layers`)."""
    overrides = {int(index) % m.n_layers: index for index in m.layer_overrides}  # layer -> its key ("-1")
    layers = []
    for i in range(m.n_layers):
        layer = {kind: LayerComponent(getattr(m, kind), f"model.{kind}") for kind in COMPONENT_KEYS}
        tables = []
        if m.layer_pattern:
            type_name = m.layer_pattern[i % len(m.layer_pattern)]
            tables.append((f"model.layer_types.{type_name}", m.layer_types[type_name]))
        if i in overrides:
            tables.append((f"model.layer_overrides.{overrides[i]}", m.layer_overrides[overrides[i]]))
        for prefix, table in tables:
            layer.update({kind: LayerComponent(spec, f"{prefix}.{kind}") for kind, spec in table.items()})
        layers.append(layer)
    return layers


def canonical(spec: Component) -> str:
    """One text per component whatever its spelling ("sdpa" and {name = "sdpa"} alike): for comparing specs."""
    name, options = component(spec)
    return json.dumps([name, options], sort_keys=True)


def layer_specs(m: ModelConfig) -> list[dict[str, Component]]:
    """The resolved component specs of every layer (as `recipe.json` stores them)."""
    return [{kind: c.spec for kind, c in layer.items()} for layer in resolve_layers(m)]


# ---------------------------------------------------------------------------------------------- reading


def _read_toml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"{path}: cannot read recipe: {e.strerror or e}") from None
    except UnicodeDecodeError as e:  # TOML is UTF-8 by definition
        raise UserError(
            f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); TOML recipes must be UTF-8"
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:  # its message carries "(at line L, column C)"
        raise UserError(f"{path}: invalid TOML: {e}") from None


def describe_recipe_file(path) -> str:
    """The ``description`` of a recipe file ('' if it has none or cannot be read)."""
    try:
        return str(tomllib.loads(Path(str(path)).read_text(encoding="utf-8")).get("description", ""))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return ""


def find_recipe(name_or_path: str, recipes: Registry) -> Path:
    """A recipe path from a name in the ``recipes`` registry (a file stem) or a path to a TOML file."""
    candidate = Path(name_or_path)
    if candidate.is_dir() and name_or_path not in recipes:
        raise UserError(f"{name_or_path}: is a directory, not a recipe file (give a .toml file or a recipe name)")
    if name_or_path.endswith(".toml") or candidate.is_file():
        if not candidate.is_file():
            raise UserError(f"{name_or_path}: no such recipe file")
        return candidate
    # recipes.get words an unknown name's error: the kind, the name, close matches, how to list them
    return Path(str(recipes.get(name_or_path)))


def read_chain(path: Path, recipes: Registry, seen: tuple[Path, ...] = ()) -> tuple[dict, dict]:
    """The merged raw recipe following `extends`, and each dotted key's origin file."""
    resolved = path.resolve()
    if resolved in seen:
        chain = " -> ".join(str(p) for p in (*seen, resolved))
        raise UserError(f"{path}: extends forms a cycle: {chain}")
    raw = _read_toml(path)
    for key in raw:
        if key not in SECTIONS and key not in TOP_LEVEL:
            raise UserError(f"{path}: unknown key '{key}'{_did_you_mean(key, [*SECTIONS, *TOP_LEVEL])}")
    merged: dict[str, Any] = {section: {} for section in SECTIONS}
    origins: dict[str, str] = {}
    parent = raw.get("extends")
    if parent is not None:
        if not isinstance(parent, str):
            raise UserError(f"{path}: extends must be a recipe name or path, got {parent!r}")
        if parent.endswith(".toml"):
            parent_path = path.parent / parent
            if not parent_path.is_file():
                raise UserError(f"{path}: extends = '{parent}': no such file {parent_path}")
        else:
            try:
                parent_path = find_recipe(parent, recipes)
            except UserError as e:
                raise UserError(f"{path}: extends = '{parent}': {e}") from None
        merged, origins = read_chain(parent_path, recipes, (*seen, resolved))
    for key in ("description", "plugins"):
        if key in raw:
            if key == "plugins":
                if not (isinstance(raw[key], list) and all(isinstance(p, str) for p in raw[key])):
                    raise UserError(f"{path}: plugins must be a list of file paths or module names")
                # paths are relative to the recipe that names them
                merged[key] = [*merged.get(key, []), *(_plugin_spec(p, path) for p in raw[key])]
            else:
                merged[key] = raw[key]
            origins[key] = str(path)
    for section in SECTIONS:
        table = raw.get(section, {})
        if not isinstance(table, dict):
            raise UserError(f"{path}: '{section}' must be a table ([{section}])")
        for key, value in table.items():
            origins[f"{section}.{key}"] = str(path)
            if section == "model" and key in LAYER_TABLES and isinstance(value, dict):
                # a layer type (or override) is a unit: the child's replaces the parent's of that name whole
                parent_tables = merged[section].get(key)
                merged[section][key] = {**(parent_tables if isinstance(parent_tables, dict) else {}), **value}
                origins.update({f"model.{key}.{name}": str(path) for name in value})
            else:
                merged[section][key] = value  # component inline tables replace, never merge, the parent's
    return merged, origins


def _plugin_spec(spec: str, recipe_path: Path) -> str:
    local = recipe_path.parent / spec
    return str(local.resolve()) if (spec.endswith(".py") or local.exists()) else spec


def _did_you_mean(name: str, choices) -> str:
    hint = did_you_mean(name, choices)
    return f" ({hint})" if hint else ""


# -------------------------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[str, Any]:
    """``table.key=value`` -> (dotted key, value): a TOML value, or the bare text when it is not TOML."""
    if "=" not in text:
        raise UserError(f"--set {text}: expected table.key=value")
    key, value = text.split("=", 1)
    key = key.strip()
    try:
        return key, tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return key, value


# ------------------------------------------------------------------------------------------- validation


def _type_ok(value, hint) -> bool:
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list or hint is list:
        return isinstance(value, list)
    return isinstance(value, hint)


def _type_name(hint) -> str:
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint) if a is not type(None))
    return {dict: "inline table"}.get(hint, getattr(hint, "__name__", str(hint)))


def _coerce(section: str, key: str, value, hints: dict, where: str, raw_text: bool):
    hint = hints[key]
    if raw_text and hint is str and not isinstance(value, str):
        value = str(value)  # `--set data.source=2024` means the string a shell user typed
    if not _type_ok(value, hint):
        raise UserError(f"{where}: {section}.{key} must be {_type_name(hint)}, got {value!r}")
    if hint is float:
        value = float(value)
    if isinstance(value, float) and not math.isfinite(value):  # TOML has nan and inf literals
        raise UserError(f"{where}: {section}.{key} must be a finite number, got {value}")
    plugin_keys = COMPONENT_KEYS if section == "model" else TRAIN_PLUGIN_KEYS if section == "train" else ()
    if key in plugin_keys and isinstance(value, dict):
        if not isinstance(value.get("name"), str):
            raise UserError(f"{where}: {section}.{key} inline table needs a string 'name'")
        for option, v in value.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise UserError(f"{where}: {section}.{key}.{option} must be a finite number, got {v}")
    return value


def _build_section(section: str, values: dict, recipe_origins: dict, default_where: str, override_keys: set):
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        dotted = f"{section}.{key}"
        where = recipe_origins.get(dotted, default_where)
        if key not in fields:
            raise UserError(f"{where}: unknown key {dotted}{_did_you_mean(key, fields)}")
        kwargs[key] = _coerce(section, key, value, hints, where, dotted in override_keys)
    missing = [
        name
        for name, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and name not in kwargs
    ]
    if missing:
        raise UserError(f"{default_where}: missing key {section}.{missing[0]}")
    return cls(**kwargs)


_POSITIVE = {
    "model": (
        "dim",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "head_dim",
        "vocab_size",
        "ffn_dim",
        "ffn_multiple_of",
        "max_seq_len",
    ),
    "train": (
        "steps",
        "batch_size",
        "micro_batch_size",
        "seq_len",
        "lr",
        "keep_checkpoints",
        "log_every",
        "eval_batches",
    ),
    "data": ("holdout_every", "block_docs"),
}
_NON_NEGATIVE = {
    "model": ("init_std", "z_loss", "logit_softcap"),
    "train": (
        "warmup_steps",
        "weight_decay",
        "grad_clip",
        "eval_every",
        "checkpoint_every",
        "max_bad_steps",
        "sample_tokens",
        "min_lr_ratio",
        "decay_fraction",
        "eps",
        "seed",
        "eval_tasks_every",
        "eval_tasks_limit",
    ),
    "data": ("num_workers",),
}
_CHOICES = {
    "train.warmup_shape": ("linear", "cosine", "none"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.parallelism": ("none", "ddp", "fsdp"),
    "train.activation_checkpointing": ("none", "full", "selective"),
    "data.packing": ("causal", "document"),
}


def _validate(recipe: Recipe, registries: Mapping[str, Registry]) -> None:
    for section, keys in _POSITIVE.items():
        for key in keys:
            value = getattr(getattr(recipe, section), key)
            if value is not None and value <= 0:
                raise UserError(f"{recipe.where(f'{section}.{key}')}: {section}.{key} must be positive, got {value}")
    for section, keys in _NON_NEGATIVE.items():
        for key in keys:
            value = getattr(getattr(recipe, section), key)
            if value is not None and value < 0:
                raise UserError(f"{recipe.where(f'{section}.{key}')}: {section}.{key} must be >= 0, got {value}")
    for dotted, choices in _CHOICES.items():
        value = recipe.get(dotted)
        if value not in choices:
            raise UserError(f"{recipe.where(dotted)}: {dotted} must be one of {', '.join(choices)}, got {value!r}")
    m, t = recipe.model, recipe.train
    if m.head_dim is None and m.dim % m.n_heads:
        raise UserError(
            f"{recipe.where('model.n_heads')}: model.n_heads = {m.n_heads} does not divide model.dim = {m.dim}"
        )
    if m.n_heads % m.n_kv_heads:
        raise UserError(
            f"{recipe.where('model.n_kv_heads')}: model.n_kv_heads = {m.n_kv_heads} does not divide "
            f"model.n_heads = {m.n_heads}"
        )
    if component(m.positional)[0] == "learned" and t.seq_len > m.max_seq_len:
        raise UserError(
            f"{recipe.where('train.seq_len')}: train.seq_len = {t.seq_len} is longer than the learned "
            f"position table (model.max_seq_len = {m.max_seq_len})"
        )
    if isinstance(t.warmup_steps, float) and t.warmup_steps >= 1:
        raise UserError(
            f"{recipe.where('train.warmup_steps')}: train.warmup_steps as a fraction must be < 1, "
            f"got {t.warmup_steps} (use an integer for a step count)"
        )
    for tracker in t.trackers:
        if tracker not in ("tensorboard", "wandb"):
            raise UserError(
                f"{recipe.where('train.trackers')}: train.trackers: unknown tracker {tracker!r} (tensorboard, wandb)"
            )
    for key in ("min_lr_ratio", "decay_fraction"):
        if getattr(t, key) > 1:
            raise UserError(f"{recipe.where(f'train.{key}')}: train.{key} must be <= 1, got {getattr(t, key)}")
    if t.batch_size % t.micro_batch_size:
        raise UserError(
            f"{recipe.where('train.micro_batch_size')}: train.micro_batch_size = {t.micro_batch_size} "
            f"does not divide train.batch_size = {t.batch_size}"
        )
    for key in COMPONENT_KEYS:
        _check_component(recipe, registries, key, getattr(m, key), f"model.{key}")
    _validate_layers(recipe, registries)
    _validate_train_plugins(recipe, registries)


def _check_component(recipe: Recipe, registries: Mapping[str, Registry], kind: str, spec, dotted: str) -> None:
    """A component spec names a registered component of its kind (an inline table: with a string name)."""
    if not (isinstance(spec, str) or (isinstance(spec, dict) and isinstance(spec.get("name"), str))):
        raise UserError(
            f"{recipe.where(dotted)}: {dotted} must be a component name or an inline table with a "
            f"string 'name', got {spec!r}"
        )
    try:
        registries[kind].describe(component(spec)[0])
    except UserError as e:
        raise UserError(f"{recipe.where(dotted)}: {dotted}: {e}") from None


def _validate_layers(recipe: Recipe, registries: Mapping[str, Registry]) -> None:
    """``layer_pattern``, ``layer_types`` and ``layer_overrides`` name defined types, layers that exist and
    registered components only."""
    m = recipe.model
    if not all(isinstance(name, str) for name in m.layer_pattern):
        raise UserError(
            f"{recipe.where('model.layer_pattern')}: model.layer_pattern must be a list of layer type names"
        )
    if m.layer_pattern and not m.layer_types:
        raise UserError(
            f"{recipe.where('model.layer_pattern')}: model.layer_pattern needs its types defined as "
            f"tables ([model.layer_types.NAME]; an empty table is a valid type)"
        )
    for name in m.layer_pattern:
        if name not in m.layer_types:
            raise UserError(
                f"{recipe.where('model.layer_pattern')}: model.layer_pattern: type '{name}' is not defined "
                f"in model.layer_types{_did_you_mean(name, m.layer_types)}"
            )
    seen = {}
    for index in m.layer_overrides:
        dotted = f"model.layer_overrides.{index}"
        try:
            layer = int(index)
        except ValueError:
            raise UserError(f"{recipe.where(dotted)}: {dotted}: a layer index must be an integer") from None
        if not -m.n_layers <= layer < m.n_layers:
            raise UserError(
                f"{recipe.where(dotted)}: {dotted}: layer {layer} is out of range for model.n_layers = {m.n_layers}"
            )
        if layer % m.n_layers in seen:
            raise UserError(
                f"{recipe.where(dotted)}: {dotted} names the same layer as "
                f"model.layer_overrides.{seen[layer % m.n_layers]}"
            )
        seen[layer % m.n_layers] = index
    for key in LAYER_TABLES:
        for name, table in getattr(m, key).items():
            prefix = f"model.{key}.{name}"
            if not isinstance(table, dict):
                raise UserError(f"{recipe.where(prefix)}: {prefix} must be a table of components, got {table!r}")
            for kind, spec in table.items():
                if kind not in COMPONENT_KEYS:
                    raise UserError(
                        f"{recipe.where(f'{prefix}.{kind}')}: unknown key {prefix}.{kind} (a layer table "
                        f"holds {', '.join(COMPONENT_KEYS)}){_did_you_mean(kind, COMPONENT_KEYS)}"
                    )
                _check_component(recipe, registries, kind, spec, f"{prefix}.{kind}")


def param_group(role: str, lr: float, lr_scale: float, weight_decay: float) -> dict:
    """An empty parameter group of ``role``, as optimizer factories receive it (the optimizers hookspec):
    `minsota.optim.param_groups` fills it with a model's tensors, `stand_in_groups` with small stand-ins."""
    return {
        "params": [],
        "names": [],
        "splits": [],
        "role": role,
        "lr": lr,
        "lr_scale": lr_scale,
        "weight_decay": weight_decay,
    }


STAND_IN_SHAPES = {"matrix": (16, 8), "embedding": (32, 8), "head": (32, 8), "vector": (8,)}


def stand_in_groups(t: TrainConfig) -> list[dict]:
    """One group per role, each holding one small tensor of its role's shape with a gradient. The recipe's
    validation builds ``train.optimizer`` on them, so that a bad option value is refused at recipe time naming
    the key, before any model exists; `minsota.memory` steps one to measure the optimizer's state."""
    import torch  # here: `import minsota.cli` stays free of torch (its error handling imports it)

    generator = torch.Generator().manual_seed(0)
    groups = []
    for role, shape in STAND_IN_SHAPES.items():
        tensor = torch.nn.Parameter(torch.randn(shape, generator=generator))
        tensor.grad = torch.randn(shape, generator=generator)
        group = param_group(role, t.lr, 1.0, t.weight_decay if role in ("matrix", "head") else 0.0)
        group["params"].append(tensor)
        group["names"].append(f"stand_in.{role}")
        group["splits"].append(None)
        groups.append(group)
    return groups


def _validate_train_plugins(recipe: Recipe, registries: Mapping[str, Registry]) -> None:
    """train.optimizer and train.schedule name registered plugins with options their factories take, and build
    (a schedule as it is, an optimizer on `stand_in_groups`), so option values are checked too; each
    [[train.param_groups]] rule is well formed."""
    t = recipe.train
    for key, kind in TRAIN_PLUGIN_KEYS.items():
        where, (name, options) = recipe.where(f"train.{key}"), component(getattr(t, key))
        try:
            factory = registries[kind].get(name)
            inspect.signature(factory).bind(*([[]] if kind == "optimizer" else []), t, **options)
            # built, so the factory checks its options' values: an optimizer on stand-in tensors (no model yet)
            factory(*([stand_in_groups(t)] if kind == "optimizer" else []), t, **options)
        except UserError as e:
            raise UserError(f"{where}: train.{key}: {e}") from None
        except (TypeError, ValueError) as e:
            raise UserError(f"{where}: train.{key}: {name}: {e}") from None
    for i, rule in enumerate(t.param_groups):
        where = recipe.where("train.param_groups")
        if (
            not isinstance(rule, dict)
            or not isinstance(rule.get("params"), list)
            or not rule["params"]
            or not all(isinstance(g, str) for g in rule["params"])
        ):
            raise UserError(f'{where}: train.param_groups[{i}] needs params = ["glob", ...]')
        for key, value in rule.items():
            if key not in GROUP_RULE_KEYS:
                raise UserError(
                    f"{where}: train.param_groups[{i}]: unknown key {key!r}{_did_you_mean(key, GROUP_RULE_KEYS)}"
                )
            if key != "params" and not (_type_ok(value, float) and value >= 0):
                raise UserError(f"{where}: train.param_groups[{i}].{key} must be a number >= 0, got {value!r}")


def build_recipe(
    merged: dict, origins: dict, name: str, source: str, override_keys: set, registries: Mapping[str, Registry]
) -> Recipe:
    """The validated `Recipe` of a merged raw recipe (`read_chain`, `apply_overrides`); ``registries`` (kind ->
    `Registry`) are the components it may name."""
    sections = {s: _build_section(s, merged.get(s, {}), origins, source, override_keys) for s in SECTIONS}
    model: ModelConfig = sections["model"]
    if model.n_kv_heads is None:
        model.n_kv_heads = model.n_heads
    if model.head_dim is None and model.n_heads > 0 and model.dim % model.n_heads == 0:
        model.head_dim = model.dim // model.n_heads
    if sections["train"].micro_batch_size is None:
        sections["train"].micro_batch_size = sections["train"].batch_size
    recipe = Recipe(
        name,
        source,
        str(merged.get("description", "")),
        sections["model"],
        sections["train"],
        sections["data"],
        list(merged.get("plugins", [])),
        origins,
    )
    _validate(recipe, registries)
    return recipe


def _set_nested(table: dict, dotted: str, value) -> None:
    """Set ``a.b.c`` inside nested tables, copying each table it changes (a parent's stays as read). A component
    given by name becomes its inline table on the way (``model.attention.window`` on attention = "sdpa")."""
    head, _, rest = dotted.partition(".")
    if not rest:
        table[head] = value
        return
    inner = table.get(head, {})
    if isinstance(inner, str):
        inner = {"name": inner}
    if not isinstance(inner, dict):
        raise ValueError(f"'{head}' is {inner!r}, not a table")
    table[head] = inner = dict(inner)
    _set_nested(inner, rest, value)


def apply_overrides(merged: dict, origins: dict, overrides: dict | None) -> set:
    keys = set()
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if section not in SECTIONS or not key:
            raise UserError(
                f"--set {dotted}: expected one of {', '.join(f'{s}.KEY' for s in SECTIONS)}"
                f"{_did_you_mean(section, SECTIONS)}"
            )
        try:
            _set_nested(merged.setdefault(section, {}), key, value)
        except ValueError as e:
            raise UserError(f"--set {dotted}: {e}") from None
        origins[dotted] = f"--set {dotted}"
        keys.add(dotted)
    return keys
