"""The decoder: token embedding -> blocks -> final norm -> LM head, assembled from a resolved recipe.

Every component is looked up once, here, in the registries that plugins fill; the modules are built
and injected into the block topology (torchtune style), so `forward` is plain tensor code that
`torch.compile(fullgraph=True)` sees as one graph. Weight names follow Meta's Llama (`tok_embeddings`,
`layers.N.attention.wqkv`, `feed_forward.w13`, `norm`, `output`) so checkpoint adapters stay short.
"""

import math
from typing import NamedTuple

import torch
from torch import nn

from minsota.components import PositionalEncoding
from minsota.errors import UserError
from minsota.loss import linear_cross_entropy, softcap
from minsota.plugins import LoadedPlugins, load_plugins
from minsota.recipe import ModelConfig, Recipe, component
from minsota.state import make_state

RESIDUAL_OUTPUTS = ("wo.weight", "w2.weight")  # scaled init: GPT-2 / Megatron 1/sqrt(2·n_layers)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, positional: PositionalEncoding, layers: list[nn.Module], norm: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.positional = positional
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        std, residual_std = self.cfg.init_std, self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.ndim >= 2:
                nn.init.normal_(p, 0.0, residual_std if name.endswith(RESIDUAL_OUTPUTS) else std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            # other vectors (norm gains) keep their module's own init

    def hidden_states(self, tokens, positions=None, document_ids=None) -> torch.Tensor:
        """(B, T) tokens -> (B, T, D) final-normed hidden states."""
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        hidden = self.positional.embed(self.tok_embeddings(tokens), positions)
        state = make_state(hidden, positions, document_ids)
        for layer in self.layers:
            state = layer(state)
        return self.norm(state["hidden"])

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
        return linear_cross_entropy(hidden, self.output.weight, targets.flatten(),
                                    logit_softcap=self.cfg.logit_softcap, z_loss=self.cfg.z_loss)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int, training: bool = True) -> float:
        """Matmul FLOPs per token: 2 per weight of every Linear (the LM head included), plus attention scores
        and values, 4·hd per visible key, query head and layer: T/2 keys on average when causal (2·T·hd), and
        W − W²/2T under a sliding window of W (the attention's ``window`` option). GQA is counted right because
        K/V projections are counted at their real size. Training = 3× forward.
        """
        linear = {id(m.weight): m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear)}
        window = min(component(self.cfg.attention)[1].get("window") or seq_len, seq_len)
        keys = window - window * window / (2 * seq_len)  # mean over queries of min(i, W) keys, i = 1..T
        attention = 4 * self.cfg.n_layers * self.cfg.n_heads * self.cfg.head_dim * keys
        forward = 2 * sum(linear.values()) + attention
        return 3 * forward if training else forward


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


def _build_component(recipe: Recipe, loaded: LoadedPlugins, kind: str, *args, **kwargs):
    """Build one component from its registry, turning a bad option into one line naming the recipe key."""
    name, options = component(getattr(recipe.model, kind))
    factory = loaded.registry(kind).get(name)
    try:
        return build_component(factory, name, options, recipe.model, *args, **kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"{recipe.where(f'model.{kind}')}: model.{kind} = '{name}': {e}") from e


def model_size(recipe: Recipe) -> tuple[int, float]:
    """(parameters, training FLOPs per token at train.seq_len), built on "meta": nothing allocated."""
    model = build_model(recipe, device="meta")
    return model.num_parameters(), model.flops_per_token(recipe.train.seq_len)


def build_model(recipe: Recipe, device: str | torch.device | None = None) -> Decoder:
    """Assemble the decoder a recipe describes (on ``device``; "meta" allocates nothing)."""
    loaded = load_plugins(recipe.plugins)
    cfg = recipe.model
    with torch.device(device or "cpu"):
        positional = _build_component(recipe, loaded, "positional", cfg)

        def norm(dim: int = cfg.dim):
            return _build_component(recipe, loaded, "norm", dim, cfg)

        layers = [
            _build_component(recipe, loaded, "block", cfg, norm=norm,
                             attention=_build_component(recipe, loaded, "attention", cfg, positional, norm=norm),
                             feedforward=_build_component(recipe, loaded, "feedforward", cfg))
            for _ in range(cfg.n_layers)
        ]
        # post-norm blocks already end on a norm: `final_norm = false` leaves the LM head without one
        return Decoder(cfg, positional, layers, norm() if cfg.final_norm else nn.Identity())
