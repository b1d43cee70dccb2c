"""The decoder: token embedding -> blocks -> final norm -> LM head, assembled from a resolved recipe.

Every component is looked up once, here, in the registries that plugins fill; the modules are built
and injected into the block topology (torchtune style), so `forward` is plain tensor code that
`torch.compile(fullgraph=True)` sees as one graph. Weight names follow Meta's Llama (`tok_embeddings`,
`layers.N.attention.wqkv`, `feed_forward.w13`, `norm`, `output`) so checkpoint adapters stay short.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from minsota.errors import UserError
from minsota.plugins import load_plugins
from minsota.recipe import ModelConfig, Recipe, component
from minsota.state import make_state


class PositionalEncoding(nn.Module):
    """Base class of positional encodings; the default changes nothing (NoPE)."""

    def embed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Applied to the token embeddings (B, T, D); learned/absolute encodings add here."""
        return x

    def rotate(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
        """Applied to q (B, H, T, hd) and k (B, KV, T, hd) inside attention; rotary encodings act here."""
        return q, k

    def bias(self, positions: torch.Tensor, n_heads: int) -> torch.Tensor | None:
        """An additive attention-score bias (B|1, H, T, T), or None."""
        return None


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
        logits = self.output(hidden).float()
        cap = self.cfg.logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    def forward(self, tokens, positions=None, document_ids=None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, vocab) fp32 logits."""
        return self.logits(self.hidden_states(tokens, positions, document_ids))

    def loss(self, tokens, targets, positions=None, document_ids=None) -> torch.Tensor:
        """Mean next-token cross-entropy (+ z-loss when the recipe asks); targets < 0 are ignored."""
        logits = self(tokens, positions, document_ids).flatten(0, 1)
        targets = targets.flatten()
        loss = F.cross_entropy(logits, targets, ignore_index=-100)
        if self.cfg.z_loss:
            valid = (targets >= 0).float()
            lse = torch.logsumexp(logits, dim=-1)
            loss = loss + self.cfg.z_loss * (lse.square() * valid).sum() / valid.sum().clamp_min(1)
        return loss

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int, training: bool = True) -> float:
        """Matmul FLOPs per token: 2 per weight of every Linear (the LM head included), plus causal attention
        scores and values, 2·T·hd per query head and layer (half of the 4·T·hd a full T×T product costs).
        GQA is counted right because K/V projections are counted at their real size. Training = 3× forward.
        """
        linear = {id(m.weight): m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear)}
        attention = 2 * self.cfg.n_layers * self.cfg.n_heads * self.cfg.head_dim * seq_len
        forward = 2 * sum(linear.values()) + attention
        return 3 * forward if training else forward


def _build(recipe: Recipe, plugins, kind: str, *args, **kwargs):
    """Build one component from its registry, turning a bad option into one line naming the recipe key."""
    name, options = component(getattr(recipe.model, kind))
    factory = plugins.registry(kind).get(name)
    try:
        return factory(*args, **kwargs, **options)
    except (TypeError, ValueError) as e:
        raise UserError(f"{recipe.where(f'model.{kind}')}: model.{kind} = '{name}': {e}") from e


def build_model(recipe: Recipe, device: str | torch.device | None = None) -> Decoder:
    """Assemble the decoder a recipe describes (on ``device``; "meta" allocates nothing)."""
    plugins = load_plugins(recipe.plugins)
    cfg = recipe.model
    with torch.device(device or "cpu"):
        positional = _build(recipe, plugins, "positional", cfg)

        def norm(dim: int = cfg.dim):
            return _build(recipe, plugins, "norm", dim, cfg)

        layers = [
            _build(recipe, plugins, "block", cfg, norm=norm,
                   attention=_build(recipe, plugins, "attention", cfg, positional, norm=norm),
                   feedforward=_build(recipe, plugins, "feedforward", cfg))
            for _ in range(cfg.n_layers)
        ]
        # post-norm blocks already end on a norm: `final_norm = false` leaves the LM head without one
        return Decoder(cfg, positional, layers, norm() if cfg.final_norm else nn.Identity())
