"""Hugging Face families with a mixture of experts or latent attention, for `minsota.hf`: Mixtral, OLMoE,
Qwen3-MoE and DeepSeek-V3 (without its multi-token-prediction layer, which transformers does not build either).

Each maps onto built-ins: the `moe` feed-forward (HF v5 stores the experts fused and 3-D, ``experts.gate_up_proj``
(E, 2I, D) and ``experts.down_proj`` (E, D, I), exactly `moe`'s ``w13`` and ``w2``), `mla` attention for DeepSeek
(its ``rope_interleave`` pairs are rotary-embedding-torch's, so no rows are permuted), and DeepSeek's dense first
layers as ``layer_overrides``. `minsota.hf` asks this module for a family's [model] table, its tensors (as
`minsota.hf.Rule` fields) and its config; the rotary permutation, I/O and the families without experts stay there.
"""

import math
from dataclasses import dataclass

import torch

from minsota.errors import UserError
from minsota.recipe import ModelConfig, component

ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}
QK_NORMS = {"mixtral": "none", "olmoe": "full", "qwen3_moe": "head"}  # tells the softmax-routed families apart


def _expect(c: dict, key: str, wanted, default=None):
    if c.get(key, default) != wanted:
        raise UserError(f"config.json: {key} = {c.get(key, default)!r} has no minsota equivalent (needs {wanted!r})")


def rotary_shape(c: dict) -> dict:
    """The [model] keys every Llama-like config.json states alike (`minsota.hf`'s families and these): sizes,
    RMSNorm, tying, init."""
    heads = c["num_attention_heads"]
    return {
        "dim": c["hidden_size"],
        "n_layers": c["num_hidden_layers"],
        "n_heads": heads,
        "n_kv_heads": c.get("num_key_value_heads") or heads,
        "head_dim": c.get("head_dim") or c["hidden_size"] // heads,
        "vocab_size": c["vocab_size"],
        "ffn_dim": c["intermediate_size"],
        "max_seq_len": c["max_position_embeddings"],
        "norm": {"name": "rmsnorm", "eps": c["rms_norm_eps"]},
        "tie_embeddings": c.get("tie_word_embeddings", False),
        "init_std": c.get("initializer_range", 0.02),
    }


def model_from_hf(c: dict, rope_from_hf) -> dict:
    """A recipe's [model] table from the config.json of one of these families (``rope_from_hf``: minsota.hf's)."""
    family = c["model_type"]
    _expect(c, "hidden_act", "silu")
    _expect(c, "attention_bias", False, False)
    model = {**rotary_shape(c), "block": "prenorm"}
    if family == "deepseek_v3":
        return {**model, **_deepseek_from_hf(c, rope_from_hf)}
    _expect(c, "clip_qkv", None)
    if family == "qwen3_moe":
        _expect(c, "decoder_sparse_step", 1, 1)
        _expect(c, "mlp_only_layers", [], [])
        _expect(c, "use_sliding_window", False, False)
    attention = {"name": "sdpa", "qk_norm": QK_NORMS[family]} if QK_NORMS[family] != "none" else {"name": "sdpa"}
    if family == "mixtral" and c.get("sliding_window"):
        attention["window"] = c["sliding_window"]
    experts = c.get("num_local_experts") or c["num_experts"]
    moe = {
        "name": "moe",
        "experts": experts,
        "top_k": c["num_experts_per_tok"],
        "expert_dim": c.get("moe_intermediate_size") or c["intermediate_size"],
        "normalize_top_k": c.get("norm_topk_prob", family == "mixtral"),
        "balance_coef": c.get("router_aux_loss_coef", 0.01),
    }
    return {**model, "positional": rope_from_hf(c), "attention": attention, "feedforward": moe}


