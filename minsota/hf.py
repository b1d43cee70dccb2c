"""Hugging Face import and export for the Llama, Mistral (sliding window), OLMo 2, GPT-2, Gemma 2 and Gemma 3
(text) families.

`load_hf(dir) -> Decoder` reads ``config.json`` and the safetensors weights of a `save_pretrained` directory
and maps them onto a minsota recipe; `save_hf(decoder, dir)` writes one that
`transformers.AutoModelForCausalLM.from_pretrained` loads. `import_to_run` / `export_run` do the same between
an HF directory and a run directory (`minsota import-hf`, `minsota export-hf`). Nothing is downloaded.

Two layout differences are reconciled here, in the converter, and nowhere else:
- rotary-embedding-torch rotates interleaved feature pairs (2i, 2i+1), as Meta's original Llama did; HF
  rotates halves (i, i + hd/2). Permuting the rows of each head of q and k (and their biases and QK-norm
  gains) maps one layout onto the other: the permutation HF's own convert_llama_weights_to_hf applies.
- minsota fuses q/k/v into ``wqkv`` and gate/up into ``w13``; GPT-2's Conv1D stores weights transposed.
Both are described once, as `Rule`s, and applied in either direction.

Gemma's layers differ (sliding-window "local" and full "global" attention; Gemma 3: a RoPE θ of each) and map
onto ``layer_pattern`` / ``layer_types``; every other Gemma trait is an option of a built-in component: the
sandwich block, (1 + w) RMSNorm (``offset = 1.0``), tanh-GeGLU, ``embed_scale`` √dim, attention ``scale``
(query_pre_attn_scalar^-0.5), ``softcap`` (the `math` kernel) and ``logit_softcap``, QK-norm per head. Export
and family detection read every layer's resolved spec (`Decoder.specs`), never one layer as if for all.
"""

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from minsota import checkpoint, hf_moe
from minsota.data import build_tokenizer
from minsota.errors import UserError
from minsota.inference import load_run
from minsota.loader import recipe_from_dict, recipe_record
from minsota.model import Decoder, build_model
from minsota.recipe import ModelConfig, Recipe, TrainConfig, component, layer_specs

ROTARY_FAMILIES = ("llama", "mistral", "olmo2")
GEMMA_FAMILIES = ("gemma2", "gemma3_text")
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    **hf_moe.ARCHITECTURES,
}
BASE_PREFIXES = {
    "llama": "model.",
    "mistral": "model.",
    "olmo2": "model.",
    "gpt2": "transformer.",
    "gemma2": "model.",
    "gemma3_text": "model.",
    **dict.fromkeys(hf_moe.ARCHITECTURES, "model."),
}  # base_model_prefix
SANDWICH_NORMS = {
    "attention_norm": "input_layernorm",
    "attention_out_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "ffn_out_norm": "post_feedforward_layernorm",
}
NORM_NAMES = {  # a block's norms -> HF's, per family
    "llama": {"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"},
    "olmo2": {"attention_out_norm": "post_attention_layernorm", "ffn_out_norm": "post_feedforward_layernorm"},
    "gemma2": SANDWICH_NORMS,
    "gemma3_text": SANDWICH_NORMS,
}
HF_LAYER_TYPES = {"sliding_attention": "local", "full_attention": "global"}  # Gemma's layer_types -> ours
ROPE_SCALINGS = {
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor", "truncate"),
}


# ------------------------------------------------------------------------------------- weight layout


