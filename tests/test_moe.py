"""The `moe` feed-forward: grouped-matmul and loop dispatch against the per-expert reference, routing options,
auxiliary terms and metrics, bias balancing after the optimizer step (and its exact resume), fullgraph compile,
active parameters and FLOPs."""

import pytest
import torch

import minsota
from minsota import reference
from minsota.loader import load_recipe
from minsota.reference import assert_close

from conftest import REPO, Launch, copied, in_turn, losses, records, sets

TINY_MOE = REPO / "tests" / "assets" / "tiny-moe.toml"
CFG = load_recipe("tiny", {"model.dim": 32, "model.ffn_dim": 48, "model.n_heads": 4, "model.head_dim": 8}).model
MOE = minsota.load_plugins().registry("feedforward").get("moe")
VARIANTS = [
    {},
    {"dispatch": "loop"},
    {"top_k": 1, "normalize_top_k": False, "balance": "none"},  # OLMoE-like: no renormalisation
    {
        "score": "sigmoid",
        "balance": "bias",
        "shared_experts": 2,
        "shared_dim": 16,
        "groups": 4,
        "top_groups": 2,
        "route_scale": 2.5,
    },  # DeepSeek-V3-like
    {"experts": 6, "top_k": 3, "expert_dim": 20, "router_z_loss": 1e-3},  # 20: not 8-aligned, the loop serves
]


def built(**options):
    torch.manual_seed(0)
    module = MOE(CFG, **options)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
        module.expert_bias.normal_(0, 0.1)  # a bias that changes the choice (used only by balance = "bias")
    return module


