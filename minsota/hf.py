"""Hugging Face import and export for the Llama, Mistral (sliding window), OLMo 2 and GPT-2 families.

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
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from minsota import checkpoint
from minsota.data import build_tokenizer
from minsota.errors import UserError
from minsota.inference import load_run
from minsota.loader import recipe_from_dict, recipe_record
from minsota.model import Decoder, build_model
from minsota.recipe import ModelConfig, Recipe, TrainConfig, component

ROTARY_FAMILIES = ("llama", "mistral", "olmo2")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "olmo2": "Olmo2ForCausalLM",
                 "gpt2": "GPT2LMHeadModel"}
BASE_PREFIXES = {"llama": "model.", "mistral": "model.", "olmo2": "model.", "gpt2": "transformer."}  # base_model_prefix
ROPE_SCALINGS = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                 "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                          "attention_factor", "truncate")}


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


def _rules(cfg: ModelConfig, family: str, ffn_dim: int) -> list[Rule]:
    """Every tensor of a decoder of this family, minsota name <- HF names."""
    H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    attention = dict(component(cfg.attention)[1])
    if family == "gpt2":
        rules = [Rule("tok_embeddings.weight", ("transformer.wte.weight",)),
                 Rule("positional.wpe.weight", ("transformer.wpe.weight",)),
                 Rule("norm.weight", ("transformer.ln_f.weight",)), Rule("norm.bias", ("transformer.ln_f.bias",))]
        layer = [("attention_norm", "ln_1", False), ("attention.wqkv", "attn.c_attn", True),
                 ("attention.wo", "attn.c_proj", True), ("ffn_norm", "ln_2", False),
                 ("feed_forward.w1", "mlp.c_fc", True), ("feed_forward.w2", "mlp.c_proj", True)]
        for i in range(cfg.n_layers):
            rules += [Rule(f"layers.{i}.{ours}.{kind}", (f"transformer.h.{i}.{theirs}.{kind}",),
                           transpose=transpose and kind == "weight")
                      for ours, theirs, transpose in layer for kind in ("weight", "bias")]
    else:
        rules = [Rule("tok_embeddings.weight", ("model.embed_tokens.weight",)),
                 Rule("norm.weight", ("model.norm.weight",))]
        norms = ({"attention_out_norm": "post_attention_layernorm", "ffn_out_norm": "post_feedforward_layernorm"}
                 if family == "olmo2" else {"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"})
        kinds = ("weight", "bias") if attention.get("bias") else ("weight",)
        for i in range(cfg.n_layers):
            ours, theirs = f"layers.{i}.", f"model.layers.{i}."
            rules += [Rule(f"{ours}attention.wqkv.{kind}", tuple(f"{theirs}self_attn.{x}_proj.{kind}" for x in "qkv"),
                           (H * hd, KV * hd, KV * hd), (H, KV, 0)) for kind in kinds]
            rules += [Rule(f"{ours}attention.wo.{kind}", (f"{theirs}self_attn.o_proj.{kind}",)) for kind in kinds]
            rules += [Rule(f"{ours}feed_forward.w13.weight",
                           (f"{theirs}mlp.gate_proj.weight", f"{theirs}mlp.up_proj.weight"), (ffn_dim, ffn_dim)),
                      Rule(f"{ours}feed_forward.w2.weight", (f"{theirs}mlp.down_proj.weight",))]
            rules += [Rule(f"{ours}{mine}.weight", (f"{theirs}{hf_name}.weight",)) for mine, hf_name in norms.items()]
            if family == "olmo2":  # QK-norm over the whole projections: gains follow their rows
                rules += [Rule(f"{ours}attention.{x}_norm.weight", (f"{theirs}self_attn.{x}_norm.weight",), heads=(h,))
                          for x, h in (("q", H), ("k", KV))]
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
        return {"dim": c["n_embd"], "n_layers": c["n_layer"], "n_heads": c["n_head"], "n_kv_heads": c["n_head"],
                "vocab_size": c["vocab_size"], "ffn_dim": c.get("n_inner") or 4 * c["n_embd"],
                "max_seq_len": c["n_positions"], "norm": {"name": "layernorm", "eps": c.get("layer_norm_epsilon", 1e-5)},
                "positional": "learned", "attention": {"name": "sdpa", "bias": True},
                "feedforward": {"name": "mlp", "approximate": gelu, "bias": True}, "block": "prenorm",
                "tie_embeddings": c.get("tie_word_embeddings", True), "init_std": c.get("initializer_range", 0.02)}
    if family not in ROTARY_FAMILIES:
        raise UserError(f"config.json: model_type {family!r} is not supported (one of {', '.join(ARCHITECTURES)})")
    _expect(c, "hidden_act", "silu")
    _expect(c, "mlp_bias", False, False)
    heads = c["num_attention_heads"]
    attention = {"name": "sdpa"}
    if c.get("attention_bias"):
        attention["bias"] = True
    if family == "mistral" and c.get("sliding_window"):
        attention["window"] = c["sliding_window"]
    if family == "olmo2":
        attention["qk_norm"] = "full"
    return {"dim": c["hidden_size"], "n_layers": c["num_hidden_layers"], "n_heads": heads,
            "n_kv_heads": c.get("num_key_value_heads") or heads, "head_dim": c.get("head_dim") or c["hidden_size"] // heads,
            "vocab_size": c["vocab_size"], "ffn_dim": c["intermediate_size"], "max_seq_len": c["max_position_embeddings"],
            "norm": {"name": "rmsnorm", "eps": c["rms_norm_eps"]}, "positional": _rope_from_hf(c), "attention": attention,
            "feedforward": "swiglu", "block": {"name": "sandwich", "pre": False} if family == "olmo2" else "prenorm",
            "tie_embeddings": c.get("tie_word_embeddings", False), "init_std": c.get("initializer_range", 0.02)}


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
    recipe = recipe_from_dict({
        "name": directory.name,
        "description": f"imported from Hugging Face {config.get('model_type')} checkpoint {directory.resolve()}",
        "model": model,
        "train": {"seq_len": min(TrainConfig.seq_len, model["max_seq_len"])},  # a short context caps the default
        "data": {"tokenizer": str(directory.resolve())} if has_tokenizer else {},  # the checkpoint's own tokenizer
    }, str(directory / "config.json"))
    hf = _with_base_prefix(_read_weights(directory), config["model_type"])
    ffn_dim = recipe.model.ffn_dim
    try:
        state = {rule.ours: rule.load(hf) for rule in _rules(recipe.model, config["model_type"], ffn_dim)}
    except KeyError as e:
        raise UserError(f"{directory}: weights lack {e.args[0]} that config.json implies") from None
    if recipe.model.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    return recipe, state


def load_hf(path) -> Decoder:
    """A minsota Decoder with the weights of an HF Llama, Mistral, OLMo 2 or GPT-2 directory."""
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


def _options(cfg: ModelConfig, key: str, names: tuple[str, ...], family: str, **allowed) -> dict:
    """The options of ``model.<key>`` (defaults from ``allowed``), refusing a component or option HF cannot hold."""
    name, options = component(getattr(cfg, key))
    if name not in names:
        raise UserError(f"cannot export to Hugging Face {family}: model.{key} = '{name}' (it needs {' or '.join(names)})")
    unknown = [o for o in options if o not in allowed]
    if unknown:
        raise UserError(f"cannot export to Hugging Face {family}: model.{key} option {unknown[0]} has no equivalent")
    return {**allowed, **options}


def _refuse(condition: bool, family: str, what: str):
    if condition:
        raise UserError(f"cannot export to Hugging Face {family}: {what}")


def _rope_to_hf(cfg: ModelConfig, family: str) -> dict:
    """``rope_theta`` and ``rope_scaling`` config keys (spelt as transformers 4.x wrote them; 5.x reads them too)."""
    name, options = component(cfg.positional)
    _refuse(name != "rope", family, f"model.positional = '{name}' (it needs rope)")
    options = dict(options)
    theta, scaling = options.pop("theta", 10000.0), options.pop("scaling", None)
    factor = options.pop("interpolate_factor", 1.0)
    _refuse(options.pop("use_xpos", False) or options.pop("theta_rescale_factor", 1.0) != 1, family,
            "xPos and NTK theta rescaling have no HF equivalent")
    options.pop("xpos_scale_base", None)
    if scaling is not None:
        return {"rope_theta": theta, "rope_scaling": {"rope_type": scaling, **options}}
    return {"rope_theta": theta, "rope_scaling": {"rope_type": "linear", "factor": factor} if factor != 1 else None}


def _config_to_hf(cfg: ModelConfig, family: str, ffn_dim: int) -> dict:
    _refuse(not cfg.final_norm or cfg.logit_softcap, family, "final_norm = false and logit_softcap have no equivalent")
    common = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
              "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    attention = _options(cfg, "attention", ("sdpa", "math"), family, bias=False, qk_norm="none", window=0, softcap=0.0)
    _refuse(attention["softcap"], family, "attention softcap has no equivalent")
    if family == "gpt2":
        norm = _options(cfg, "norm", ("layernorm",), family, eps=1e-5, bias=True)
        ff = _options(cfg, "feedforward", ("mlp",), family, approximate="none", bias=False)
        _options(cfg, "block", ("prenorm",), family)
        _refuse(not (norm["bias"] and ff["bias"] and attention["bias"]), family, "GPT-2 has biases everywhere")
        _refuse(attention["window"] or attention["qk_norm"] != "none" or cfg.n_kv_heads != cfg.n_heads
                or cfg.head_dim * cfg.n_heads != cfg.dim, family, "GPT-2 attention is plain multi-head")
        return {**common, "n_embd": cfg.dim, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": ffn_dim,
                "n_positions": cfg.max_seq_len, "layer_norm_epsilon": norm["eps"],
                "activation_function": "gelu_new" if ff["approximate"] == "tanh" else "gelu",
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    norm = _options(cfg, "norm", ("rmsnorm",), family, eps=1e-5)
    _options(cfg, "feedforward", ("swiglu",), family)
    block = _options(cfg, "block", ("sandwich",) if family == "olmo2" else ("prenorm",), family, pre=True)
    _refuse(family == "olmo2" and block["pre"], family, "OLMo 2 norms only the sublayer outputs (sandwich pre = false)")
    _refuse(attention["qk_norm"] != ("full" if family == "olmo2" else "none"), family,
            f"attention qk_norm = {attention['qk_norm']!r}")
    _refuse(attention["window"] and family != "mistral", family, "sliding windows need the mistral family")
    _refuse(attention["bias"] and family == "mistral", family, "Mistral has no attention biases")
    _refuse(family == "olmo2" and cfg.head_dim * cfg.n_heads != cfg.dim, family, "OLMo 2 needs head_dim = dim / n_heads")
    config = {**common, "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
              "num_key_value_heads": cfg.n_kv_heads, "intermediate_size": ffn_dim, "max_position_embeddings": cfg.max_seq_len,
              "rms_norm_eps": norm["eps"], "hidden_act": "silu", **_rope_to_hf(cfg, family)}
    if family != "olmo2":
        config["head_dim"] = cfg.head_dim
    if family == "mistral":
        config["sliding_window"] = attention["window"]
    else:
        config["attention_bias"] = attention["bias"]
    return config


def _family(cfg: ModelConfig) -> str:
    if component(cfg.positional)[0] == "learned":
        return "gpt2"
    if component(cfg.block)[0] == "sandwich":
        return "olmo2"
    return "mistral" if component(cfg.attention)[1].get("window") else "llama"


def hf_config(decoder: Decoder):
    """The `transformers` config ``decoder`` exports as; UserError naming the recipe key no family can hold."""
    from transformers import AutoConfig

    family = _family(decoder.cfg)
    return AutoConfig.for_model(family, architectures=[ARCHITECTURES[family]],
                                dtype=str(decoder.tok_embeddings.weight.dtype).removeprefix("torch."),
                                **_config_to_hf(decoder.cfg, family, _ffn_dim(decoder)))


def _ffn_dim(decoder: Decoder) -> int:
    return decoder.layers[0].feed_forward.w2.weight.shape[1]  # the built width, whether or not ffn_dim was set


def save_hf(decoder: Decoder, out_dir) -> Path:
    """Write ``decoder`` as an HF directory (config.json + model.safetensors) of the family its recipe matches."""
    config, out_dir = hf_config(decoder), Path(out_dir)
    ours = decoder.state_dict()
    rules = _rules(decoder.cfg, config.model_type, _ffn_dim(decoder))
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
        print(f"minsota: warning: tokenizer '{tokenizer.name}' has no Hugging Face form; {out_dir} holds the "
              f"model alone", file=sys.stderr)
        return
    tokenizer.save_pretrained(out_dir)
