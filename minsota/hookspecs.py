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
is checked against it by the parity suite, with no test to write.
"""

import pluggy

hookspec = pluggy.HookspecMarker("minsota")
hookimpl = pluggy.HookimplMarker("minsota")


@hookspec
def minsota_register_norms():
    """Norms. ``factory(dim, cfg, **options) -> nn.Module`` mapping (..., dim) -> (..., dim)."""


@hookspec
def minsota_register_positional_encodings():
    """Positional encodings. ``factory(cfg, **options) -> minsota.model.PositionalEncoding``.

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
    Output projection named ``wo`` receives the residual-scaled init. A kernel that cannot honour an option
    or the positional encoding it is given raises ValueError from the factory, so the recipe is refused
    before training.
    """


@hookspec
def minsota_register_feedforwards():
    """Feed-forward networks. ``factory(cfg, **options) -> nn.Module`` mapping (B, T, cfg.dim) -> (B, T, cfg.dim).

    The output projection named ``w2`` receives the residual-scaled init.
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
    """Data sources. ``factory(spec, data_cfg, split) -> minsota.data.Source``.

    ``spec`` is the value of ``data.source`` (the part after ``name:`` for prefixed specs such as
    ``hf:NAME``); ``split`` is "train" or "validation". See `minsota.data` for the Source protocol.
    """


@hookspec
def minsota_register_tokenizers():
    """Tokenizers. ``factory(spec, data_cfg) -> minsota.data.Tokenizer``.

    ``spec`` is the value of ``data.tokenizer``. See `minsota.data` for the Tokenizer protocol.
    """
