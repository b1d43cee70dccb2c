"""Optimizers and schedules as plugins: Muon per logical matrix, every built-in (and a third-party plugin)
resuming bit for bit with its whole state, and a changed optimizer refused on resume."""

import itertools
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from minsota.optim import optimizer_over, train_mode
from minsota.plugins import load_plugins
from minsota.recipe import TrainConfig, stand_in_groups

from conftest import PLUGINS, losses, records, sets

SIGNUM = PLUGINS / "signum.py"
RUN = {
    "train.steps": 8,
    "train.checkpoint_every": 3,
    "train.eval_every": 2,
    "train.eval_batches": 1,
    "train.sample_tokens": 0,
}
OPTIMIZERS = {  # name -> the recipe overrides that run it (and the plugin that brings it)
    "adamw": ({"train.optimizer": "'adamw'"}, ()),
    "muon": ({"train.optimizer": "'muon'"}, ()),
    "lion": ({"train.optimizer": "{name='lion', beta2=0.98}"}, ()),
    "schedulefree-adamw": ({"train.optimizer": "'schedulefree-adamw'", "train.schedule": "'constant'"}, ()),
    "signum (third-party)": (
        {"train.optimizer": "{name='signum', momentum=0.8}", "train.schedule": "'halving'"},
        ("--plugin", SIGNUM),
    ),
}


def muon_factory():
    return load_plugins().registry("optimizer").get("muon")


def test_muon_orthogonalises_each_part_of_a_fused_matrix():
    """The update of a fused wqkv (rows 8 + 4 + 4) equals torch.optim.Muon's updates of separate q, k and v,
    concatenated; orthogonalising the fused matrix as one gives another update."""
    torch.manual_seed(0)
    fused = torch.nn.Parameter(torch.randn(16, 8))
    parts = [torch.nn.Parameter(t.clone()) for t in fused.detach().split([8, 4, 4])]
    whole = torch.nn.Parameter(fused.detach().clone())
    group = {"names": ["wqkv.weight"], "role": "matrix", "lr": 3e-3, "lr_scale": 1.0, "weight_decay": 0.1}
    ours = muon_factory()([{**group, "params": [fused], "splits": [[8, 4, 4]]}], TrainConfig(lr=3e-3))
    unsplit = muon_factory()([{**group, "params": [whole], "splits": [None]}], TrainConfig(lr=3e-3))
    reference = torch.optim.Muon(parts, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True)
    for _ in range(3):
        grad = torch.randn(16, 8)
        fused.grad, whole.grad = grad.clone(), grad.clone()
        for p, g in zip(parts, grad.split([8, 4, 4])):
            p.grad = g.clone()
        for optimizer in (ours, unsplit, reference):
            optimizer.step()
    assert torch.equal(fused.detach(), torch.cat([p.detach() for p in parts])), (
        f"max abs diff {(fused - torch.cat(parts)).abs().max():.3g}"
    )
    assert not torch.allclose(whole, fused, atol=1e-4)


def test_muon_match_rms_adamw_uses_the_adamw_lr_scaled_per_matrix():
    p = torch.nn.Parameter(torch.zeros(16, 4))
    group = {
        "params": [p],
        "names": ["w"],
        "role": "matrix",
        "lr": 1e-3,
        "lr_scale": 1.0,
        "weight_decay": 0.0,
        "splits": [None],
    }
    optimizer = muon_factory()([group], TrainConfig(lr=1e-3), match_rms_adamw=True)
    p.grad = torch.randn(16, 4)
    optimizer.step()
    # an orthogonal 16x4 update has RMS 1/4 (4 singular values 1 over 64 entries; Newton-Schulz gives ~0.7-1.1);
    # match_rms_adamw scales it by 0.2·sqrt(16) (RMS 0.2, AdamW's typical update) times AdamW's lr
    assert optimizer.param_groups[0]["lr"] == 1e-3
    assert p.detach().pow(2).mean().sqrt().item() == pytest.approx(0.2 * 4 * 1e-3 * 0.25, rel=0.3)


FACTORIES = {  # name -> (train.optimizer, plugins): the optimizers as `optimizer_over` builds them
    "adamw": ("adamw", ()),
    "muon": ("muon", ()),
    "lion": ({"name": "lion"}, ()),
    "schedulefree-adamw": ("schedulefree-adamw", ()),
    "signum (third-party)": ({"name": "signum"}, (SIGNUM,)),
}


