"""The decoder: token embedding -> blocks -> final norm -> LM head, assembled from a resolved recipe.

Every component is looked up once, here, in the registries that plugins fill; the modules are built
and injected into the block topology (torchtune style), so `forward` is plain tensor code that
`torch.compile(fullgraph=True)` sees as one graph. Weight names follow Meta's Llama (`tok_embeddings`,
`layers.N.attention.wqkv`, `feed_forward.w13`, `norm`, `output`) so checkpoint adapters stay short.
"""

import functools
import inspect
import math
from typing import NamedTuple

import torch
from torch import nn

from minsota.components import PositionalEncoding, attention_flops
from minsota.errors import UserError
from minsota.loss import linear_cross_entropy, softcap
from minsota.plugins import LoadedPlugins, load_plugins
from minsota.recipe import LayerComponent, ModelConfig, Recipe, canonical, component, resolve_layers
from minsota.state import HIDDEN, make_state

RESIDUAL_OUTPUTS = ("wo.weight", "w2.weight")  # scaled init: GPT-2 / Megatron 1/sqrt(2·n_layers)
RESERVED_METRICS = (
    "step",
    "loss",
    "aux_loss",
    "val_loss",
    "lr",
    "grad_norm",
    "tokens",
    "epoch",
    "tokens_per_s",
    "mfu",
    "mfu_gemms",
    "mfu_datasheet",
    "skipped",
)  # metrics.jsonl keys an auxiliary term may not take