def _deepseek_from_hf(c: dict, rope_from_hf) -> dict:
    """MLA, the sigmoid-routed group-limited experts with the correction bias, and the dense first layers."""
    _expect(c, "rope_interleave", True, True)
    _expect(c, "rms_norm_eps", 1e-6)  # transformers' latent norms keep 1e-6 whatever it says; mla's take the recipe's
    rope = dict(c.get("rope_parameters") or {})
    mscale_all_dim = float(rope.pop("mscale_all_dim", 0) or 0)
    if rope.get("rope_type") == "yarn":  # q and k scaled by mscale/mscale_all_dim's ratio; the softmax by mla
        factor, mscale = rope["factor"], float(rope.pop("mscale", 1) or 1)
        ratio = (0.1 * mscale * _log(factor) + 1) / (0.1 * mscale_all_dim * _log(factor) + 1 if mscale_all_dim else 1)
        rope["attention_factor"] = rope.get("attention_factor") or ratio
    attention = {
        "name": "mla",
        "q_lora_rank": c.get("q_lora_rank") or 0,
        "kv_lora_rank": c["kv_lora_rank"],
        "qk_nope_head_dim": c["qk_nope_head_dim"],
        "v_head_dim": c["v_head_dim"],
    }
    if mscale_all_dim:
        attention["mscale_all_dim"] = mscale_all_dim
    moe = {
        "name": "moe",
        "experts": c["n_routed_experts"],
        "top_k": c["num_experts_per_tok"],
        "score": "sigmoid",
        "normalize_top_k": c.get("norm_topk_prob", True),
        "route_scale": float(c.get("routed_scaling_factor", 1.0)),
        "groups": c.get("n_group") or 1,
        "top_groups": c.get("topk_group") or 1,
        "shared_experts": c.get("n_shared_experts") or 0,
        "balance": "bias",
    }
    dense = {
        str(i): {"feedforward": {"name": "swiglu", "hidden": c["intermediate_size"]}}
        for i in range(c.get("first_k_dense_replace", 0))
    }
    return {
        "head_dim": c["qk_rope_head_dim"],
        "n_kv_heads": c["num_attention_heads"],
        "ffn_dim": c["moe_intermediate_size"],
        "positional": rope_from_hf({**c, "rope_parameters": rope}),
        "attention": attention,
        "feedforward": moe,
        "layer_overrides": dense,
    }


def _log(x: float) -> float:
    return math.log(x) if x > 1 else 0.0


# checkpoints (and save_pretrained) keep one tensor per expert, in the Hub's names; the modules fuse them in memory
EXPERT_NAMES = {"mixtral": ("block_sparse_moe", ("w1", "w3", "w2"))}  # the others: mlp.experts.E.{gate,up,down}_proj


@dataclass(frozen=True)
class Experts:
    """One 3-D expert tensor (E, rows, cols): expert e's ``theirs[e]`` tensors stacked along their rows."""

    ours: str
    theirs: tuple[tuple[str, ...], ...]

    def load(self, hf: dict) -> torch.Tensor:
        return torch.stack([torch.cat([hf[name] for name in names]) for names in self.theirs])

    def save(self, ours: torch.Tensor) -> dict:
        return {
            name: part.contiguous()
            for names, expert in zip(self.theirs, ours)
            for name, part in zip(names, expert.chunk(len(names)))
        }