def to_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from HF's rotate-half order (i, i + hd/2) to interleaved pairs (2i, 2i+1)."""
    return w.reshape(heads, 2, -1, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def to_halves(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of `to_interleaved`."""
    return w.reshape(heads, -1, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class Rule:
    """One minsota tensor made of HF tensors stacked along dim 0 (each ``rows`` long; ``heads`` > 0: rotary
    rows to permute per head), optionally transposed (GPT-2's Conv1D)."""

    ours: str
    theirs: tuple[str, ...]
    rows: tuple[int, ...] = ()
    heads: tuple[int, ...] = ()
    transpose: bool = False

    def load(self, hf: dict) -> torch.Tensor:
        parts = [hf[name].T if self.transpose else hf[name] for name in self.theirs]
        parts = [to_interleaved(p, h) if h else p for p, h in zip(parts, self.heads or [0] * len(parts))]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def save(self, ours: torch.Tensor) -> dict:
        parts = ours.split(list(self.rows)) if len(self.theirs) > 1 else [ours]
        parts = [to_halves(p, h) if h else p for p, h in zip(parts, self.heads or [0] * len(parts))]
        return {name: (p.T if self.transpose else p).contiguous() for name, p in zip(self.theirs, parts)}


def _rules(cfg: ModelConfig, specs: list[dict], family: str, ffn_dim: int) -> list[Rule]:
    """Every tensor of a decoder of this family, minsota name <- HF names (``specs``: each layer's components)."""
    H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    if family == "gpt2":
        rules = [
            Rule("tok_embeddings.weight", ("transformer.wte.weight",)),
            Rule("positional.wpe.weight", ("transformer.wpe.weight",)),
            Rule("norm.weight", ("transformer.ln_f.weight",)),
            Rule("norm.bias", ("transformer.ln_f.bias",)),
        ]
        layer = [
            ("attention_norm", "ln_1", False),
            ("attention.wqkv", "attn.c_attn", True),
            ("attention.wo", "attn.c_proj", True),
            ("ffn_norm", "ln_2", False),
            ("feed_forward.w1", "mlp.c_fc", True),
            ("feed_forward.w2", "mlp.c_proj", True),
        ]
        for i in range(cfg.n_layers):
            rules += [
                Rule(
                    f"layers.{i}.{ours}.{kind}",
                    (f"transformer.h.{i}.{theirs}.{kind}",),
                    transpose=transpose and kind == "weight",
                )
                for ours, theirs, transpose in layer
                for kind in ("weight", "bias")
            ]
    else:
        rules = [
            Rule("tok_embeddings.weight", ("model.embed_tokens.weight",)),
            Rule("norm.weight", ("model.norm.weight",)),
        ]
        norms = NORM_NAMES.get(family, NORM_NAMES["llama"])
        for i, spec in enumerate(specs):
            if family in hf_moe.ARCHITECTURES:  # experts / latent attention: minsota.hf_moe knows their tensors
                rules += [
                    r if isinstance(r, hf_moe.Experts) else Rule(*r) for r in hf_moe.layer_rules(cfg, spec, i, family)
                ]
                continue
            ours, theirs = f"layers.{i}.", f"model.layers.{i}."
            kinds = ("weight", "bias") if component(spec["attention"])[1].get("bias") else ("weight",)
            rules += [
                Rule(
                    f"{ours}attention.wqkv.{kind}",
                    tuple(f"{theirs}self_attn.{x}_proj.{kind}" for x in "qkv"),
                    (H * hd, KV * hd, KV * hd),
                    (H, KV, 0),
                )
                for kind in kinds
            ]
            rules += [Rule(f"{ours}attention.wo.{kind}", (f"{theirs}self_attn.o_proj.{kind}",)) for kind in kinds]
            rules += [
                Rule(
                    f"{ours}feed_forward.w13.weight",
                    (f"{theirs}mlp.gate_proj.weight", f"{theirs}mlp.up_proj.weight"),
                    (ffn_dim, ffn_dim),
                ),
                Rule(f"{ours}feed_forward.w2.weight", (f"{theirs}mlp.down_proj.weight",)),
            ]
            rules += [Rule(f"{ours}{mine}.weight", (f"{theirs}{hf_name}.weight",)) for mine, hf_name in norms.items()]
            # QK-norm gains follow their rows: over the whole projections (OLMo 2) or one head's (Gemma 3)
            qk_heads = {"olmo2": (H, KV), "gemma3_text": (1, 1)}.get(family)
            if qk_heads:
                rules += [
                    Rule(f"{ours}attention.{x}_norm.weight", (f"{theirs}self_attn.{x}_norm.weight",), heads=(h,))
                    for x, h in zip("qk", qk_heads)
                ]
    if not cfg.tie_embeddings:
        rules.append(Rule("output.weight", ("lm_head.weight",)))
    return rules


# ------------------------------------------------------------------------------------------- import


def _rope_from_hf(c: dict) -> dict:
    params = c.get("rope_parameters") or {**(c.get("rope_scaling") or {}), "rope_theta": c.get("rope_theta", 10000.0)}
    kind = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UserError("partial_rotary_factor != 1 (rotary on part of each head) has no minsota equivalent")
    rope = {"name": "rope", "theta": float(params.get("rope_theta", 10000.0))}
    if kind == "linear":
        return {**rope, "interpolate_factor": float(params["factor"])}
    if kind in ROPE_SCALINGS:
        scaling = {"original_max_position_embeddings": c["max_position_embeddings"], **params}
        if scaling.get("mscale") or scaling.get("mscale_all_dim"):
            raise UserError("YaRN with mscale/mscale_all_dim (DeepSeek style) has no minsota equivalent")
        return {**rope, "scaling": kind, **{k: scaling[k] for k in ROPE_SCALINGS[kind] if scaling.get(k) is not None}}
    if kind != "default":
        raise UserError(f"rope_type {kind!r} has no minsota equivalent (default, linear, llama3 and yarn do)")
    return rope


def _expect(c: dict, key: str, wanted, default=None):
    if c.get(key, default) != wanted:
        raise UserError(f"config.json: {key} = {c.get(key, default)!r} has no minsota equivalent (needs {wanted!r})")


def _model_from_hf(c: dict) -> dict:
    """A recipe's [model] table from an HF config.json."""
    family = c.get("model_type")
    if family == "gpt2":
        _expect(c, "scale_attn_weights", True, True)
        _expect(c, "scale_attn_by_inverse_layer_idx", False, False)
        activation = c.get("activation_function", "gelu_new")
        gelu = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}.get(activation)
        if gelu is None:
            raise UserError(f"config.json: activation_function = {activation!r} has no minsota equivalent")
        return {
            "dim": c["n_embd"],
            "n_layers": c["n_layer"],
            "n_heads": c["n_head"],
            "n_kv_heads": c["n_head"],
            "vocab_size": c["vocab_size"],
            "ffn_dim": c.get("n_inner") or 4 * c["n_embd"],
            "max_seq_len": c["n_positions"],
            "norm": {"name": "layernorm", "eps": c.get("layer_norm_epsilon", 1e-5)},
            "positional": "learned",
            "attention": {"name": "sdpa", "bias": True},
            "feedforward": {"name": "mlp", "approximate": gelu, "bias": True},
            "block": "prenorm",
            "tie_embeddings": c.get("tie_word_embeddings", True),
            "init_std": c.get("initializer_range", 0.02),
        }
    if family in GEMMA_FAMILIES:
        return _gemma_from_hf(c, family)
    if family in hf_moe.ARCHITECTURES:
        return hf_moe.model_from_hf(c, _rope_from_hf)
    if family not in ROTARY_FAMILIES:
        raise UserError(f"config.json: model_type {family!r} is not supported (one of {', '.join(ARCHITECTURES)})")
    _expect(c, "hidden_act", "silu")
    _expect(c, "mlp_bias", False, False)
    attention = {"name": "sdpa"}
    if c.get("attention_bias"):
        attention["bias"] = True
    if family == "mistral" and c.get("sliding_window"):
        attention["window"] = c["sliding_window"]
    if family == "olmo2":
        attention["qk_norm"] = "full"
    return {
        **hf_moe.rotary_shape(c),
        "positional": _rope_from_hf(c),
        "attention": attention,
        "feedforward": "swiglu",
        "block": {"name": "sandwich", "pre": False} if family == "olmo2" else "prenorm",
    }


def _period(items: list) -> list:
    """The shortest prefix whose repetition is ``items`` (cut at its length): Gemma 3's 5 local : 1 global."""
    return next(items[:p] for p in range(1, len(items) + 1) if all(x == items[i % p] for i, x in enumerate(items)))


def _gemma_from_hf(c: dict, family: str) -> dict:
    """[model] of a Gemma 2 / Gemma 3 text config: the global layers' components at [model], the local layers'
    differences in ``layer_types.local``, and HF's ``layer_types`` as the ``layer_pattern`` that cycles to it."""
    _expect(c, "hidden_activation", "gelu_pytorch_tanh")
    _expect(c, "attention_bias", False, False)
    if c.get("use_bidirectional_attention"):
        raise UserError("config.json: use_bidirectional_attention has no minsota equivalent (it is a decoder)")
    heads, softcap = c["num_attention_heads"], c.get("attn_logit_softcapping")
    attention = {"name": "math" if softcap else "sdpa", "scale": c["query_pre_attn_scalar"] ** -0.5}
    if softcap:
        attention["softcap"] = float(softcap)
    if family == "gemma3_text":
        attention["qk_norm"] = "head"
    ropes = c.get("rope_parameters") or {}
    if family == "gemma3_text":  # a RoPE per layer type (local θ 10000, global 1e6 and any scaling)
        rope = {kind: _rope_from_hf({**c, "rope_parameters": ropes[kind]}) for kind in HF_LAYER_TYPES}
    else:
        rope = dict.fromkeys(HF_LAYER_TYPES, _rope_from_hf(c))
    types = {
        "full_attention": {"attention": attention, "positional": rope["full_attention"]},
        "sliding_attention": {
            "attention": {**attention, "window": c["sliding_window"]},
            "positional": rope["sliding_attention"],
        },
    }
    pattern = _period(list(c["layer_types"]))
    unknown = set(pattern) - set(HF_LAYER_TYPES)
    if unknown:
        raise UserError(f"config.json: layer_types {sorted(unknown)} have no minsota equivalent")
    top = types["full_attention"]
    norm = {"name": "rmsnorm", "eps": c["rms_norm_eps"], "offset": 1.0}
    return {
        "dim": c["hidden_size"],
        "n_layers": c["num_hidden_layers"],
        "n_heads": heads,
        "n_kv_heads": c.get("num_key_value_heads") or heads,
        "head_dim": c["head_dim"],
        "vocab_size": c["vocab_size"],
        "ffn_dim": c["intermediate_size"],
        "max_seq_len": c["max_position_embeddings"],
        "norm": norm,
        "positional": top["positional"],
        "attention": top["attention"],
        "feedforward": {"name": "geglu", "approximate": "tanh"},
        "block": "sandwich",
        "tie_embeddings": c.get("tie_word_embeddings", True),
        "init_std": c.get("initializer_range", 0.02),
        "embed_scale": c["hidden_size"] ** 0.5,
        "logit_softcap": float(c.get("final_logit_softcapping") or 0.0),
        "layer_pattern": [HF_LAYER_TYPES[t] for t in pattern],
        "layer_types": {
            HF_LAYER_TYPES[t]: {k: v for k, v in types[t].items() if v != top[k]} for t in dict.fromkeys(pattern)
        },
    }


def _hf_directory(path) -> Path:
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    if not (directory / "config.json").is_file():
        raise UserError(f"{path}: not a Hugging Face model directory (no config.json)")
    return directory


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(_read_json(index)["weight_map"].values()))
        except (KeyError, AttributeError, TypeError):
            raise UserError(f"{index}: no weight_map of weight names to shard files") from None
    elif (directory / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise UserError(f"{directory}: no model.safetensors (or sharded index); only safetensors weights are read")
    weights = {}
    for shard in shards:
        try:
            weights.update(load_file(str(directory / shard)))
        except (OSError, SafetensorError) as e:
            raise UserError(f"{directory / shard}: not a readable safetensors file ({e})") from None
    return weights


def _with_base_prefix(hf: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """Weights saved from the base model (the Hub's gpt2 and distilgpt2: ``wte.weight``, ``h.0.attn.c_attn.weight``,
    no ``lm_head``) under the names the LM-head model gives them, as `from_pretrained` accepts them. Tensors no rule
    reads (``h.0.attn.bias`` masks) are left for the rules to ignore."""
    prefix = BASE_PREFIXES[family]
    if any(name.startswith(prefix) for name in hf):
        return hf
    return {name if name.startswith("lm_head.") else prefix + name: tensor for name, tensor in hf.items()}


def read_hf(path) -> tuple[Recipe, dict[str, torch.Tensor]]:
    """(recipe, minsota state dict) of an HF directory (or a file inside it)."""
    directory = _hf_directory(path)
    config = _read_json(directory / "config.json")
    try:
        model = _model_from_hf(config)
    except KeyError as e:
        raise UserError(f"{directory / 'config.json'}: no {e.args[0]!r}") from None
    has_tokenizer = any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))
    recipe = recipe_from_dict(
        {
            "name": directory.name,
            "description": f"imported from Hugging Face {config.get('model_type')} checkpoint {directory.resolve()}",
            "model": model,
            "train": {"seq_len": min(TrainConfig.seq_len, model["max_seq_len"])},  # a short context caps the default
            "data": {"tokenizer": str(directory.resolve())} if has_tokenizer else {},  # the checkpoint's own tokenizer
        },
        str(directory / "config.json"),
    )
    hf = _with_base_prefix(_read_weights(directory), config["model_type"])
    rules = _rules(recipe.model, layer_specs(recipe.model), config["model_type"], recipe.model.ffn_dim)
    try:
        state = {rule.ours: rule.load(hf) for rule in rules}
    except KeyError as e:
        raise UserError(f"{directory}: weights lack {e.args[0]} that config.json implies") from None
    if recipe.model.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    return recipe, state


def load_hf(path) -> Decoder:
    """A minsota Decoder with the weights of an HF Llama, Mistral, OLMo 2, GPT-2, Gemma 2 or Gemma 3 directory."""
    recipe, state = read_hf(path)
    model = build_model(recipe)
    model.load_state_dict(state, strict=True)
    return model


def _empty_target(path: Path) -> Path:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"{path}: exists and is not an empty directory (choose a new one)")
    return path