class Decoder(nn.Module):
    """Embed -> blocks -> final norm -> LM head. ``positional`` is the [model] positional encoding: it embeds
    the tokens and serves every layer whose resolved positional spec is the same; ``positionals`` holds the
    other distinct ones (one module per spec). ``specs`` are the resolved per-layer component specs and
    ``attentions`` each layer's attention module (as built; it lives inside its block)."""

    def __init__(
        self,
        cfg: ModelConfig,
        positional: PositionalEncoding,
        layers: list[nn.Module],
        norm: nn.Module,
        positionals: list[PositionalEncoding],
        specs: list[dict],
        attentions: list[nn.Module],
    ):
        super().__init__()
        self.cfg = cfg
        self.specs = specs
        object.__setattr__(self, "attentions", list(attentions))  # not registered twice: the blocks own them
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.positional = positional
        self.positionals = nn.ModuleList(positionals)  # empty when every layer's is the [model] one
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # found once, here: the modules that contribute auxiliary loss terms (`minsota.hookspecs`, "Auxiliary losses")
        object.__setattr__(self, "aux_modules", [m for m in self.modules() if getattr(m, "aux_loss_name", None)])
        # and those that log a metric (`aux_metric_name`) or act after each optimizer step (`after_optimizer_step`)
        object.__setattr__(self, "metric_modules", [m for m in self.modules() if getattr(m, "aux_metric_name", None)])
        object.__setattr__(
            self, "step_modules", [m for m in self.modules() if hasattr(m, "after_optimizer_step") and m is not self]
        )
        for module, attribute in [
            *((m, "aux_loss_name") for m in self.aux_modules),
            *((m, "aux_metric_name") for m in self.metric_modules),
        ]:
            if getattr(module, attribute) in RESERVED_METRICS:
                raise UserError(
                    f"{type(module).__name__}: {attribute} {getattr(module, attribute)!r} is taken by a "
                    f"metric of its own ({', '.join(RESERVED_METRICS)})"
                )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """A module with ``init_weights(std, residual_std)`` initialises its own parameters; every other one gets
        normal(0, std), residual output projections (names ending in ``wo.weight``/``w2.weight``) residual_std,
        biases zero. Parameters are visited in order, so a module's own init runs where its first parameter is."""
        std, residual_std = self.cfg.init_std, self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        owners = {}  # parameter -> the outermost module that initialises it
        for module in self.modules():
            if hasattr(module, "init_weights"):
                for p in module.parameters():
                    owners.setdefault(p, module)
        done = set()
        for name, p in self.named_parameters():
            owner = owners.get(p)
            if owner is not None:
                if owner not in done:
                    owner.init_weights(std, residual_std)
                    done.add(owner)
            elif p.ndim >= 2:
                nn.init.normal_(p, 0.0, residual_std if name.endswith(RESIDUAL_OUTPUTS) else std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            # other vectors (norm gains) keep their module's own init

    def hidden_states(self, tokens, positions=None, document_ids=None) -> torch.Tensor:
        """(B, T) tokens -> (B, T, D) final-normed hidden states."""
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        embeddings = self.tok_embeddings(tokens)
        if self.cfg.embed_scale != 1:
            embeddings = embeddings * self.cfg.embed_scale
        hidden = self.positional.embed(embeddings, positions)
        state = make_state(hidden, positions, document_ids)
        for layer in self.layers:
            state = layer(state)
        return self.norm(state[HIDDEN])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) hidden states -> (..., vocab) fp32 logits, soft-capped when the recipe asks."""
        return softcap(self.output(hidden).float(), self.cfg.logit_softcap)

    def forward(self, tokens, positions=None, document_ids=None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, vocab) fp32 logits."""
        return self.logits(self.hidden_states(tokens, positions, document_ids))

    def loss(self, tokens, targets, positions=None, document_ids=None) -> torch.Tensor:
        """Mean next-token cross-entropy (+ z-loss when the recipe asks); targets of -100 are ignored.

        The LM head and the cross-entropy run fused over row chunks (`minsota.loss`): the (B·T, vocab) logits
        are never materialised, which saves ~1 GB at a 32k vocabulary and 2k tokens.
        """
        hidden = self.hidden_states(tokens, positions, document_ids).flatten(0, 1)  # (B·T, D)
        return linear_cross_entropy(
            hidden, self.output.weight, targets.flatten(), logit_softcap=self.cfg.logit_softcap, z_loss=self.cfg.z_loss
        )

    def losses(self, tokens, targets, positions=None, document_ids=None) -> dict[str, torch.Tensor]:
        """What training minimises, by name: ``loss`` (the LM cross-entropy, as `loss`) and, when components
        contribute auxiliary terms, ``aux_loss`` (their sum, added to the objective) and each term by name
        (terms of one name, e.g. one per layer, summed). The objective is ``loss + aux_loss``."""
        losses = {"loss": self.loss(tokens, targets, positions, document_ids)}
        for module in self.aux_modules:
            name = module.aux_loss_name
            losses[name] = losses[name] + module.aux_loss if name in losses else module.aux_loss
        if self.aux_modules:
            losses["aux_loss"] = sum(losses[name] for name in dict.fromkeys(m.aux_loss_name for m in self.aux_modules))
        metrics = {}  # logged, never minimised: the mean over the modules of one name
        for module in self.metric_modules:
            metrics.setdefault(module.aux_metric_name, []).append(module.aux_metric)
        return losses | {name: torch.stack(values).mean() for name, values in metrics.items()}

    def after_optimizer_step(self, applied: bool) -> None:
        """Called by the trainer after every optimizer step (``applied`` False: a non-finite step was skipped) on
        every rank; runs each module's own ``after_optimizer_step(applied)`` in module order."""
        for module in self.step_modules:
            module.after_optimizer_step(applied)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def active_parameters(self) -> int:
        """The parameters one token uses: a module with ``active_parameters()`` (a mixture of experts) counts
        its own, every other parameter counts whole (tied ones once)."""
        seen, active = set(), 0
        for module in self.modules():
            if hasattr(module, "active_parameters") and module is not self:
                active += module.active_parameters()
                seen.update(id(p) for p in module.parameters())
        for p in self.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                active += p.numel()
        return active

    def flops_per_token(self, seq_len: int, training: bool = True) -> float:
        """Matmul FLOPs per token, summed per layer. A module with ``flops_per_token(seq_len)`` (forward FLOPs
        per token) counts itself; for the rest, 2 per weight of every Linear (the LM head included), plus, for a
        layer whose attention does not count itself, the scores and values: 4·hd per visible key, query head
        and layer (`attention_flops`; its window from the layer's spec). Training = 3× forward."""
        seen = set()  # weights counted once (tied embeddings)
        forward = _module_flops(self.output, seq_len, seen)
        for layer, attention, spec in zip(self.layers, self.attentions, self.specs):
            forward += _module_flops(layer, seq_len, seen)
            if not (hasattr(layer, "flops_per_token") or hasattr(attention, "flops_per_token")):
                window = component(spec["attention"])[1].get("window") or 0
                forward += attention_flops(self.cfg.n_heads, self.cfg.head_dim, seq_len, window)
        return 3 * forward if training else forward


def _module_flops(module: nn.Module, seq_len: int, seen: set) -> float:
    """A module's own ``flops_per_token`` where it has one, else 2 per Linear weight, recursively."""
    if hasattr(module, "flops_per_token"):
        seen.update(id(p) for p in module.parameters())
        return float(module.flops_per_token(seq_len))
    flops = 0.0
    if isinstance(module, nn.Linear) and id(module.weight) not in seen:
        seen.add(id(module.weight))
        flops += 2 * module.weight.numel()
    return flops + sum(_module_flops(child, seq_len, seen) for child in module.children())