@pytest.mark.parametrize("options", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_dispatch_matches_the_per_expert_reference(options):
    module = built(**options)
    assert module.dispatch == (
        "loop" if options.get("dispatch") == "loop" or options.get("expert_dim") == 20 else "grouped"
    )
    torch.manual_seed(1)
    x = torch.randn(2, 12, CFG.dim, requires_grad=True)
    actual, expected = module(x), reference.call(module, x)
    assert_close(actual, expected, 1e-5, f"moe {options} forward")
    cotangent = torch.randn_like(expected)
    leaves = [x, *module.parameters()]
    for got, want in zip(
        torch.autograd.grad((actual * cotangent).sum(), leaves),
        torch.autograd.grad((expected * cotangent).sum(), leaves),
    ):
        assert_close(got, want, 1e-5, f"moe {options} gradient")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the router stays fp32: the same experts are chosen
        low = module(x)
    assert_close(low, expected, 3e-2, f"moe {options} bf16 forward")


def test_routing_semantics():
    """Top-k of softmax renormalised; sigmoid scores choose with the bias but weigh without it, within groups."""
    module = built(score="sigmoid", balance="bias", groups=4, top_groups=1, top_k=2, normalize_top_k=False)
    x = torch.randn(16, CFG.dim)
    from minsota.builtins.moe import route

    logits, weights, experts = route(module, x)
    scores = logits.sigmoid()
    assert torch.equal(weights, scores.gather(1, experts))  # unbiased weights
    group = experts // 2  # 8 experts in 4 groups of 2
    assert torch.equal(group[:, 0], group[:, 1])  # one group kept: both choices inside it
    module.expert_bias.zero_()
    module.expert_bias[5] = 10.0  # a bias large enough to choose expert 5 for every token
    assert (route(module, x)[2] == 5).any(-1).all()
    softmax = built(normalize_top_k=True)
    _, weights, _ = route(softmax, x)
    assert torch.allclose(weights.sum(-1), torch.ones(16))


def test_auxiliary_terms_and_metric():
    module = built(router_z_loss=1e-2)  # balance = "aux" by default
    x = torch.randn(4, 8, CFG.dim)
    module(x)
    logits = x.reshape(-1, CFG.dim) @ module.router.weight.T
    z = 1e-2 * torch.logsumexp(logits, -1).square().mean()
    assert torch.allclose(module.z_loss.aux_loss, z)
    counts = torch.bincount(_experts(module, x), minlength=8).float()
    probs = logits.softmax(-1).mean(0)
    assert torch.allclose(module.aux_loss, 0.01 * 8 * (counts / counts.sum() * probs).sum())
    assert module.aux_metric == counts.max() / counts.mean()
    assert module.aux_loss_name == "moe_balance_loss" and module.z_loss.aux_loss_name == "router_z_loss"
    assert built(balance="bias").aux_loss_name is None  # no auxiliary loss: the bias balances


def _experts(module, x):
    from minsota.builtins.moe import route

    return route(module, x.reshape(-1, CFG.dim))[2].flatten()


def test_bias_balancing_after_the_optimizer_step():
    """Counts accumulate over a step's micro-batches in training only; the update is sign(mean - load)·rate;
    the bias takes no gradient; a skipped step moves nothing but forgets the counts."""
    module = built(balance="bias", bias_rate=0.1)
    module.expert_bias.zero_()
    x1, x2 = torch.randn(3, 5, CFG.dim), torch.randn(2, 7, CFG.dim)
    module(x1).square().sum().backward()
    module(x2)
    module.eval()
    module(torch.randn(9, 9, CFG.dim))  # evaluation does not count
    module.train()
    load = torch.bincount(torch.cat([_experts(module, x1), _experts(module, x2)]), minlength=8).float()
    assert torch.equal(module.tokens_per_expert, load)
    assert module.expert_bias.grad is None and not module.expert_bias.requires_grad
    module.after_optimizer_step(applied=True)
    assert torch.equal(module.expert_bias, 0.1 * torch.sign(load.mean() - load))
    assert not module.tokens_per_expert.any()
    before = module.expert_bias.clone()
    module(x1)
    module.after_optimizer_step(applied=False)
    assert torch.equal(module.expert_bias, before) and not module.tokens_per_expert.any()
    assert "expert_bias" in module.state_dict() and "tokens_per_expert" not in module.state_dict()


def test_show_counts_total_and_active_parameters(cli):
    code, out, _ = cli("show", TINY_MOE)
    assert code == 0
    recipe = load_recipe(str(TINY_MOE))
    model = minsota.build_model(recipe, device="meta")
    moe = model.layers[0].feed_forward
    per_expert = moe.w13[0].numel() + moe.w2[0].numel()
    assert model.active_parameters() == model.num_parameters() - 4 * (4 - 2) * per_expert  # 4 layers, 2 idle experts
    assert f"parameters: {model.num_parameters():,}" in out
    assert f"active parameters: {model.active_parameters():,} per token" in out
    assert moe.flops_per_token(64) == 2 * (moe.router.weight.numel() + 2 * per_expert)
    dense = load_recipe("sota-2024")
    sparse = load_recipe("sota-2024-moe")
    dense_active = minsota.build_model(dense, device="meta").active_parameters()
    routers = 12 * 8 * 768
    assert minsota.build_model(sparse, device="meta").active_parameters() == dense_active + routers


def test_fullgraph_compile_trains_without_recompiles():
    """A tiny MoE decoder's loss and backward compile as one graph (grouped matmul, bias-balancing counts,
    auxiliary terms), match eager, and later steps (the bias moved) reuse the graph."""
    torch.manual_seed(0)
    recipe = load_recipe(str(TINY_MOE), {"model.n_layers": 2})
    model = minsota.build_model(recipe)
    twin = minsota.build_model(recipe)
    twin.load_state_dict(model.state_dict())
    compiled = torch.compile(model.losses, fullgraph=True)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    for step in range(3):
        tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(step))
        got, want = compiled(tokens[:, :-1], tokens[:, 1:]), twin.losses(tokens[:, :-1], tokens[:, 1:])
        assert got.keys() == want.keys()
        for name in want:
            assert_close(got[name], want[name], 1e-5, f"step {step} {name}")
        (got["loss"] + got["aux_loss"]).backward()
        for m in (model, twin):
            m.after_optimizer_step(True)
        assert torch.equal(model.layers[0].feed_forward.expert_bias, twin.layers[0].feed_forward.expert_bias)
    assert model.layers[0].feed_forward.expert_bias.abs().sum() > 0
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


