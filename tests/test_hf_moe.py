"""Hugging Face parity for the expert and latent-attention families (random-init transformers models from toy
configs, no download): Mixtral, OLMoE, Qwen3-MoE and DeepSeek-V3 imported and exported with logits within 1e-5
(relative, fp32) of transformers' own, and the real-model recipes against the HF models built on "meta"."""

import pytest
import torch
import transformers

from minsota import hf
from minsota.loader import load_recipe
from minsota.model import build_model
from minsota.reference import assert_close

from conftest import HF_TOY, HF_VOCAB

VOCAB, T = HF_VOCAB, 24
BASE = dict(HF_TOY, num_hidden_layers=3)
DEEPSEEK = dict(
    BASE,
    rms_norm_eps=1e-6,
    num_key_value_heads=4,
    moe_intermediate_size=16,
    n_routed_experts=8,
    num_experts_per_tok=3,
    n_group=4,
    topk_group=2,
    n_shared_experts=2,
    routed_scaling_factor=2.5,
    first_k_dense_replace=1,
    q_lora_rank=24,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=12,
)
CASES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(BASE, num_local_experts=4, num_experts_per_tok=2)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(BASE, num_experts=4, num_experts_per_tok=2)),
    "qwen3-moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(BASE, num_experts=6, num_experts_per_tok=2, head_dim=16, moe_intermediate_size=24, norm_topk_prob=True),
    ),
    "deepseek-v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", DEEPSEEK),
    "deepseek-v3-yarn": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            DEEPSEEK,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 16,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
            },
        ),
    ),  # T = 24 > 16: it acts
    "deepseek-v3-plain-q": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(DEEPSEEK, q_lora_rank=None, n_group=1, topk_group=1, first_k_dense_replace=0),
    ),
}


def hf_model(case, directory):
    config_class, model_class, kwargs = CASES[case]
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**kwargs)).eval()
    with torch.no_grad():  # every tensor off its init (norm gains off 1, routers and the correction bias off 0)
        biases = [b for name, b in model.named_buffers() if name.endswith("e_score_correction_bias")]
        for p in [*model.parameters(), *biases]:
            p.add_(torch.randn_like(p) * (0.3 if p.ndim == 1 else 0.05))
    model.save_pretrained(directory)
    return model


def logits_of(model, tokens):
    with torch.no_grad():
        return getattr(out := model(tokens), "logits", out)


@pytest.mark.parametrize("case", CASES)
def test_import_and_export_match_hugging_face(case, tmp_path):
    tokens = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(1))
    theirs = hf_model(case, tmp_path / "hf")
    expected = logits_of(theirs, tokens)
    ours = hf.load_hf(tmp_path / "hf")
    assert ours.num_parameters() == theirs.num_parameters()
    assert_close(logits_of(ours, tokens), expected, 1e-5, f"{case}: imported logits vs HF")
    hf.save_hf(ours, tmp_path / "out")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(again) is type(theirs)
    assert_close(logits_of(again, tokens), expected, 1e-5, f"{case}: exported logits vs HF")


def test_the_routing_matters(tmp_path):
    """The comparison can fail: a shuffled expert bias changes DeepSeek's choice and the logits."""
    tokens = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(1))
    theirs = hf_model("deepseek-v3", tmp_path / "hf")
    ours = hf.load_hf(tmp_path / "hf")
    with torch.no_grad():
        for layer in ours.layers[1:]:
            layer.feed_forward.expert_bias.copy_(layer.feed_forward.expert_bias.flip(0) * 10)
    with pytest.raises(AssertionError):
        assert_close(logits_of(ours, tokens), logits_of(theirs, tokens), 1e-5, "shuffled bias")


def _meta_hf(config_class, model_class, **config):
    with torch.device("meta"):
        model = getattr(transformers, model_class)(getattr(transformers, config_class)(**config))
    return sum(p.numel() for p in model.parameters())


REAL = {  # the published configs (transformers' defaults for DeepSeek-V3 are V3's own)
    "mixtral-8x7b": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            num_local_experts=8,
            num_experts_per_tok=2,
            max_position_embeddings=32768,
        ),
    ),
    "olmoe-1b-7b": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(
            vocab_size=50304,
            hidden_size=2048,
            intermediate_size=1024,
            num_hidden_layers=16,
            num_attention_heads=16,
            num_key_value_heads=16,
            num_experts=64,
            num_experts_per_tok=8,
            max_position_embeddings=4096,
        ),
    ),
    "deepseek-v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", {}),
}


@pytest.mark.parametrize("recipe_name", REAL)
def test_real_model_recipes_have_the_published_sizes(recipe_name, cli):
    expected = _meta_hf(*REAL[recipe_name][:2], **REAL[recipe_name][2])
    model = build_model(load_recipe(recipe_name), device="meta")
    assert model.num_parameters() == expected
    code, out, _ = cli("show", recipe_name)
    assert code == 0 and f"parameters: {expected:,}" in out and "active parameters" in out


@pytest.mark.parametrize(
    "feedforward, attention, message",
    [
        ({"name": "moe", "score": "sigmoid"}, "sdpa", "mixtral: it routes by softmax"),
        ({"name": "moe", "shared_experts": 1}, {"name": "sdpa", "qk_norm": "head"}, "qwen3_moe: it routes by softmax"),
        ({"name": "moe", "balance": "aux"}, "mla", "deepseek_v3: it routes by sigmoid scores"),
    ],
)
def test_export_refuses_what_the_expert_families_cannot_hold(feedforward, attention, message, tmp_path):
    from minsota.errors import UserError

    model = build_model(
        load_recipe("tiny", {"model.n_layers": 1, "model.feedforward": feedforward, "model.attention": attention})
    )
    with pytest.raises(UserError, match=message):
        hf.save_hf(model, tmp_path)
