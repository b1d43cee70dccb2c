"""The hook specifications: one `minsota_register_<kind>` hook per component kind.

Every hook takes no arguments and returns a mapping ``name -> factory``. The factory's docstring
(first line) is the summary that `minsota list` shows. Hooks are called once, when the registries are
built; nothing here is ever consulted from `forward`.

Names must be unique within a kind across all plugins; a clash is an error naming both providers. A
plugin that means to replace a name wraps the factory in `minsota.override(factory)`.

``cfg`` below is the resolved `minsota.recipe.ModelConfig`: it has at least ``dim``, ``n_layers``,
``n_heads``, ``n_kv_heads``, ``head_dim``, ``vocab_size``, ``max_seq_len``, and ``ffn_dim`` (None unless the
recipe sets it: a feed-forward takes ``cfg.ffn_width(ratio)``, which is ``ffn_dim`` when set).
``**options`` are the keys of the recipe's inline table for that component (everything but ``name``);
a factory rejects options it does not know by raising TypeError or ValueError, which minsota reports as
one line naming the recipe key and component.

A built module whose class carries a ``reference`` (a plain-tensor restatement; see `minsota.reference`)
is checked against it by the parity suite, with no test to write. The builder records what the recipe asked
for on every module it builds (``module.spec``: name, ``cfg``, options as written); a reference restates the
math from those options, never from values the module computed.

Layers. Components are built once per layer from that layer's resolved spec (`minsota.recipe.resolve_layers`:
``[model]``, then its ``layer_types`` table, then its ``layer_overrides`` entry). A factory whose signature
names a ``layer`` parameter is called with ``layer=`` the 0-based index of the layer it is built for (None for
the decoder's own final norm and token-embedding positional encoding); other factories are called without it.

What any component module may define (the decoder finds them at build time; none is required):
  ``flops_per_token(seq_len) -> float``   its forward matmul FLOPs per token at that sequence length (a windowed
      attention counts its window). `Decoder.flops_per_token` sums them per layer; a module without it counts
      2 per ``nn.Linear`` weight, plus, for an attention that does not count itself, causal scores and values.
  ``init_weights(std, residual_std)``   initialises the module's own parameters (std = ``model.init_std``,
      residual_std = std / sqrt(2·n_layers), for projections into the residual stream), called once by the
      decoder in place of the default rule: normal(std) for matrices, residual_std for those named ``wo``/``w2``,
      zero biases, other vectors left as the module made them.

  ``active_parameters() -> int``   the parameters one token uses (a mixture of experts: the router, its top-k and
      shared experts); `Decoder.active_parameters` counts every other parameter whole, and `minsota show` prints it.

Auxiliary losses. A module (norm, attention, feed-forward, block, ...) contributes a named scalar term to the
training objective by carrying an ``aux_loss_name`` attribute (a class attribute, read at build time) and
assigning ``self.aux_loss`` a 0-d tensor, already weighted, on every forward call. After the blocks run,
`Decoder.losses` collects ``aux_loss`` from every module that declared a name (terms of one name, say one per
MoE layer, are summed). The trainer minimises ``loss + aux_loss``; ``metrics.jsonl`` keeps ``loss`` the LM
cross-entropy (and ``val_loss``, which has no auxiliary terms), logs ``aux_loss`` (the sum) and each term under
its name. An attribute rather than a state key because the state's entries all have batch size [B, T], and
rather than a return value because norms, attentions and feed-forwards stay plain tensor -> tensor modules. It
compiles with ``fullgraph=True`` (the attribute write is a traced side effect), and it is per micro-batch like
the LM loss, so gradient accumulation, DDP and FSDP2 average it like the loss.

Metrics. Likewise a module carrying ``aux_metric_name`` assigns ``self.aux_metric`` (a detached 0-d tensor) on every
forward: `Decoder.losses` returns it under that name (the mean over the modules of one name), ``metrics.jsonl``
logs it (the mean over micro-batches and ranks) and nothing minimises it (MoE: ``moe_imbalance``).

After the optimizer step. A module with ``after_optimizer_step(applied: bool)`` is called by the trainer
(`minsota.step.train_step`, through `Decoder.after_optimizer_step`) once per optimizer step, after the step and
outside autograd, on every rank in the same module order, so it may run collectives (``torch.distributed``, when
initialised); ``applied`` is False when the parameters did not move (a non-finite step skipped, or fp16's
loss scaler skipping an overflow). What it changes lives in buffers: the
checkpoint saves persistent ones and a resume restores them, so the update resumes exactly. DDP does not broadcast
buffers from rank 0 (each rank keeps its own, e.g. counts to all-reduce). MoE bias balancing is the built-in use.
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

    One module is built per distinct resolved spec and shared by the layers that have it; the one of
    ``model.positional`` also embeds the tokens (``embed``). It may override
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
    state is the `TensorDict` described in `minsota.state`: the block reads ``hidden``, ``positions``,
    ``embeddings`` (the first block's input) and (if present) ``document_ids``, and writes ``hidden`` once.
    It may write further (B, T, ...) keys that later blocks read (value residuals); a key it writes it writes
    on every call, so the key set is the same every step.
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
    are refused at recipe time (the factory's signature), and so are bad values: the recipe's validation
    calls the factory on `minsota.recipe.stand_in_groups` (one small tensor per role, with a gradient), so
    raise ValueError (or TypeError) for a bad value there, and build nothing beyond the optimizer. The memory
    estimate (`minsota.memory`) steps that stand-in optimizer once and counts its state tensors per parameter.

    Checkpoints save the whole ``state_dict()``: tensors as safetensors, everything else (ints, floats,
    nested dicts, strings) as JSON. Optional seams: ``train()``/``eval()`` methods, called before stepping
    and around evaluation, checkpoints and sampling (schedule-free); ``group_state_keys``, the param-group
    entries the optimizer itself updates while training (schedule-free's ``k``), restored on resume (the
    rest of a group comes from the recipe). Under fp16 the trainer steps through a ``torch.amp.GradScaler``:
    an optimizer that sets ``_step_supports_amp_scaling`` (fused AdamW, and so its subclasses) must itself
    skip the step when ``self.found_inf`` is nonzero and divide gradients by ``self.grad_scale`` when set;
    any other is skipped by the scaler on overflow.
    """


@hookspec
def minsota_register_schedules():
    """Learning-rate schedules. ``factory(cfg, **options) -> multiplier(step) -> float``.

    The multiplier scales every group's base lr (groups keep their ratios) at optimizer step ``step``
    (0-based) after the trainer's warmup, which all schedules share (``cfg.warmup_count()`` steps). ``cfg`` is
    the resolved `minsota.recipe.TrainConfig`. The factory is called when the recipe is validated, so a
    ValueError for a bad option is reported naming ``train.schedule``.
    """