MOE_MLA = REPO / "tests" / "assets" / "tiny-moe-mla.toml"
# the last layer's feed-forward is a third-party plugin's with an auxiliary loss of its own (tests/plugins/layers/)
PENALTY = ["--plugin", REPO / "tests" / "plugins" / "layers" / "activation_penalty.py"]
MOE_RUN = {
    "model.layer_overrides": '{"-1" = {feedforward = {name = "activation-penalty", coefficient = 0.01}}}',
    "train.steps": 4,
    "train.micro_batch_size": 4,
    "train.log_every": 1,
    "train.checkpoint_every": 4,
    "train.eval_every": 0,
    "train.sample_tokens": 0,
}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Launch:
    """This file's one-process runs in turn in one process: bias balancing on `tiny-moe` (6 steps) resumed from a
    copy at step 3, and the run both parallelisms are compared with."""
    out = tmp_path_factory.mktemp("moe-one")
    bias = {"train.steps": 6, "train.log_every": 1, "train.checkpoint_every": 3, "train.sample_tokens": 0}
    jobs = {
        "bias": {"argv": ["train", TINY_MOE, "--out", out / "bias" / "run", *sets(bias)]},
        "bias-resumed": {
            "code": copied(out / "bias", out / "bias-resumed"),
            "argv": ["train", "--resume", out / "bias-resumed" / "run" / "checkpoints" / "step-3"],
        },
        "single": {"argv": ["train", MOE_MLA, *PENALTY, "--out", out / "single" / "run", *sets(MOE_RUN)]},
    }
    return in_turn(jobs, out)


def test_training_logs_the_terms_and_resumes_bias_balancing_exactly(one_process):
    """metrics.jsonl has the auxiliary terms and the imbalance every step; the expert bias moves and is
    checkpointed, so a resumed run (a copy, from step 3) repeats the uninterrupted one bit for bit."""
    run_dir, resumed = one_process.run_dir("bias"), one_process.run_dir("bias-resumed")
    steps = [r for r in records(run_dir) if "loss" in r]
    assert len(steps) == 6
    for r in steps:
        assert r["router_z_loss"] > 0 and r["aux_loss"] == pytest.approx(r["router_z_loss"])
        assert 1 <= r["moe_imbalance"] <= 2  # top-2 of 4: one expert gets at most half the assignments
    from minsota import checkpoint

    weights = checkpoint.load(run_dir / "checkpoints" / "step-6")["model"]
    bias = weights["layers.0.feed_forward.expert_bias"]
    assert bias.abs().sum() > 0 and torch.allclose(bias * 100, (bias * 100).round(), atol=1e-3)  # k · rate (0.01)
    again = [r for r in records(resumed)[len(records(run_dir)) :] if "loss" in r]
    expected = losses(run_dir)
    assert [(r["step"], r["loss"]) for r in again] == [(s, expected[s]) for s in (4, 5, 6)]
    final = checkpoint.load(resumed / "checkpoints" / "step-6")["model"]
    assert all(torch.equal(final[k], weights[k]) for k in weights)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Launch:
    """The DDP and FSDP2 runs in one torchrun launch."""
    out = tmp_path_factory.mktemp("moe-two")
    jobs = {
        parallelism: {
            "argv": ["train", MOE_MLA, *PENALTY, "--out", out / parallelism / "run"]
            + sets({**MOE_RUN, "train.parallelism": parallelism})
        }
        for parallelism in ("ddp", "fsdp")
    }
    return in_turn(jobs, out, ranks=2)


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_ranks_match_one_with_bias_balancing(one_process, two_ranks, parallelism):
    """MoE (bias balancing, shared expert) and MLA under DDP and FSDP2 (no expert parallelism: every rank holds
    every expert): the 2-rank run's losses, grad norms and final expert biases equal one process's on the same
    global batch, which only holds if the bias update sees the token counts of both ranks. The auxiliary loss
    terms too: the router's z-loss and a plugin's (`ffn_activation_l2`), logged and differentiated."""
    from minsota import checkpoint

    one, two = one_process.run_dir("single"), two_ranks.run_dir(parallelism)
    ones, twos = ([r for r in records(d) if "loss" in r] for d in (one, two))
    assert len(ones) == len(twos) == 4 and all(r["aux_loss"] > 0 and r["ffn_activation_l2"] > 0 for r in ones)
    for key in ("loss", "grad_norm", "moe_imbalance", "aux_loss", "ffn_activation_l2"):
        assert [r[key] for r in twos] == pytest.approx([r[key] for r in ones], rel=1e-4, abs=1e-4), key
    biases = [checkpoint.load(run_dir / "checkpoints" / "step-4")["model"] for run_dir in (one, two)]
    for name in (k for k in biases[0] if k.endswith("expert_bias")):
        assert biases[0][name].abs().sum() > 0
        assert torch.allclose(biases[1][name], biases[0][name], atol=1e-6), name
