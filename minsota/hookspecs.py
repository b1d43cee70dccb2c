"""The hook specifications: one `minsota_register_<kind>` hook per component kind.

Every hook takes no arguments and returns a mapping ``name -> factory``. The factory's docstring
(first line) is the summary that `minsota list` shows. Hooks are called once, when the registries are
built; nothing here is ever consulted from `forward`.

Names must be unique within a kind across all plugins; a clash is an error naming both providers. A
plugin that means to replace a name wraps the factory in `minsota.override(factory)`.

``cfg`` below is the resolved `minsota.recipe.ModelConfig`: it has at least ``dim``, ``n_layers``,
``n_heads``, ``n_kv_heads``, ``head_dim``, ``vocab_size``, ``ffn_dim`` (resolved), ``max_seq_len``.
``**options`` are the keys of the recipe's inline table for that component (everything but ``name``);
a factory rejects options it does not know by raising TypeError or ValueError, which minsota reports as
one line naming the recipe key and component.

A built module whose class carries a ``reference`` (a plain-tensor restatement; see `minsota.reference`)
is checked against it by the parity suite, with no test to write. The builder records what the recipe asked
for on every module it builds (``module.spec``: name, ``cfg``, options as written); a reference restates the
math from those options, never from values the module computed.
"""

import pluggy

hookspec = pluggy.HookspecMarker("minsota")
hookimpl = pluggy.HookimplMarker("minsota")


@hookspec
def minsota_register_norms():
    """Norms. ``factory(dim, cfg, **options) -> nn.Module`` mapping (..., dim) -> (..., dim)."""


@hookspec
def minsota_register_positional_encodings():
    """Positional encodings. ``factory(cfg, **options) -> minsota.components.PositionalEncoding``.

    The module is built once per decoder and shared by every attention layer. It may override
    ``embed(x, positions)`` (added to token embeddings: learned/absolute), ``rotate(q, k, positions)``
    (q: (B, H, T, hd), k: (B, KV, T, hd); rotary) and ``bias(positions, n_heads)`` (an additive
    (B|1, H, T, T) score bias, e.g. ALiBi). ``positions`` is (B, T) int64: the position of each token
    in its document (or window).
    """


@hookspec
def minsota_register_attentions():
    """Attention kernels. ``factory(cfg, positional, *, norm, **options) -> nn.Module``.

    ``norm(dim)`` returns a fresh norm of the recipe's kind over ``dim`` features (for QK-norm; a kernel
    without one ignores it). ``forward(x, positions, document_ids) -> y`` with x, y: (B, T, cfg.dim),
    positions (B, T) and document_ids (B, T) or None (None: plain causal attention over the window).
    Output projection named ``wo`` receives the residual-scaled init. A module whose weight fuses several
    logical matrices declares them in ``param_splits = {"wqkv.weight": [rows_q, rows_k, rows_v]}`` (its own
    parameter names -> row counts along dim 0): matrix optimizers such as Muon then orthogonalise each part
    alone (`minsota.components.Attention` declares q, k, v). A kernel that cannot honour an option
    or the positional encoding it is given raises ValueError from the factory, so the recipe is refused
    before training. Cached decoding (`minsota generate`) sets a ``kv_cache`` attribute (a
    `minsota.components.KVCache`) on kernels that declare one (see `minsota.generation`); a kernel without it
    still generates, recomputing the prefix. Subclassing `minsota.components.Attention` gives a kernel the
    shared projections (fused ``wqkv``, ``wo``), QK-norm, the positional encoding and the cache: it then
    supplies only ``attend(q, k, v, positions, document_ids)``.
    """


@hookspec
def minsota_register_feedforwards():
    """Feed-forward networks. ``factory(cfg, **options) -> nn.Module`` mapping (B, T, cfg.dim) -> (B, T, cfg.dim).

    The output projection named ``w2`` receives the residual-scaled init. Fused weights declare their
    logical matrices in ``param_splits`` as for attention (the gated feed-forwards: ``{"w13.weight":
    [hidden, hidden]}``, gate and up).
    """


@hookspec
def minsota_register_blocks():
    """Block topologies. ``factory(cfg, *, norm, attention, feedforward, **options) -> nn.Module``.

    ``norm()`` returns a fresh norm over cfg.dim (the block decides how many it needs; ``norm(dim)`` over
    another width); ``attention`` and ``feedforward`` are built modules. ``forward(state) -> state`` where
    state is the `TensorDict` described in `minsota.state`: the block reads ``hidden``, ``positions`` and
    (if present) ``document_ids``, and writes ``hidden`` once. It never changes the key set.
    """