class Spec(NamedTuple):
    """What the recipe asked a component to be, recorded on the module built (``module.spec``): its registry
    name, the model config and its options as written. Parity references (`minsota.reference`) restate the math
    from these, never from values the module computed, so a module that ignores an option disagrees."""

    name: str
    cfg: ModelConfig
    options: dict


def build_component(factory, name: str, options: dict, cfg: ModelConfig, *args, **kwargs) -> nn.Module:
    """``factory(*args, **kwargs, **options)`` with its `Spec` recorded."""
    module = factory(*args, **kwargs, **options)
    module.spec = Spec(name, cfg, dict(options))
    return module


@functools.cache
def takes_layer(factory) -> bool:
    """Whether a factory names a ``layer`` parameter (it then gets the 0-based layer index); inspected once."""
    try:
        return "layer" in inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a callable without a signature to read
        return False


def _build_component(
    recipe: Recipe, loaded: LoadedPlugins, kind: str, part: LayerComponent, layer: int | None, *args, **kwargs
):
    """Build one component from its registry, turning a bad option into one line naming the recipe key it came
    from. A factory that names a ``layer`` parameter gets the 0-based index of the layer it is built for (None
    for the decoder's own: the final norm and the positional encoding that embeds the tokens)."""
    name, options = component(part.spec)
    factory = loaded.registry(kind).get(name)
    if takes_layer(factory):
        kwargs["layer"] = layer
    try:
        return build_component(factory, name, options, recipe.model, *args, **kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"{recipe.where(part.key)}: {part.key} = '{name}': {e}") from e


def model_size(recipe: Recipe) -> tuple[int, float]:
    """(parameters, training FLOPs per token at train.seq_len), built on "meta": nothing allocated."""
    model = build_model(recipe, device="meta")
    return model.num_parameters(), model.flops_per_token(recipe.train.seq_len)


def active_size(recipe: Recipe) -> int:
    """The parameters one token uses (`Decoder.active_parameters`), built on "meta"."""
    return build_model(recipe, device="meta").active_parameters()


def build_model(recipe: Recipe, device: str | torch.device | None = None) -> Decoder:
    """Assemble the decoder a recipe describes (on ``device``; "meta" allocates nothing): one resolved spec per
    layer (`minsota.recipe.resolve_layers`), layers with equal positional specs sharing one module."""
    loaded = load_plugins(recipe.plugins)
    cfg = recipe.model
    resolved = resolve_layers(cfg)
    with torch.device(device or "cpu"):
        positionals = {}  # one module per distinct positional spec (and layer, for factories that take it)

        def positional(part: LayerComponent, layer: int | None):
            factory = loaded.registry("positional").get(component(part.spec)[0])
            key = (canonical(part.spec), layer if takes_layer(factory) else None)
            if key not in positionals:
                positionals[key] = _build_component(recipe, loaded, "positional", part, layer, cfg)
            return positionals[key]

        embedding = positional(LayerComponent(cfg.positional, "model.positional"), None)
        layers, attentions = zip(
            *(
                _build_layer(recipe, loaded, layer, i, positional(layer["positional"], i))
                for i, layer in enumerate(resolved)
            )
        )
        # post-norm blocks already end on a norm: `final_norm = false` leaves the LM head without one
        final = LayerComponent(cfg.norm, "model.norm")
        norm = _build_component(recipe, loaded, "norm", final, None, cfg.dim, cfg) if cfg.final_norm else nn.Identity()
        others = [m for m in dict.fromkeys(positionals.values()) if m is not embedding]
        specs = [{kind: c.spec for kind, c in layer.items()} for layer in resolved]
        return Decoder(cfg, embedding, list(layers), norm, others, specs, attentions)


def _build_layer(recipe: Recipe, loaded: LoadedPlugins, layer: dict[str, LayerComponent], i: int, positional):
    """(block, its attention) of layer ``i``, with its norms and feed-forward, from its resolved spec."""
    cfg = recipe.model

    def norm(dim: int = cfg.dim):
        return _build_component(recipe, loaded, "norm", layer["norm"], i, dim, cfg)

    attention = _build_component(recipe, loaded, "attention", layer["attention"], i, cfg, positional, norm=norm)
    feedforward = _build_component(recipe, loaded, "feedforward", layer["feedforward"], i, cfg)
    block = _build_component(
        recipe, loaded, "block", layer["block"], i, cfg, norm=norm, attention=attention, feedforward=feedforward
    )
    return block, attention
