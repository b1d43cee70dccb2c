"""`minsota compare` on tiny with two variants and two seeds, and `minsota diff`.

One comparison (6 runs of 3 steps) is shared by the module's tests; the resume test retrains one run.
"""

import contextlib
import io
import json
import math
import shutil
from pathlib import Path

import matplotlib.image
import pytest
import torch

from minsota.cli import main
from minsota.compare import _tokens, format_table, read_at, read_metrics, recipe_diff
from minsota.data import build_batches, build_tokenizer
from minsota.loader import load_recipe, read_recipe_json
from minsota.plugins import load_plugins

QUICK = [
    "--steps",
    "3",
    "--seeds",
    "2",
    *(
        f"--set=train.{key}"
        for key in ("sample_tokens=0", "eval_batches=1", "batch_size=2", "micro_batch_size=2", "seq_len=32")
    ),
]


def write_variants(directory):
    (directory / "gelu.toml").write_text('extends = "tiny"\n[model]\nfeedforward = "mlp"\n')
    (directory / "lowlr.toml").write_text('extends = "tiny"\n[train]\nlr = 1e-3\n')
    return directory / "gelu.toml", directory / "lowlr.toml"


def invoke(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    directory = tmp_path_factory.mktemp("compare")
    gelu, lowlr = write_variants(directory)
    args = ["compare", "tiny", gelu, lowlr, *QUICK, "--out", directory / "out"]
    code, out, err = invoke(*args)
    assert code == 0, err
    return args, directory / "out", out


def test_table_names_each_recipe_with_statistics(compared):
    _, _, out = compared
    header, rule, *rows = out.splitlines()[:5]
    for column in ("recipe", "params", "FLOPs/tok", "tok/s", "train loss", "val loss", "95% CI", "p"):
        assert column in header
    assert [row.split()[0] for row in rows] == ["tiny", "gelu", "lowlr"]
    assert "(base)" in rows[0]
    for row in rows[1:]:
        assert "±" in row and "[" in row  # mean ± std over seeds, a confidence interval


def metrics(run_dir):
    """(train losses, final validation loss) of a run, read straight from its metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["val_loss"] for r in rows if "val_loss" in r][-1]


def test_figures_are_those_of_the_runs(compared):
    """Every statistic in the table and in compare.json, recomputed from the runs' own metrics. With two seeds
    the paired t-test has one degree of freedom, whose t is Cauchy: quantile tan(π(q - ½)), two-sided
    p = 1 - (2/π)·atan|t| — closed forms, independent of minsota.stats' continued fraction."""
    _, out_dir, out = compared
    rows = {line.split()[0]: line for line in out.splitlines()[2:5]}
    recipes = json.loads((out_dir / "compare.json").read_text())["recipes"]
    val = {name: [metrics(out_dir / name / f"seed-{k}")[1] for k in (0, 1)] for name in rows}
    for r in recipes:
        name = r["recipe"]
        train_tail = [metrics(out_dir / name / f"seed-{k}")[0][-1] for k in (0, 1)]  # 3 steps: the tail is 1 step
        for key, values in (("train_loss", train_tail), ("val_loss", val[name])):
            mean, std = sum(values) / 2, abs(values[0] - values[1]) / math.sqrt(2)
            assert r[key]["mean"] == pytest.approx(mean, rel=1e-12) and r[key]["std"] == pytest.approx(std, rel=1e-9)
            assert f"{mean:.4f} ± {std:.4f}" in rows[name], (key, rows[name])
        if name == "tiny":
            continue
        d = [v - b for v, b in zip(val[name], val["tiny"])]
        mean, standard_error = sum(d) / 2, abs(d[0] - d[1]) / 2
        half_width = math.tan(math.pi * (0.975 - 0.5)) * standard_error
        p = 1 - 2 / math.pi * math.atan(abs(mean) / standard_error)
        got = r["vs_base"]["val_loss"]
        assert got["mean"] == pytest.approx(mean, rel=1e-9)
        assert got["ci_low"] == pytest.approx(mean - half_width, rel=1e-6)
        assert got["ci_high"] == pytest.approx(mean + half_width, rel=1e-6)
        assert got["p_value"] == pytest.approx(p, rel=1e-6)
        assert f"{mean:+.4f} [{mean - half_width:+.4f}, {mean + half_width:+.4f}]" in rows[name]
        assert rows[name].split()[-1] == f"{p:.3g}"


def test_png_is_a_readable_plot(compared):
    _, out_dir, _ = compared
    png = out_dir / "compare.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, channels = matplotlib.image.imread(png).shape
    assert width > 500 and height > 300 and channels in (3, 4)


def test_json_has_paired_statistics_over_the_same_seeds(compared):
    _, out_dir, _ = compared
    result = json.loads((out_dir / "compare.json").read_text())
    assert result["base"] == "tiny"
    recipes = result["recipes"]
    assert [r["recipe"] for r in recipes] == ["tiny", "gelu", "lowlr"]
    for r in recipes:
        assert [run["seed"] for run in r["runs"]] == [0, 1]
        assert r["parameters"] > 0 and r["flops_per_token"] > 0 and r["tokens_per_s"] > 0
    assert recipes[1]["parameters"] != recipes[0]["parameters"]  # the GELU MLP is 4·dim wide, SwiGLU 8/3·dim
    for r in recipes[1:]:
        d = r["vs_base"]["val_loss"]
        assert d["ci_low"] <= d["mean"] <= d["ci_high"] and 0 <= d["p_value"] <= 1
        base_runs = recipes[0]["runs"]
        assert d["mean"] == pytest.approx(sum(v["val_loss"] - b["val_loss"] for v, b in zip(r["runs"], base_runs)) / 2)


def test_runs_share_seeds_and_data_order(compared):
    _, out_dir, out = compared
    variance = json.loads((out_dir / "compare.json").read_text())["variance"]
    assert variance["data_order"] is False and "initialisation only" in out
    # the first loss is measured before any update: same seed + same batch -> same loss, whatever the lr
    first = {
        (name, seed): read_metrics(out_dir / name / f"seed-{seed}")[0][0]["loss"]
        for name in ("tiny", "lowlr")
        for seed in (0, 1)
    }
    assert first["tiny", 0] == first["lowlr", 0] and first["tiny", 1] == first["lowlr", 1]
    assert first["tiny", 0] != first["tiny", 1]


def test_rerun_resumes_only_what_is_missing(compared):
    args, out_dir, out = compared
    before = json.loads((out_dir / "compare.json").read_text())
    shutil.rmtree(out_dir / "lowlr" / "seed-1")
    saved = out_dir / "tiny" / "seed-0" / "recipe.json"  # as a minsota from before data.shuffle wrote it
    record = json.loads(saved.read_text())
    del record["data"]["shuffle"]
    saved.write_text(json.dumps(record))
    written = {path: path.stat().st_mtime_ns for path in out_dir.glob("*/seed-*/metrics.jsonl")}
    code, _, err = invoke(*args)
    assert code == 0, err
    assert {path: path.stat().st_mtime_ns for path in written} == written  # the complete runs were left alone
    assert (out_dir / "lowlr" / "seed-1" / "checkpoints" / "step-3").is_dir()  # the missing one was trained
    after = json.loads((out_dir / "compare.json").read_text())
    assert [[run["val_loss"] for run in r["runs"]] for r in after["recipes"]] == [
        [run["val_loss"] for run in r["runs"]] for r in before["recipes"]
    ]  # CPU fp32 is deterministic


def test_refuses_to_mix_runs_of_another_recipe(compared):
    args, _, _ = compared
    code, _, err = invoke(*[("5" if a == "3" else a) for a in args])  # --steps 5 into the same --out
    assert code == 2 and "different recipe" in err and len(err.strip().splitlines()[-1]) < 300


def test_varying_the_data_order_gives_each_seed_its_own_batches(tmp_path):
    code, out, err = invoke("compare", "tiny", *QUICK, "--steps", "2", "--vary-data-order", "--out", tmp_path)
    assert code == 0, err
    result = json.loads((tmp_path / "compare.json").read_text())
    assert result["variance"]["data_order"] is True and "initialisation and data order" in out
    first = []
    for seed in (0, 1):
        recipe = read_recipe_json(tmp_path / "tiny" / f"seed-{seed}" / "recipe.json")
        assert recipe.data.shuffle and recipe.train.seed == seed
        first.append(next(build_batches(recipe, build_tokenizer(recipe)))["tokens"])
    assert not torch.equal(*first)  # another seed, other documents first


def test_one_seed_table_has_differences_but_no_statistics():
    def row(name, val_loss):
        return {
            "recipe": name,
            "parameters": 853120,
            "flops_per_token": 5.1e6,
            "tokens_per_s": 2.5e3,
            "train_loss": {"mean": 1.5, "std": 0.0},
            "val_loss": {"mean": val_loss, "std": 0.0},
            "runs": [{"val_loss": val_loss}],
        }

    variant = row("variant", 1.25) | {
        "vs_base": {"val_loss": {"mean": -0.25, "ci_low": None, "ci_high": None, "p_value": None}}
    }
    header, _, base, other = format_table([row("base", 1.5), variant]).splitlines()
    assert header.split()[-4:] == ["Δ", "val", "vs", "base"]  # no CI, no p with one seed
    assert base.split() == ["base", "853k", "5.1M", "2.5k", "1.5000", "1.5000", "(base)"]
    assert other.split()[-1] == "-0.2500" and "±" not in other


def test_diff_names_exactly_the_changed_keys(tmp_path):
    gelu, lowlr = write_variants(tmp_path)
    tiny = load_recipe("tiny")
    assert [key for key, *_ in recipe_diff(tiny, load_recipe(gelu))] == ["model.feedforward"]
    assert recipe_diff(tiny, load_recipe(lowlr)) == [("train.lr", 3e-3, 1e-3)]
    (tmp_path / "theta.toml").write_text(
        'extends = "tiny"\n[model]\npositional = { name = "rope", theta = 5e5 }\n[train]\nsteps = 7\n'
    )
    assert recipe_diff(tiny, load_recipe(tmp_path / "theta.toml")) == [
        ("model.positional.theta", 10000.0, 500000.0),
        ("train.steps", 50, 7),
    ]


def test_diff_command_prints_sizes_and_groups(tmp_path):
    gelu, _ = write_variants(tmp_path)
    code, out, _ = invoke("diff", "tiny", gelu)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["tiny", "gelu"]
    assert lines[1].startswith("parameters") and lines[2].startswith("FLOPs/token")
    assert lines[3:] == ["components", "  model.feedforward  swiglu     mlp"]
    code, out, _ = invoke("diff", "tiny", "tiny")
    assert code == 0 and out.splitlines()[-1] == "the resolved recipes are identical"


def test_evaluation_points_are_placed_by_the_tokens_of_their_step(compared):
    """Evaluation records carry no token count: `_tokens` derives it, equal to the train record's at that step."""
    _, out_dir, _ = compared
    train, evals = read_metrics(out_dir / "tiny" / "seed-0")
    recipe = read_recipe_json(out_dir / "tiny" / "seed-0" / "recipe.json")
    assert evals and all("tokens" not in r for r in evals)
    by_step = {r["step"]: r["tokens"] for r in train}
    assert [_tokens(r, recipe) for r in evals] == [by_step[r["step"]] for r in evals]


def test_an_interrupted_comparison_with_a_plugin_resumes(tmp_path):
    (tmp_path / "myplug.py").write_text(
        "from minsota import hookimpl\nfrom minsota.builtins.norms import RMSNorm\n\n"
        'class Norm2(RMSNorm):\n    """RMSNorm under another name."""\n\n'
        '@hookimpl\ndef minsota_register_norms():\n    return {"norm2": Norm2}\n'
    )
    (tmp_path / "variant.toml").write_text('extends = "tiny"\nplugins = ["myplug.py"]\n[model]\nnorm = "norm2"\n')
    args = [
        "compare",
        "tiny",
        tmp_path / "variant.toml",
        *QUICK,
        "--seeds",
        "1",
        "--steps",
        "2",
        "--set=data.num_workers=0",
        "--out",
        tmp_path / "out",
    ]
    code, _, err = invoke(*args)
    assert code == 0, err
    shutil.rmtree(tmp_path / "out" / "variant" / "seed-0" / "checkpoints")  # as if stopped before its checkpoint
    code, _, err = invoke(*args)
    assert code == 0, err
    assert (tmp_path / "out" / "variant" / "seed-0" / "checkpoints" / "step-2").is_dir()


def test_a_diverging_variant_is_tabled_not_fatal(tmp_path):
    (tmp_path / "wild.toml").write_text('extends = "tiny"\n[train]\nlr = 1e6\n')
    code, out, err = invoke("compare", "tiny", tmp_path / "wild.toml", *QUICK, "--out", tmp_path / "out")
    assert code == 0, err
    base, wild = out.splitlines()[2:4]
    assert base.split()[0] == "tiny" and "±" in base
    assert wild.split()[0] == "wild" and "diverged" in wild and "2 runs" in wild
    assert err.count("diverged (") == 2
    results = json.loads((tmp_path / "out" / "compare.json").read_text())["recipes"]
    assert len(results[1]["diverged"]) == 2 and "vs_base" not in results[1]
    assert (tmp_path / "out" / "compare.png").is_file()


def test_reading_at_a_budget_interpolates_between_evaluations():
    curve = [[100.0, 3.0, 1], [200.0, 2.0, 2], [400.0, 1.0, 4]]  # [x, val_loss, step]
    assert read_at(curve, 200.0) == (2.0, 2)
    assert read_at(curve, 300.0) == (1.5, 3.0)
    assert read_at(curve, 400.0) == (1.0, 4)
    assert read_at(curve, 400.5) is None  # the run stopped short of it
    with pytest.raises(ValueError):
        read_at(curve, 50.0)  # before the first evaluation: an extrapolation


def test_an_explicit_budget_past_the_runs_marks_them_short(compared):
    args, out_dir, _ = compared
    code, out, err = invoke(*args, "--budget", "tokens=1e9")
    assert code == 0, err
    rows = out.splitlines()[2:5]
    assert all("short of budget" in row and "2 runs" in row for row in rows)
    assert "1G tokens (--budget tokens)" in out.splitlines()[5]
    result = json.loads((out_dir / "compare.json").read_text())
    assert result["budget"] == {"kind": "tokens", "value": 1e9, "unit": "tokens"}
    assert all(len(r["short"]) == 2 and "vs_base" not in r for r in result["recipes"])
    invoke(*args)  # compare.json of the shared comparison as it was


@pytest.mark.parametrize(
    "budget, message",
    [
        ("steps", "--budget steps: the kind must be one of tokens, flops, time"),
        ("time=-1", "--budget time=-1: the value must be a positive number of seconds of training"),
        ("flops=nan", "--budget flops=nan: the value must be a positive number of training FLOPs"),
        ("tokens=1", "its first evaluation is at 192 tokens, after the budget of 1: evaluate more often"),
    ],
)
def test_a_bad_budget_is_one_line(compared, budget, message):
    args, _, _ = compared
    code, _, err = invoke(*args, "--budget", budget)
    assert code == 2 and message in err.splitlines()[-1] and err.count("error") == 1, err


def test_a_time_budget_reads_a_slower_recipe_at_an_earlier_step(tmp_path):
    """Equal wall-clock time: the cheap recipe is read at its end, one whose steps cost ~3.5x the matmul FLOPs at an
    earlier step; equal tokens reads both at their end. (A reading needs a cost ratio between 12/11 and 12.)"""
    (tmp_path / "wide.toml").write_text('extends = "tiny"\n[model]\ndim = 256\n')
    args = [
        "compare",
        "tiny",
        tmp_path / "wide.toml",
        "--steps",
        "12",
        "--set=train.eval_every=1",
        "--set=train.sample_tokens=0",
        "--set=train.eval_batches=1",
        "--out",
        tmp_path / "out",
    ]
    at_step = {}
    for budget in ("time", "tokens"):
        code, out, err = invoke(*args, "--budget", budget)
        assert code == 0, err
        result = json.loads((tmp_path / "out" / "compare.json").read_text())
        at_step[budget] = [run["at_step"] for r in result["recipes"] for run in r["runs"]]
    assert result["budget"]["kind"] == "tokens" and at_step["tokens"] == [12, 12]
    fast, slow = at_step["time"]
    assert fast == 12 and 1 <= slow < 11, at_step  # the same time buys fewer of the costlier steps


def test_the_committed_ablation_study_covers_every_ablation_recipe():
    """docs/ablation/compare.json (benchmarks/ablation_study.sh): every `ablation-*` recipe over 3 seeds, paired
    against ablation-base, with initialisation variance; the baseline again with the data order varied."""
    study = json.loads((Path(__file__).parent.parent / "docs" / "ablation" / "compare.json").read_text())
    recipes = load_plugins().registry("recipe").list("ablation-*")
    init, order = study["init"], study["data-order"]
    assert init["base"] == "ablation-base" and sorted(r["recipe"] for r in init["recipes"]) == recipes
    assert init["variance"]["data_order"] is False and order["variance"]["data_order"] is True
    assert order["recipes"][0]["recipe"] == "ablation-base"
    for row in init["recipes"] + order["recipes"]:
        assert [run["seed"] for run in row["runs"]] == [0, 1, 2]
    assert all("vs_base" in row for row in init["recipes"][1:])