def import_to_run(hf_dir, run_dir) -> Path:
    """Write RUN_DIR/recipe.json and RUN_DIR/checkpoints/step-0 (weights-only) from an HF directory; returns
    the checkpoint. `minsota train --resume RUN_DIR` continues from it as a fresh run."""
    run_dir = _empty_target(Path(run_dir))
    recipe, state = read_hf(hf_dir)
    recipe_dict = recipe_record(recipe)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.write_json(run_dir / checkpoint.RECIPE, recipe_dict)
    return checkpoint.save(run_dir / "checkpoints", 0, model=state, recipe=recipe_dict)


# ------------------------------------------------------------------------------------------- export


def _options(spec: dict, key: str, names: tuple[str, ...], family: str, **allowed) -> dict:
    """The options of a layer's ``key`` component (defaults from ``allowed``), refusing a component or option HF
    cannot hold."""
    name, options = component(spec[key])
    if name not in names:
        raise UserError(
            f"cannot export to Hugging Face {family}: model.{key} = '{name}' (it needs {' or '.join(names)})"
        )
    unknown = [o for o in options if o not in allowed]
    if unknown:
        raise UserError(f"cannot export to Hugging Face {family}: model.{key} option {unknown[0]} has no equivalent")
    return {**allowed, **options}


def _refuse(condition: bool, family: str, what: str):
    if condition:
        raise UserError(f"cannot export to Hugging Face {family}: {what}")


