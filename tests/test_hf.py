"""Hugging Face parity: random-init HF models built from toy configs (no download) are imported, their logits
compared with minsota's (fp32, max abs diff <= 1e-5 · max |HF logits|), exported back and reloaded by
`transformers.AutoModelForCausalLM.from_pretrained` with the same logits."""

import json

import pytest
import torch
import transformers

from minsota import hf
from minsota.errors import UserError
from minsota.loader import load_recipe
from minsota.model import build_model
from minsota.reference import assert_close

from conftest import HF_TOY, HF_VOCAB

VOCAB, T = HF_VOCAB, 24
ROTARY = HF_TOY  # the Llama-like (rotary) families start from it as it is
GEMMA = dict(
    num_hidden_layers=4,
    head_dim=16,
    sliding_window=5,
    query_pre_attn_scalar=20,
    rms_norm_eps=1e-6,
    attn_implementation="eager",
)
SCALED = dict(max_position_embeddings=64, rope_theta=500000.0)  # toy original context 16 < T: the scaling acts
CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", ROTARY),
    "llama-gqa1-bias-tied": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {**ROTARY, "num_key_value_heads": 1, "attention_bias": True, "tie_word_embeddings": True},
    ),
    "llama-3.1-scaling": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            **ROTARY,
            **SCALED,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        },
    ),
    "llama-yarn": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            **ROTARY,
            **SCALED,
            "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        },
    ),
    "llama-linear": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {**ROTARY, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    ),
    "mistral-window": ("MistralConfig", "MistralForCausalLM", {**ROTARY, "sliding_window": 5}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {**ROTARY, "rms_norm_eps": 1e-6}),
    # Gemma: local/global layers (window 5 < T), soft-capping that acts (caps near the toy scores and logits), a
    # query_pre_attn_scalar that is not head_dim, head_dim != dim / heads, (1 + w) norms perturbed off 1
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {**ROTARY, **GEMMA, "attn_logit_softcapping": 0.5, "final_logit_softcapping": 0.7},
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            **ROTARY,
            **GEMMA,
            "num_hidden_layers": 7,
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
            },
        },
    ),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32, initializer_range=0.1),
    ),
    "gpt2-exact-gelu-untied": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(
            n_embd=32,
            n_layer=2,
            n_head=4,
            vocab_size=VOCAB,
            n_positions=32,
            n_inner=40,
            activation_function="gelu",
            tie_word_embeddings=False,
            initializer_range=0.1,
        ),
    ),
}


def hf_model(case, directory):
    config_class, model_class, kwargs = CASES[case]
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**kwargs)).eval()
    with torch.no_grad():  # norm gains off 1 and biases off 0, so a misplaced one shows
        for _name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(directory)
    return model


def logits_of(model, tokens):
    with torch.no_grad():
        out = model(tokens)
    return getattr(out, "logits", out)


@pytest.fixture
def tokens():
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", CASES)
def test_import_and_export_match_hugging_face(case, tokens, tmp_path):
    theirs = hf_model(case, tmp_path / "hf")
    expected = logits_of(theirs, tokens)
    ours = hf.load_hf(tmp_path / "hf")
    assert ours.cfg.vocab_size == VOCAB and ours.num_parameters() == theirs.num_parameters()
    assert_close(logits_of(ours, tokens), expected, 1e-5, f"{case}: imported logits vs HF")

    hf.save_hf(ours, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded) is type(theirs)
    assert_close(logits_of(reloaded, tokens), expected, 1e-5, f"{case}: exported logits in HF vs HF")


