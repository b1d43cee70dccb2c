"""Cached decoding against the full forward, sampling, and the `generate` / `eval` commands on a trained run."""

import math

import pytest
import torch

from minsota import build_model, load_recipe
from minsota.compare import read_metrics
from minsota.generation import KVCaches, generate, sample_next
from minsota.inference import load_run
from minsota.reference import assert_close
from minsota.train import train

# every positional encoding through sdpa's masked path (xPos: its scales must not depend on how many tokens a
# call brings), and each kernel option (the bias with both kernels)
CASES = [
    ("rope", "sdpa"),
    ("learned", "sdpa"),
    ("none", "sdpa"),
    ("alibi", "sdpa"),
    ("rope", "math"),
    ({"name": "rope", "use_xpos": True}, "sdpa"),
    ("rope", {"name": "sdpa", "window": 8}),
    ("alibi", {"name": "math", "window": 8, "softcap": 5.0}),
    ("rope", "mla"),
    ("alibi", {"name": "mla", "q_lora_rank": 48}),
]  # mla: the absorbed latent cache


def random_model(positional="rope", attention="sdpa"):
    # init_std 0.1 (not 0.02) so attention patterns, and so a missing or misplaced key, move the logits
    recipe = load_recipe("tiny", {"model.positional": positional, "model.attention": attention, "model.init_std": 0.1})
    torch.manual_seed(0)
    return build_model(recipe).eval()


@pytest.mark.parametrize("positional, attention", CASES, ids=str)
@torch.no_grad()
def test_cached_decoding_gives_the_full_forward_logits(positional, attention):
    model = random_model(positional, attention)
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(24).expand(2, 24)
    full = model(tokens)
    with KVCaches(model) as caches:
        assert len(caches.modules) == model.cfg.n_layers
        steps = [model(tokens[:, :10], positions[:, :10])]  # prefill, then one token at a time
        steps += [model(tokens[:, t : t + 1], positions[:, t : t + 1]) for t in range(10, 24)]
    # fp32 within 1e-5 of the logits' scale, as every parity check (the cache only reorders the same sums)
    assert_close(torch.cat(steps, dim=1), full, 1e-5, f"{positional}/{attention} cached vs full")
    alone = model(tokens[:, -1:], positions[:, -1:])  # the last token without its past: the test can fail
    assert (alone - full[:, -1:]).abs().max() > 0.1
    assert all(m.kv_cache is None for m in caches.modules)  # nothing left behind for training


@torch.no_grad()
def test_generate_with_and_without_cache_agree_past_the_window():
    model = random_model()
    prompt = [0, *b"def main():\n    return sorted(set(items), key=len)  # unique"]
    # 60 + 12 tokens overflow the 64-token window: the window restarts from its newest half
    cached = generate(model, prompt, 12, temperature=0)
    assert cached == generate(model, prompt, 12, temperature=0, use_cache=False)
    assert len(cached) == 12
    assert generate(model, prompt, 12, seed=3) == generate(model, prompt, 12, seed=3, use_cache=False)


def test_sampling_filters():
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    assert sample_next(logits, temperature=0) == 1
    generator = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, top_k=2, generator=generator) for _ in range(200)}
    assert draws == {1, 2}
    assert {sample_next(logits, top_p=0.01, generator=generator) for _ in range(50)} == {1}
    # p(1) ≈ 0.66 < 0.8: the nucleus needs token 2 as well, never more
    assert {sample_next(logits, top_p=0.8, generator=generator) for _ in range(200)} == {1, 2}
    assert len({sample_next(logits, generator=generator) for _ in range(500)}) == 4


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    recipe = load_recipe(
        "tiny",
        {
            "train.steps": 2,
            "train.sample_tokens": 0,
            "train.eval_batches": 1,
            "train.batch_size": 2,
            "train.micro_batch_size": 2,
        },
    )
    path = tmp_path_factory.mktemp("inference") / "run"
    assert train(recipe, path) == 0
    return path


def parse(out: str) -> dict:
    return {key: value.strip() for key, _, value in (line.partition(":") for line in out.splitlines())}


def test_eval_prints_the_trainer_s_validation_loss(cli, run_dir):
    code, out, _ = cli("eval", run_dir)
    assert code == 0
    result = parse(out)
    loss = float(result["loss"])
    assert loss == pytest.approx(read_metrics(run_dir)[1][-1]["val_loss"], abs=1e-4)  # same batches, same weights
    assert float(result["perplexity"]) == pytest.approx(math.exp(loss), rel=1e-3)
    assert float(result["bits/byte"]) == pytest.approx(loss / math.log(2), abs=1e-4)
    assert result["step"] == "2" and result["source"].startswith("stdlib")


def test_eval_on_another_source(cli, run_dir, tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    code, out, err = cli("eval", run_dir, "--set", f"data.source={tmp_path}", "--batches", "2")
    assert code == 0, err
    result = parse(out)
    assert result["source"].startswith(str(tmp_path)) and "256 tokens" in result["source"]  # 2 × (2, 64)
    assert float(result["loss"]) != pytest.approx(float(parse(cli("eval", run_dir)[1])["loss"]), abs=1e-3)


def test_eval_refuses_a_batch_count_below_one(cli, run_dir):
    for count in ("0", "-1"):
        code, _, err = cli("eval", run_dir, "--batches", count)
        assert code == 2 and err.strip() == f"minsota: error: --batches must be at least 1, got {count}"


def test_generate_continues_the_prompt(cli, run_dir):
    args = ("generate", run_dir, "--prompt", "import ", "--max-new-tokens", "12", "--top-k", "20", "--seed", "1")
    code, out, _ = cli(*args)
    assert code == 0 and out.startswith("import ")
    assert cli(*args)[1] == out  # the seed fixes the sample
    # the same draws without a stop token are exactly 12; the command prints them up to the first EOS (0)
    _, model, _ = load_run(run_dir)
    free = generate(model, [0, *b"import "], 12, top_k=20, seed=1)
    assert len(free) == 12
    kept = free[: free.index(0)] if 0 in free else free
    assert out == "import " + bytes(kept).decode("utf-8", errors="replace") + "\n"


def test_commands_refuse_what_is_not_a_run(cli, tmp_path):
    for command in ("eval", "generate"):
        code, _, err = cli(command, tmp_path)
        assert code == 2 and err.strip() == f"minsota: error: {tmp_path}: not a run directory (no recipe.json)"