@pytest.mark.parametrize("name", FACTORIES)
def test_an_fp16_step_through_the_scaler_unscales_and_skips_an_overflow(name):
    """GradScaler's contract, whichever way an optimizer takes it (fused AdamW and Muon's AdamW half receive the
    scale and the overflow flag; the others are skipped by the scaler): the step on scaled gradients equals the
    step on the true ones, and a step whose gradients overflowed leaves every parameter untouched."""
    if name == "schedulefree-adamw":
        pytest.importorskip("schedulefree")
    optimizer_name, plugins = FACTORIES[name]
    t = TrainConfig(lr=1e-2, optimizer=optimizer_name)
    runs = {}
    for run in ("true", "scaled", "overflow"):
        groups = stand_in_groups(t)  # the same tensors each time (seeded)
        optimizer = optimizer_over(groups, t, plugins)
        train_mode(optimizer)
        params = [p for g in groups for p in g["params"]]
        before = [p.detach().clone() for p in params]
        if run == "true":
            optimizer.step()
        else:
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
            scaler.scale(torch.ones(()))  # the scale exists once a loss was scaled
            for p in params:
                p.grad.mul_(2.0**16)  # a power of two: unscaling is exact
            params[0].grad.view(-1)[0] = float("inf") if run == "overflow" else params[0].grad.view(-1)[0]
            scaler.step(optimizer)  # no unscale_ first: the scale reaches a fused step as its grad_scale
        runs[run] = [p.detach().clone() for p in params]
    assert all(torch.equal(a, b) for a, b in zip(runs["overflow"], before))
    assert all(torch.equal(a, b) for a, b in zip(runs["scaled"], runs["true"]))
    assert not all(torch.equal(a, b) for a, b in zip(runs["true"], before))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_resume_is_bit_exact(tmp_path, cli, name):
    """8 steps uninterrupted vs the same run resumed from its step-3 checkpoint: the same losses and gradient
    norms, bit for bit (evaluations every 2 steps switch schedule-free's weights in between)."""
    overrides, plugin = OPTIMIZERS[name]
    run_dir = tmp_path / "run"
    code, _, err = cli("train", "tiny", "--out", run_dir, *plugin, *sets({**RUN, **overrides}))
    assert code == 0, err
    resumed = Path(shutil.copytree(run_dir, tmp_path / "resumed"))
    code, _, err = cli("train", "--resume", resumed / "checkpoints" / "step-3")
    assert code == 0, err
    again = [(r["step"], r["loss"], r["grad_norm"]) for r in records(resumed)[len(records(run_dir)) :] if "loss" in r]
    assert again == [
        (r["step"], r["loss"], r["grad_norm"]) for r in records(run_dir) if r.get("step", 0) > 3 and "loss" in r
    ]
    assert max(losses(run_dir)) == 8 and losses(run_dir)[8] < losses(run_dir)[1]  # it trained
    if name.startswith("signum"):  # the non-tensor state went to JSON, whole
        saved = json.loads((run_dir / "checkpoints" / "step-8" / "trainer.json").read_text())["optimizer"]["state"]
        assert saved["output.weight"] == {
            "steps": 8,
            "last": {"lr": pytest.approx(3e-3 * 0.5), "role": "head"},
        }  # step 7 of 8: halved once


def test_a_resume_that_changes_the_optimizer_is_refused_unless_allowed(tmp_path, cli):
    run_dir = tmp_path / "run"
    code, _, err = cli("train", "tiny", "--out", run_dir, *sets({**RUN, "train.steps": 3}))
    assert code == 0, err
    code, _, err = cli("train", "--resume", run_dir, *sets({"train.steps": 5, "train.optimizer": "'lion'"}))
    assert code == 2 and err.count("\n") == 1
    assert "train.optimizer changed from 'adamw' to 'lion'" in err and "--allow-change train.optimizer" in err
    code, _, err = cli(
        "train",
        "--resume",
        run_dir,
        *sets({"train.steps": 5, "train.optimizer": "'lion'"}),
        "--allow-change",
        "train.optimizer",
    )
    assert code == 0, err
    assert "train.optimizer changed (allowed): its state starts afresh" in err and max(losses(run_dir)) == 5


@pytest.mark.parametrize(
    "optimizer, plugin, message",
    [
        ("{name='muon', momentum='x'}", (), "muon: momentum must be a number in [0, 1), got 'x'"),
        ("{name='muon', lr=-1}", (), "muon: lr must be a number > 0, got -1"),
        ("{name='muon', ns_dtype='fp8'}", (), "muon: ns_dtype must be one of bfloat16, float32, got 'fp8'"),
        ("{name='lion', beta2=1.5}", (), "lion: beta2 must be a number in [0, 1), got 1.5"),
        ("{name='adamw', fused='yes'}", (), "adamw: fused must be true or false, got 'yes'"),
        (
            "{name='schedulefree-adamw', warmup_steps=-3}",
            (),
            "schedulefree-adamw: warmup_steps must be an integer >= 0, got -3",
        ),
        ("{name='signum', momentum=1.5}", ("--plugin", SIGNUM), "signum: momentum must be in [0, 1), got 1.5"),
    ],
    ids=["muon-type", "muon-lr", "muon-dtype", "lion", "adamw", "schedulefree", "third-party"],
)
def test_a_bad_optimizer_option_value_is_refused_when_the_recipe_is_read(tmp_path, cli, optimizer, plugin, message):
    """Whatever the factory refuses on the stand-in tensors, a plugin's as a built-in's: one line naming the key,
    exit 2, before a model or a run directory exists."""
    code, _, err = cli("train", "tiny", *plugin, "--out", tmp_path / "run", "--set", f"train.optimizer={optimizer}")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"--set train.optimizer: train.optimizer: {message}" in err, err
    assert not (tmp_path / "run").exists()