def _rope_to_hf(positional, family: str) -> dict:
    """``rope_theta`` and ``rope_scaling`` config keys (spelt as transformers 4.x wrote them; 5.x reads them too)."""
    name, options = component(positional)
    _refuse(name != "rope", family, f"model.positional = '{name}' (it needs rope)")
    options = dict(options)
    theta, scaling = options.pop("theta", 10000.0), options.pop("scaling", None)
    factor = options.pop("interpolate_factor", 1.0)
    _refuse(
        options.pop("use_xpos", False) or options.pop("theta_rescale_factor", 1.0) != 1,
        family,
        "xPos and NTK theta rescaling have no HF equivalent",
    )
    options.pop("xpos_scale_base", None)
    if scaling is not None:
        return {"rope_theta": theta, "rope_scaling": {"rope_type": scaling, **options}}
    return {"rope_theta": theta, "rope_scaling": {"rope_type": "linear", "factor": factor} if factor != 1 else None}


ATTENTION_OPTIONS = {"bias": False, "qk_norm": "none", "window": 0, "softcap": 0.0, "scale": None}


def _config_to_hf(cfg: ModelConfig, spec: dict, family: str, ffn_dim: int) -> dict:
    """The config of a family whose layers are all alike (``spec``: every layer's components)."""
    _refuse(
        not cfg.final_norm or cfg.logit_softcap or cfg.embed_scale != 1,
        family,
        "final_norm = false, logit_softcap and embed_scale have no equivalent",
    )
    common = hf_moe.config_base(cfg)
    attention = _options(spec, "attention", ("sdpa", "math"), family, **ATTENTION_OPTIONS)
    _refuse(
        attention["softcap"] or attention["scale"] not in (None, cfg.head_dim**-0.5),
        family,
        "attention softcap and scale have no equivalent",
    )
    if family == "gpt2":
        norm = _options(spec, "norm", ("layernorm",), family, eps=1e-5, bias=True)
        ff = _options(spec, "feedforward", ("mlp",), family, approximate="none", bias=False)
        _options(spec, "block", ("prenorm",), family)
        _refuse(not (norm["bias"] and ff["bias"] and attention["bias"]), family, "GPT-2 has biases everywhere")
        _refuse(
            attention["window"]
            or attention["qk_norm"] != "none"
            or cfg.n_kv_heads != cfg.n_heads
            or cfg.head_dim * cfg.n_heads != cfg.dim,
            family,
            "GPT-2 attention is plain multi-head",
        )
        return {
            **common,
            "n_embd": cfg.dim,
            "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads,
            "n_inner": ffn_dim,
            "n_positions": cfg.max_seq_len,
            "layer_norm_epsilon": norm["eps"],
            "activation_function": "gelu_new" if ff["approximate"] == "tanh" else "gelu",
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
        }
    norm = _options(spec, "norm", ("rmsnorm",), family, eps=1e-5)
    _options(spec, "feedforward", ("swiglu",), family)
    block = _options(spec, "block", ("sandwich",) if family == "olmo2" else ("prenorm",), family, pre=True)
    _refuse(family == "olmo2" and block["pre"], family, "OLMo 2 norms only the sublayer outputs (sandwich pre = false)")
    _refuse(
        attention["qk_norm"] != ("full" if family == "olmo2" else "none"),
        family,
        f"attention qk_norm = {attention['qk_norm']!r}",
    )
    _refuse(attention["window"] and family != "mistral", family, "sliding windows need the mistral family")
    _refuse(attention["bias"] and family == "mistral", family, "Mistral has no attention biases")
    _refuse(
        family == "olmo2" and cfg.head_dim * cfg.n_heads != cfg.dim, family, "OLMo 2 needs head_dim = dim / n_heads"
    )
    config = {
        **common,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "intermediate_size": ffn_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": norm["eps"],
        "hidden_act": "silu",
        **_rope_to_hf(spec["positional"], family),
    }
    if family != "olmo2":
        config["head_dim"] = cfg.head_dim
    if family == "mistral":
        config["sliding_window"] = attention["window"]
    else:
        config["attention_bias"] = attention["bias"]
    return config