def layer_rules(cfg: ModelConfig, spec: dict, i: int, family: str) -> list:
    """Layer ``i``'s tensors: `minsota.hf.Rule` fields (ours, theirs, rows, heads), or `Experts`."""
    H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    ours, theirs = f"layers.{i}.", f"model.layers.{i}."
    rules = [
        (f"{ours}attention_norm.weight", (f"{theirs}input_layernorm.weight",)),
        (f"{ours}ffn_norm.weight", (f"{theirs}post_attention_layernorm.weight",)),
        (f"{ours}attention.wo.weight", (f"{theirs}self_attn.o_proj.weight",)),
    ]
    if family == "deepseek_v3":
        names = {"wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj"}
        names |= (
            {"wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj"}
            if component(spec["attention"])[1].get("q_lora_rank")
            else {"wq": "q_proj"}
        )
        rules += [(f"{ours}attention.{mine}.weight", (f"{theirs}self_attn.{hf}.weight",)) for mine, hf in names.items()]
    else:
        rules.append(
            (
                f"{ours}attention.wqkv.weight",
                tuple(f"{theirs}self_attn.{x}_proj.weight" for x in "qkv"),
                (H * hd, KV * hd, KV * hd),
                (H, KV, 0),
            )
        )
        qk_heads = {"full": (H, KV), "head": (1, 1)}.get(QK_NORMS[family])  # the gains follow their permuted rows
        if qk_heads:
            rules += [
                (f"{ours}attention.{x}_norm.weight", (f"{theirs}self_attn.{x}_norm.weight",), (), (h,))
                for x, h in zip("qk", qk_heads)
            ]
    name, options = component(spec["feedforward"])
    if name == "swiglu":
        width = options.get("hidden") or cfg.ffn_width(8 / 3)  # the width GatedFeedForward builds
        return rules + [
            (
                f"{ours}feed_forward.w13.weight",
                (f"{theirs}mlp.gate_proj.weight", f"{theirs}mlp.up_proj.weight"),
                (width, width),
            ),
            (f"{ours}feed_forward.w2.weight", (f"{theirs}mlp.down_proj.weight",)),
        ]
    mlp, (gate, up, down) = EXPERT_NAMES.get(family, ("mlp", ("gate_proj", "up_proj", "down_proj")))
    experts = [f"{theirs}{mlp}.experts.{e}." for e in range(options.get("experts", 8))]
    rules += [
        (f"{ours}feed_forward.router.weight", (f"{theirs}{mlp}.gate.weight",)),
        Experts(f"{ours}feed_forward.w13", tuple((f"{e}{gate}.weight", f"{e}{up}.weight") for e in experts)),
        Experts(f"{ours}feed_forward.w2", tuple((f"{e}{down}.weight",) for e in experts)),
    ]
    if options.get("balance") == "bias":
        rules.append((f"{ours}feed_forward.expert_bias", (f"{theirs}mlp.gate.e_score_correction_bias",)))
    if options.get("shared_experts"):
        width = options["shared_experts"] * (
            options.get("shared_dim") or options.get("expert_dim") or cfg.ffn_width(8 / 3)
        )
        shared = f"{theirs}mlp.shared_experts."
        rules += [
            (
                f"{ours}feed_forward.shared.w13.weight",
                (f"{shared}gate_proj.weight", f"{shared}up_proj.weight"),
                (width, width),
            ),
            (f"{ours}feed_forward.shared.w2.weight", (f"{shared}down_proj.weight",)),
        ]
    return rules


# ------------------------------------------------------------------------------------------- export


def family(specs: list[dict]) -> str | None:
    """The family of a decoder whose layers have experts or latent attention (None: another family's)."""
    if any(component(s["attention"])[0] == "mla" for s in specs):
        return "deepseek_v3"
    moe = [s for s in specs if component(s["feedforward"])[0] == "moe"]
    if not moe:
        return None
    qk_norm = component(moe[0]["attention"])[1].get("qk_norm", "none")
    return next((f for f, norm in QK_NORMS.items() if norm == qk_norm), "mixtral")


def _refuse(condition, family: str, what: str):
    if condition:
        raise UserError(f"cannot export to Hugging Face {family}: {what}")


MOE_DEFAULTS = {
    "experts": 8,
    "top_k": 2,
    "expert_dim": None,
    "shared_experts": 0,
    "shared_dim": None,
    "score": "softmax",
    "normalize_top_k": True,
    "route_scale": 1.0,
    "groups": 1,
    "top_groups": 1,
    "balance": "aux",
    "balance_coef": 0.01,
    "bias_rate": 1e-3,
    "router_z_loss": 0.0,
    "dispatch": "grouped",
}


def config_base(cfg: ModelConfig) -> dict:
    """The keys every exported `transformers` config starts from: vocabulary, tying, init, and no special token ids
    (minsota's tokenizer settings travel with the tokenizer files, not the model config)."""
    return {
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }


def config_to_hf(cfg: ModelConfig, specs: list[dict], family: str, rope_to_hf) -> dict:
    """The config.json keys of ``family`` for these layers; UserError naming what the family cannot hold."""
    dense = [i for i, s in enumerate(specs) if component(s["feedforward"])[0] != "moe"]
    _refuse(
        dense != list(range(len(dense))) or (dense and family != "deepseek_v3"),
        family,
        "dense feed-forward layers must be the first ones, and only DeepSeek-V3 has them",
    )
    sparse = specs[len(dense)]
    _refuse(any(s != sparse for s in specs[len(dense) :]), family, "its expert layers differ")
    for s in specs:
        _refuse(
            component(s["block"])[0] != "prenorm" or component(s["norm"])[0] != "rmsnorm",
            family,
            "it needs prenorm blocks and RMSNorm",
        )
    moe = {**MOE_DEFAULTS, **component(sparse["feedforward"])[1]}
    common = {
        **config_base(cfg),
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": component(sparse["norm"])[1].get("eps", 1e-5),
        "hidden_act": "silu",
        "num_experts_per_tok": moe["top_k"],
        "norm_topk_prob": moe["normalize_top_k"],
        **rope_to_hf(sparse["positional"], family),
    }
    expert_dim = moe["expert_dim"] or cfg.ffn_width(8 / 3)
    if family == "deepseek_v3":
        mscale_all_dim = component(sparse["attention"])[1].get("mscale_all_dim")
        if mscale_all_dim:  # the softmax correction rides in the rope table, as DeepSeek's config has it
            _refuse(not common["rope_scaling"], family, "mla mscale_all_dim needs rope scaling = 'yarn'")
            common["rope_scaling"] = {**common["rope_scaling"], "mscale_all_dim": mscale_all_dim}
        return {**common, **_deepseek_to_hf(cfg, specs, dense, moe, expert_dim)}
    attention = component(sparse["attention"])[1]
    _refuse(
        set(attention) - {"qk_norm", "window"} or (attention.get("window") and family != "mixtral"),
        family,
        f"attention options {sorted(attention)}",
    )
    _refuse(
        moe["score"] != "softmax"
        or moe["shared_experts"]
        or moe["groups"] != 1
        or moe["route_scale"] != 1
        or moe["balance"] == "bias",
        family,
        "it routes by softmax, without shared experts, groups, scale or bias",
    )
    config = {
        **common,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "router_aux_loss_coef": moe["balance_coef"],
    }
    if family == "mixtral":
        _refuse(expert_dim != cfg.ffn_width(8 / 3) and cfg.ffn_dim != expert_dim, family, "experts of another width")
        return {
            **config,
            "num_local_experts": moe["experts"],
            "intermediate_size": expert_dim,
            "sliding_window": attention.get("window") or None,
        }
    config |= {"num_experts": moe["experts"], "intermediate_size": expert_dim}
    if family == "qwen3_moe":
        config |= {
            "moe_intermediate_size": expert_dim,
            "intermediate_size": cfg.ffn_width(8 / 3),
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "attention_bias": False,
        }
    return config


def _deepseek_to_hf(cfg: ModelConfig, specs: list[dict], dense: list[int], moe: dict, expert_dim: int) -> dict:
    widths = {component(specs[i]["feedforward"])[1].get("hidden") or cfg.ffn_width(8 / 3) for i in dense}
    _refuse(len(widths) > 1, "deepseek_v3", "its dense layers differ in width")
    _refuse(
        moe["score"] != "sigmoid" or moe["balance"] != "bias",
        "deepseek_v3",
        "it routes by sigmoid scores with the correction bias (score = 'sigmoid', balance = 'bias')",
    )
    _refuse(moe["shared_dim"] not in (None, expert_dim), "deepseek_v3", "shared experts of another width")
    mla = component(specs[0]["attention"])[1]
    _refuse(any(s["attention"] != specs[0]["attention"] for s in specs), "deepseek_v3", "its attention layers differ")
    return {
        "num_key_value_heads": cfg.n_heads,
        "q_lora_rank": mla.get("q_lora_rank") or None,
        "kv_lora_rank": mla.get("kv_lora_rank") or 4 * cfg.head_dim,
        "qk_rope_head_dim": cfg.head_dim,
        "qk_nope_head_dim": mla.get("qk_nope_head_dim") or 2 * cfg.head_dim,
        "v_head_dim": mla.get("v_head_dim") or mla.get("qk_nope_head_dim") or 2 * cfg.head_dim,
        "n_routed_experts": moe["experts"],
        "moe_intermediate_size": expert_dim,
        "n_shared_experts": moe["shared_experts"],
        "routed_scaling_factor": moe["route_scale"],
        "n_group": moe["groups"],
        "topk_group": moe["top_groups"],
        "first_k_dense_replace": len(dense),
        "intermediate_size": widths.pop() if widths else expert_dim,
        "rope_interleave": True,
        "attention_bias": False,
    }