@hookspec
def minsota_register_recipes():
    """Recipes. ``name -> path`` of a TOML file (a `pathlib.Path` or an `importlib.resources` Traversable).

    The recipe's top-level ``description`` is its one-line summary in `minsota recipes`.
    """


@hookspec
def minsota_register_data_sources():
    """Data sources. ``factory(argument, data_cfg, split) -> minsota.data.Source``.

    ``data.source`` names one: ``NAME`` calls it with argument ``""``, ``NAME:ARGUMENT`` with the text after the
    first colon (``hf:allenai/c4:en``), and a path or glob (it has a slash or a wildcard, or exists) goes to the
    source ``files``. ``data_cfg`` is the recipe's `minsota.recipe.DataConfig`; ``split`` is "train" or
    "validation". A Source yields one epoch of documents in a fixed order, block by block, each block with a
    JSON-serialisable state to resume after it (see `minsota.data.Source`); wrapping a streaming
    `datasets.IterableDataset` in `minsota.data.HFSource` gives exactly that, and `minsota.data.hf_source`
    builds one from `datasets.load_dataset` arguments. A factory that needs the network checks
    `minsota.data.hub_reachable` first and raises `minsota.errors.UserError` (one line: how to use a local
    copy) rather than waiting for the libraries' retries.
    """


@hookspec
def minsota_register_tokenizers():
    """Tokenizers. ``factory(argument, data_cfg) -> minsota.data.Tokenizer``.

    ``data.tokenizer`` names one as for sources (``NAME``, ``NAME:ARGUMENT``); a path or a hub name with a slash
    goes to the tokenizer ``hf``. A Tokenizer has ``name``, ``vocab_size`` (every id is below it), ``eos_id``
    (appended after each document) and ``encode(str) -> list[int]`` (no special tokens added),
    ``decode(ids) -> str``. It must be picklable: DataLoader workers use it. Optional:
    ``save_pretrained(directory)`` writing files `transformers.AutoTokenizer` loads, which `export-hf` calls.
    """


@hookspec
def minsota_register_optimizers():
    """Optimizers. ``factory(groups, cfg, **options) -> torch.optim.Optimizer`` (one object, even when it steps
    several algorithms inside: Muon for matrices, AdamW for the rest).

    ``groups`` is a list of param-group dicts (`minsota.optim.param_groups`): ``params``, ``names`` (as in
    ``model.named_parameters()``), ``role`` ("matrix": 2-D weights inside the layers, "embedding": token and
    position embeddings, a tied LM head included, "head": an untied LM head, "vector": everything else),
    ``lr`` (``train.lr`` × ``lr_scale``), ``lr_scale``, ``weight_decay`` and ``splits`` (per tensor, the rows
    of each logical matrix it fuses, or None). The factory may change a group's ``lr`` (its base: each step
    sets ``lr = initial_lr × schedule multiplier``) or add keys. ``cfg`` is the resolved
    `minsota.recipe.TrainConfig`; ``**options`` the keys of ``train.optimizer``'s inline table. Unknown options
    are refused at recipe time (the factory's signature); a bad value raises ValueError, reported naming
    ``train.optimizer``.

    Checkpoints save the whole ``state_dict()``: tensors as safetensors, everything else (ints, floats,
    nested dicts, strings) as JSON. Optional seams: ``train()``/``eval()`` methods, called before stepping
    and around evaluation, checkpoints and sampling (schedule-free); ``group_state_keys``, the param-group
    entries the optimizer itself updates while training (schedule-free's ``k``), restored on resume (the
    rest of a group comes from the recipe).
    """


@hookspec
def minsota_register_schedules():
    """Learning-rate schedules. ``factory(cfg, **options) -> multiplier(step) -> float``.

    The multiplier scales every group's base lr (groups keep their ratios) at optimizer step ``step``
    (0-based) after the trainer's warmup, which all schedules share (``cfg.warmup_count()`` steps). ``cfg`` is
    the resolved `minsota.recipe.TrainConfig`. The factory is called when the recipe is validated, so a
    ValueError for a bad option is reported naming ``train.schedule``.
    """