def _gemma_config_to_hf(cfg: ModelConfig, specs: list[dict], family: str, ffn_dim: int) -> dict:
    """Gemma 2 / 3: each layer is sliding (its attention has a window) or full; what else a layer holds must be
    the same for all of its kind (Gemma 2: for all layers)."""
    kinds = ["sliding_attention" if component(s["attention"])[1].get("window") else "full_attention" for s in specs]
    for key in ("norm", "feedforward", "block", *(("positional",) if family == "gemma2" else ())):
        _refuse(any(s[key] != specs[0][key] for s in specs), family, f"its layers differ in model.{key}")
    of_kind = {}
    for spec, kind in zip(specs, kinds):
        _refuse(of_kind.setdefault(kind, spec) != spec, family, f"two {kind} layers differ")
    attentions = {
        kind: _options(spec, "attention", ("sdpa", "math"), family, **ATTENTION_OPTIONS)
        for kind, spec in of_kind.items()
    }
    shared = [{k: v for k, v in a.items() if k != "window"} for a in attentions.values()]
    _refuse(any(a != shared[0] for a in shared), family, "local and global attention differ beyond the window")
    attention = shared[0]
    _refuse(
        attention["bias"] or attention["qk_norm"] != ("head" if family == "gemma3_text" else "none"),
        family,
        f"attention bias / qk_norm = {attention['qk_norm']!r}",
    )
    norm = _options(specs[0], "norm", ("rmsnorm",), family, eps=1e-6, offset=0.0)
    ff = _options(specs[0], "feedforward", ("geglu",), family, approximate="none")
    block = _options(specs[0], "block", ("sandwich",), family, pre=True)
    _refuse(
        norm["offset"] != 1 or ff["approximate"] != "tanh" or not block["pre"],
        family,
        "Gemma has (1 + w) RMSNorm (offset = 1.0), tanh-GeGLU and sandwich norms",
    )
    _refuse(
        not cfg.final_norm or not math.isclose(cfg.embed_scale, cfg.dim**0.5, rel_tol=1e-12),
        family,
        "it needs the final norm and embed_scale √dim",
    )
    ropes = {kind: _rope_to_hf(spec["positional"], family) for kind, spec in of_kind.items()}
    scalar = (attention["scale"] or cfg.head_dim**-0.5) ** -2  # scale = query_pre_attn_scalar^-0.5, an integer
    _refuse(abs(scalar - round(scalar)) > 1e-6 * scalar, family, f"attention scale^-2 = {scalar} is not an integer")
    config = {
        **hf_moe.config_base(cfg),
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": ffn_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": norm["eps"],
        "hidden_activation": "gelu_pytorch_tanh",
        "layer_types": kinds,
        "sliding_window": attentions.get("sliding_attention", {}).get("window") or None,
        "query_pre_attn_scalar": round(scalar),
        "attn_logit_softcapping": attention["softcap"] or None,
        "final_logit_softcapping": cfg.logit_softcap or None,
    }
    if family == "gemma2":
        return {**config, **next(iter(ropes.values()))}
    config["rope_parameters"] = {
        kind: {"rope_type": "default", "rope_theta": rope["rope_theta"], **(rope["rope_scaling"] or {})}
        for kind, rope in ropes.items()
    }
    return config