@pytest.mark.parametrize("case", ["gpt2", "gpt2-exact-gelu-untied", "llama-gqa1-bias-tied"])
def test_import_of_weights_saved_without_the_base_model_prefix(case, tokens, tmp_path):
    """The Hub's gpt2 and distilgpt2 hold GPT2Model's weights (``wte.weight``, ``h.0.attn.c_attn.weight``, no
    ``lm_head`` when tied) beside old causal-mask buffers; `from_pretrained` adds ``transformer.``, as must we."""
    from safetensors.torch import save_file

    theirs = hf_model(case, tmp_path / "hf")
    expected = logits_of(theirs, tokens)
    state = {name: p.contiguous() for name, p in theirs.base_model.state_dict().items()}
    if not theirs.config.tie_word_embeddings:
        state["lm_head.weight"] = theirs.lm_head.weight.detach().contiguous()
    if case.startswith("gpt2"):
        positions = theirs.config.n_positions
        state["h.0.attn.bias"] = torch.ones(positions, positions, dtype=torch.bool).tril()[None, None]
        state["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    assert not any(name.startswith(("transformer.", "model.")) for name in state)
    save_file(state, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    reloaded = type(theirs).from_pretrained(tmp_path / "hf").eval()  # HF itself loads this layout
    assert_close(logits_of(reloaded, tokens), expected, 1e-5, f"{case}: HF from the bare layout")
    assert_close(logits_of(hf.load_hf(tmp_path / "hf"), tokens), expected, 1e-5, f"{case}: imported bare layout")


def save_word_tokenizer(directory):
    """A tokenizer of VOCAB words (no download) whose end of text, as in a bare tokenizer.json, is unnamed."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<|endoftext|>", "[UNK]", *(f"w{i}" for i in range(VOCAB - 2))]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(directory)


def test_cli_round_trip_through_a_run_directory(cli, tokens, tmp_path):
    theirs = hf_model("mistral-window", tmp_path / "hf")
    save_word_tokenizer(tmp_path / "hf")
    code, out, _ = cli("import-hf", tmp_path / "hf", tmp_path / "run")
    step = tmp_path / "run" / "checkpoints" / "step-0"
    assert code == 0 and str(step) in out and (step / "model.safetensors").is_file()
    recipe = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert recipe["model"]["attention"] == {"name": "sdpa", "window": 5} and recipe["model"]["vocab_size"] == VOCAB
    code, _, err = cli("import-hf", tmp_path / "hf", tmp_path / "run")
    assert code == 2 and "not an empty directory" in err and err.count("\n") == 1
    code, _, err = cli("export-hf", tmp_path / "run", tmp_path / "out")
    assert code == 0 and "warning" not in err
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert_close(logits_of(reloaded, tokens), logits_of(theirs, tokens), 1e-5, "run round trip")
    # the run's tokenizer went along, its end-of-text token now named
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.encode("w7 w98 w3", add_special_tokens=False) == [9, 100, 5] and tokenizer.eos_token_id == 0


@pytest.mark.parametrize("damage", ["config.json", "model.safetensors"])
def test_import_of_a_damaged_directory_is_one_line(cli, tmp_path, damage):
    hf_model("llama", tmp_path / "hf")
    target = tmp_path / "hf" / damage
    target.write_bytes(target.read_bytes()[:1000] if damage == "model.safetensors" else b"{")
    code, _, err = cli("import-hf", tmp_path / "hf", tmp_path / "run")
    assert code == 2 and "Traceback" not in err, err  # (above: the HF model's own save progress bar)
    assert err.strip().splitlines()[-1].startswith(f"minsota: error: {target}:"), err
    assert not (tmp_path / "run").exists()


def test_export_without_a_hugging_face_tokenizer_warns(cli, tmp_path):
    """A run with the byte tokenizer (no Hugging Face form) exports its model and says the tokenizer stayed."""
    code, _, err = cli(
        "train",
        "tiny",
        "--out",
        tmp_path / "run",
        "--set",
        "train.steps=1",
        "--set",
        "train.eval_batches=1",
        "--set",
        "train.sample_tokens=0",
    )
    assert code == 0, err
    code, _, err = cli("export-hf", tmp_path / "run", tmp_path / "out")
    assert code == 0 and err.strip() == (
        f"minsota: warning: tokenizer 'bytes' has no Hugging Face form; {tmp_path / 'out'} holds the model alone"
    )
    assert (tmp_path / "out" / "model.safetensors").is_file() and not (tmp_path / "out" / "tokenizer.json").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ({"model.feedforward": "geglu"}, "model.feedforward = 'geglu'"),
        ({"model.attention": {"name": "math", "softcap": 30.0}}, "softcap"),
        ({"model.positional": {"name": "rope", "use_xpos": True}}, "xPos"),
        ({"model.positional": "alibi"}, "model.positional = 'alibi'"),
    ],
)
def test_export_refuses_what_hugging_face_cannot_hold(override, message, tmp_path):
    model = build_model(load_recipe("tiny", {"model.n_layers": 1, **override}))
    with pytest.raises(UserError, match=message):
        hf.save_hf(model, tmp_path)


def test_import_refuses_unknown_families(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="model_type 'bert' is not supported"):
        hf.load_hf(tmp_path)


@pytest.mark.parametrize(
    "recipe_name, parameters",
    [
        ("mistral-7b", 7_241_732_096),
        ("llama-2-7b", 6_738_415_616),
        ("llama-3-8b", 8_030_261_248),
        ("llama-3.1-8b", 8_030_261_248),
        ("gpt2-small", 124_439_808),
        ("olmo2", 7_298_617_344),
    ],
)
def test_real_model_recipes_have_the_real_shapes(recipe_name, parameters):
    """Exact parameter counts on the meta device, and the same count from the HF model of the exported config."""
    ours = build_model(load_recipe(recipe_name), "meta")
    assert ours.num_parameters() == parameters
    with torch.device("meta"):
        theirs = transformers.AutoModelForCausalLM.from_config(hf.hf_config(ours))
    assert theirs.num_parameters() == parameters


# The published configs of google/gemma-2-2b and google/gemma-3-1b-pt (their config.json), as transformers builds them
GEMMA_SIZES = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "sliding_window",
)


def gemma_published(sizes: tuple, **own) -> dict:
    """A published Gemma config: the values of GEMMA_SIZES, in order, what both generations publish alike, and
    the keys of its generation alone (``own``)."""
    alike = dict(num_hidden_layers=26, head_dim=256, rms_norm_eps=1e-6, query_pre_attn_scalar=256)
    return dict(zip(GEMMA_SIZES, sizes, strict=True), **alike, **own)


PUBLISHED = {
    "gemma-2-2b": (
        "Gemma2Config",
        gemma_published(
            (256000, 2304, 9216, 8, 4, 8192, 4096), attn_logit_softcapping=50.0, final_logit_softcapping=30.0
        ),
    ),
    "gemma-3-1b": (
        "Gemma3TextConfig",
        gemma_published(
            (262144, 1152, 6912, 4, 1, 32768, 512), sliding_window_pattern=6, rope_theta=1e6, rope_local_base_freq=1e4
        ),
    ),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_gemma_recipes_are_the_published_models(cli, name):
    """`minsota show`'s parameter count equals the HF model's built from the published config (on "meta"), and the
    recipe exports as that config: layer types, window, caps, scalars and RoPE per layer type."""
    config_class, kwargs = PUBLISHED[name]
    published = getattr(transformers, config_class)(**kwargs)
    with torch.device("meta"):
        theirs = transformers.AutoModelForCausalLM.from_config(published)
    code, out, _ = cli("show", name)
    assert code == 0 and f"parameters: {theirs.num_parameters():,}\n" in out
    ours = hf.hf_config(build_model(load_recipe(name), "meta"))
    assert type(ours) is type(published)
    for key in (
        "layer_types",
        "sliding_window",
        "query_pre_attn_scalar",
        "attn_logit_softcapping",
        "final_logit_softcapping",
        "head_dim",
        "rms_norm_eps",
        "hidden_activation",
        "tie_word_embeddings",
    ):
        assert getattr(ours, key) == getattr(published, key), key
    assert ours.rope_parameters == published.rope_parameters


def test_a_layout_no_family_holds_is_refused_naming_why(tokens):
    layered = {"model.layer_pattern": ["a", "b"], "model.layer_types": {"a": {}, "b": {"feedforward": "geglu"}}}
    with pytest.raises(UserError, match="cannot export to Hugging Face llama: its layers differ"):
        hf.hf_config(build_model(load_recipe("tiny", layered), "meta"))
    gemma = load_recipe(
        "gemma-2-2b", {"model.layer_types.global.attention": {"name": "math", "softcap": 20.0}, "model.n_layers": 2}
    )
    with pytest.raises(UserError, match="gemma2: local and global attention differ beyond the window"):
        hf.hf_config(build_model(gemma, "meta"))