def test_every_builtin_registers_through_the_hooks_and_lists(cli):
    code, out, err = cli("list", "optimizers", "--plugin", SIGNUM)
    assert code == 0, err
    rows = {line.split()[1]: line.split()[2] for line in out.splitlines()}
    assert rows == {
        "adamw": "optimizers",
        "muon": "optimizers",
        "lion": "optimizers",
        "schedulefree-adamw": "optimizers",
        "signum": "signum",
    }
    code, out, err = cli("list", "schedules")
    assert code == 0, err
    assert {line.split()[1] for line in out.splitlines()} == {"cosine", "wsd", "constant", "linear", "inverse-sqrt"}


def test_an_optimizer_with_modes_evaluates_checkpoints_and_samples_in_eval_mode(tmp_path, cli, monkeypatch):
    """The seam: train() before stepping, eval()/train() around each evaluation, checkpoint and sample, and
    every checkpoint written in eval mode (schedule-free's averaged weights)."""
    schedulefree = pytest.importorskip("schedulefree")
    calls = []
    for mode in ("train", "eval"):
        real = getattr(schedulefree.AdamWScheduleFree, mode)
        monkeypatch.setattr(
            schedulefree.AdamWScheduleFree,
            mode,
            lambda self, real=real, mode=mode: (calls.append((self, mode)), real(self))[1],
        )
    overrides = {
        **RUN,
        "train.steps": 4,
        "train.sample_tokens": 4,
        "train.optimizer": "'schedulefree-adamw'",
        "train.schedule": "'constant'",
    }
    code, _, err = cli("train", "tiny", "--out", tmp_path / "run", *sets(overrides))
    assert code == 0, err
    # the trainer's optimizer (the memory estimate steps a stand-in first): start; step 2: validate; step 3:
    # checkpoint; step 4: validate, checkpoint, sample
    assert [mode for optimizer, mode in calls if optimizer is calls[-1][0]] == ["train"] + ["eval", "train"] * 5
    for step in (3, 4):
        groups = json.loads((tmp_path / "run" / "checkpoints" / f"step-{step}" / "trainer.json").read_text())
        assert {g["train_mode"] for g in groups["optimizer"]["param_groups"]} == {False}
        assert {g["k"] for g in groups["optimizer"]["param_groups"]} == {step}


def test_a_step_the_loss_scaler_skips_moves_nothing_not_even_the_moe_bias():
    """fp16: gradients that overflow under the loss scale are skipped by GradScaler, not counted as divergence;
    the modules acting after the optimizer step (MoE's bias balancing) then hear ``applied`` False and keep
    their buffers. With a scale that does not overflow, the same step moves both."""
    from minsota.loader import load_recipe
    from minsota.model import build_model
    from minsota.optim import build_optimizer
    from minsota.step import train_step
    from minsota.train_state import TrainState

    from conftest import REPO

    recipe = load_recipe(REPO / "tests" / "assets" / "tiny-moe.toml")
    T = recipe.train.seq_len
    tokens = torch.randint(0, recipe.model.vocab_size, (2, T + 1), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(T).expand(2, T)
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "positions": positions, "document_ids": 0 * positions}
    moved = {}
    for scale in (2.0**10, 2.0**127):  # the second overflows fp32 gradients to inf
        torch.manual_seed(0)
        model = build_model(recipe)
        scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        state = TrainState(model, build_optimizer(model, recipe.train), scaler, itertools.repeat(batch))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        result = train_step(state, model.losses, 1.0, device=torch.device("cpu"), grad_clip=1.0)
        assert result.finite  # the scaler's skip is not a divergence
        changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
        moved[scale] = (changed, math.isfinite(result.grad_norm))
    biases = {k for k in before if k.endswith("expert_bias")}
    assert biases and moved[2.0**10][1] and biases <= moved[2.0**10][0]  # the bias and the weights moved
    assert moved[2.0**127] == (set(), False)  # nothing moved: weights, bias