def _layer_family(spec: dict) -> str:
    """The HF family one layer's components belong to."""
    if component(spec["positional"])[0] == "learned":
        return "gpt2"
    block, options = component(spec["block"])
    attention = component(spec["attention"])[1]
    if block == "sandwich" and options.get("pre", True):
        return "gemma3_text" if attention.get("qk_norm") == "head" else "gemma2"
    if block == "sandwich":
        return "olmo2"
    return "mistral" if attention.get("window") else "llama"


def _family(decoder: Decoder) -> str:
    """The family every layer belongs to; outside Gemma (whose layers differ by design) all layers alike."""
    if hf_moe.family(decoder.specs):  # experts or latent attention (DeepSeek's layers differ by design too)
        return hf_moe.family(decoder.specs)
    families = sorted({_layer_family(spec) for spec in decoder.specs})
    _refuse(len(families) > 1, " / ".join(families), "its layers belong to different families")
    family = families[0]
    _refuse(
        family not in GEMMA_FAMILIES and any(s != decoder.specs[0] for s in decoder.specs),
        family,
        "its layers differ, and this family has one kind of layer",
    )
    return family


def hf_config(decoder: Decoder):
    """The `transformers` config ``decoder`` exports as; UserError naming the recipe key no family can hold."""
    from transformers import AutoConfig

    family, cfg = _family(decoder), decoder.cfg
    if family in hf_moe.ARCHITECTURES:
        config = hf_moe.config_to_hf(cfg, decoder.specs, family, _rope_to_hf)
    elif family in GEMMA_FAMILIES:
        config = _gemma_config_to_hf(cfg, decoder.specs, family, _ffn_dim(decoder, family))
    else:
        config = _config_to_hf(cfg, decoder.specs[0], family, _ffn_dim(decoder, family))
    return AutoConfig.for_model(
        family,
        architectures=[ARCHITECTURES[family]],
        dtype=str(decoder.tok_embeddings.weight.dtype).removeprefix("torch."),
        **config,
    )


def _ffn_dim(decoder: Decoder, family: str) -> int:
    """The built feed-forward width (whether or not ffn_dim was set), the same in every layer: HF has one."""
    if family in hf_moe.ARCHITECTURES:  # read per layer by minsota.hf_moe
        return decoder.cfg.ffn_width(8 / 3)
    widths = {layer.feed_forward.w2.weight.shape[1] for layer in decoder.layers}
    _refuse(len(widths) > 1, family, f"its layers' feed-forward widths differ ({sorted(widths)})")
    return widths.pop()


def save_hf(decoder: Decoder, out_dir) -> Path:
    """Write ``decoder`` as an HF directory (config.json + model.safetensors) of the family its recipe matches."""
    config, out_dir = hf_config(decoder), Path(out_dir)
    ours = decoder.state_dict()
    rules = _rules(decoder.cfg, decoder.specs, config.model_type, _ffn_dim(decoder, config.model_type))
    state = {name: tensor for rule in rules for name, tensor in rule.save(ours[rule.ours]).items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out_dir)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir


def export_run(run_dir, out_dir, plugin_specs=()) -> Path:
    """Export a run's newest valid checkpoint (or ``RUN_DIR/checkpoints/step-N`` itself) as an HF directory."""
    out_dir = _empty_target(Path(out_dir))
    recipe, model, _ = load_run(run_dir, plugin_specs=plugin_specs, device="cpu")
    save_hf(model, out_dir)
    _export_tokenizer(recipe, out_dir)
    return out_dir


def _export_tokenizer(recipe: Recipe, out_dir: Path) -> None:
    """The run's tokenizer beside the weights, so AutoTokenizer loads the export too. The model is exported
    either way: a tokenizer with no Hugging Face form, or one unavailable here, is a warning."""
    try:
        tokenizer = build_tokenizer(recipe)
    except UserError as e:
        print(f"minsota: warning: tokenizer not exported: {e}", file=sys.stderr)
        return
    if not hasattr(tokenizer, "save_pretrained"):
        print(
            f"minsota: warning: tokenizer '{tokenizer.name}' has no Hugging Face form; {out_dir} holds the model alone",
            file=sys.stderr,
        )
        return
    tokenizer.save_pretrained(out_dir)
