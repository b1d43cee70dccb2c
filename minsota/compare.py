"""`minsota compare` (is my variant better than the baseline?) and `minsota diff` (what does it change?).

compare trains every recipe for K seeds as ordinary run directories ``DIR/<recipe>/seed-<seed>/`` (so an
interrupted comparison resumes where it stopped), then prints a table, and writes ``DIR/compare.png`` (loss vs
tokens) and ``DIR/compare.json``. A recipe with a diverged run is tabled as diverged, without statistics. Run k of every recipe gets the same seed (the base's ``train.seed`` + k), which
sets initialisation and sampling, so the runs are paired by seed (see `minsota.stats`); by default the data order
does not depend on the seed, so every run sees the same batches in the same order and the spread over seeds is
initialisation variance alone. ``--vary-data-order`` (data.shuffle) lets the seed set the order of the training
documents too; the table's footer and compare.json (``variance``) say which was measured. Runs go seed-major, each recipe's seed 0 before any seed 1,
so every recipe's tokens/s is measured interleaved in one process: eager speed drifts ~30% between processes
(measured on the 2-core CPU machine), far more than within one.

Recipes that cost differently per step (MoE, local attention, another optimizer) are compared at an equal budget
(``--budget``): equal tokens (the default), equal training FLOPs (each model's own ``flops_per_token``) or equal
training wall-clock time. The validation loss of each run is read off its curve at the budget, interpolating
linearly between the evaluations around it, never extrapolating: a budget before a run's first evaluation is an
error (evaluate more often), and a run whose curve ends before an explicit budget is tabled as short of it.

diff flattens two resolved recipes (`Recipe.to_dict`) to dotted keys and lists the keys whose values differ,
components (and their options) apart from the other hyperparameters.
"""

import bisect
import dataclasses
import itertools
import json
import math
import sys
from datetime import datetime
from pathlib import Path
from statistics import median

from minsota import rundir
from minsota.errors import DivergedError, UserError
from minsota.loader import load_recipe
from minsota.model import model_size
from minsota.recipe import COMPONENT_KEYS, LAYER_TABLES, SECTIONS, Recipe, canonical, component, layer_specs
from minsota.stats import mean_std, paired_difference

TRAIN_TAIL = 0.1  # final train loss = mean over the last 10% of steps: one batch's loss is too noisy to rank by
LEVEL = 0.95  # confidence level of the intervals
BUDGETS = {"tokens": "tokens", "flops": "training FLOPs", "time": "seconds of training"}  # axis -> its unit


# --------------------------------------------------------------------------------------------------- running


def _labels(recipes: list[Recipe]) -> list[str]:
    """Recipe names, made unique (two files may share a stem; a recipe may be compared with itself)."""
    labels = []
    for recipe in recipes:
        label, n = recipe.name, 2
        while label in labels:
            label, n = f"{recipe.name}-{n}", n + 1
        labels.append(label)
    return labels


def _defaults(config) -> dict:
    """The default of every field of a recipe table's dataclass that has one, as recipe.json stores it."""
    fields = dataclasses.fields(config)
    defaults = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
    defaults |= {f.name: f.default_factory() for f in fields if f.default_factory is not dataclasses.MISSING}
    return json.loads(json.dumps(defaults))


def _run(recipe: Recipe, run_dir: Path) -> int:
    """Train one run, or resume it (the trainer returns at once when it is complete); the trainer's exit code."""
    from minsota.train import resume, train

    saved = run_dir / "recipe.json"
    if not saved.exists():
        return train(recipe, run_dir)
    wanted = json.loads(json.dumps(recipe.to_dict()))
    found = json.loads(saved.read_text())
    # a key added to minsota after the run was saved holds its default there (the runs did not change)
    if any({**_defaults(SECTIONS[s]), **found.get(s, {})} != wanted[s] for s in SECTIONS):
        raise UserError(f"{run_dir} holds a run of a different recipe: choose another --out")
    _, newest = rundir.find_resumable(run_dir)
    if newest is not None and newest.name == f"step-{recipe.train.steps}":
        return 0  # complete: skip the trainer's set-up (model, data) just to hear that
    return resume(run_dir)  # recipe.json lists the recipe's plugins (absolute paths) already


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a run, one per step; after a resume, the newest record of a step wins."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    records = [json.loads(line) for line in lines if line.strip()]
    train = {r["step"]: r for r in records if "loss" in r}
    evals = {r["step"]: r for r in records if "val_loss" in r}
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]


def task_scores(run_dir: Path) -> dict[str, float]:
    """The newest score of each downstream task metric a run logged (``tasks/TASK/METRIC``, train.eval_tasks)."""
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return {key: value for r in records for key, value in r.items() if key.startswith("tasks/")}


def _tokens(record: dict, recipe: Recipe) -> int:
    """Tokens seen by a record's step: train records carry them; evaluation records ({step, val_loss}) do not."""
    return record.get("tokens", record["step"] * recipe.train.batch_size * recipe.train.seq_len)


# ------------------------------------------------------------------------------------------------ summaries


def _curves(recipe: Recipe, run_dir: Path, kind: str, per_token: float) -> dict:
    """A run's train and validation curves against the budget axis ``kind`` (``per_token`` units per token: 1 for
    tokens, the model's training FLOPs per token for flops), its final train loss and its steps' speeds.

    Time is the sum of the steps' own durations (evaluation and start-up excluded); step 1 counts as the median
    step, since it pays one-off costs (allocation, compilation) that are not the recipe's cost per step.
    """
    train, evals = read_metrics(run_dir)
    if not train or not evals:
        raise UserError(f"{run_dir}: metrics.jsonl has no training or evaluation records")
    tokens = [_tokens(r, recipe) for r in train]
    if kind == "time":
        seconds = [recipe.train.batch_size * recipe.train.seq_len / r["tokens_per_s"] for r in train]
        seconds[0] = median(seconds[1:] or seconds)
        axis = list(itertools.accumulate(seconds))
    else:
        axis = [t * per_token for t in tokens]
    steps = [r["step"] for r in train]
    at = [bisect.bisect_right(steps, r["step"]) - 1 for r in evals]  # the train record of each evaluation's step
    tail = train[-max(1, math.ceil(TRAIN_TAIL * len(train))) :]
    return {
        "seed": recipe.train.seed,
        "run_dir": str(run_dir),
        "train_loss": sum(r["loss"] for r in tail) / len(tail),
        "curve": [[x, r["loss"]] for x, r in zip(axis, train)],
        "val_curve": [[axis[i], r["val_loss"], r["step"]] for i, r in zip(at, evals)],
        "tokens_per_s": [r["tokens_per_s"] for r in train[1:] or train],  # step 1 pays one-off costs
        "tasks": task_scores(run_dir),
    }


def read_at(val_curve: list[list[float]], budget: float) -> tuple[float, float] | None:
    """(validation loss, step) at ``budget`` on a run's curve of [x, loss, step], interpolated linearly between
    the evaluations around it; None when the curve ends before the budget. Never extrapolates backwards."""
    xs = [x for x, *_ in val_curve]
    if budget > xs[-1]:
        return None
    i = bisect.bisect_left(xs, budget)
    if xs[i] == budget:
        return val_curve[i][1], val_curve[i][2]
    if i == 0:
        raise ValueError(xs[0])
    (x0, y0, s0), (x1, y1, s1) = val_curve[i - 1], val_curve[i]
    w = (budget - x0) / (x1 - x0)
    return y0 + w * (y1 - y0), s0 + w * (s1 - s0)


def _summarize(label: str, recipes: list[Recipe], runs: list[dict], budget: tuple[str, float]) -> dict:
    """One recipe's numbers over its seeds at the budget (final train loss, validation loss at the budget), and
    its curves for the plot; a recipe with a run short of the budget gets no statistics."""
    kind, value = budget
    params, flops = model_size(recipes[0])
    row = {
        "recipe": label,
        "source": recipes[0].source,
        "parameters": params,
        "flops_per_token": flops,
        "tokens_per_s": median(itertools.chain(*(r.pop("tokens_per_s") for r in runs))),
    }  # shrugs off stragglers
    for run in runs:
        try:
            reading = read_at(run["val_curve"], value)
        except ValueError as e:
            raise UserError(
                f"{run['run_dir']}: its first evaluation is at {_si(e.args[0])} {BUDGETS[kind]}, after the "
                f"budget of {_si(value)}: evaluate more often (--set train.eval_every=N)"
            ) from None
        if reading is None:
            row.setdefault("short", []).append(run["run_dir"])
        else:
            run["val_loss"], run["at_step"] = reading
    if "short" in row:
        return row
    tasks = [key for key in runs[0]["tasks"] if all(key in r["tasks"] for r in runs)]  # what every seed scored
    return {
        **row,
        **{key: dict(zip(("mean", "std"), mean_std([r[key] for r in runs]))) for key in ("train_loss", "val_loss")},
        "tasks": {key: dict(zip(("mean", "std"), mean_std([r["tasks"][key] for r in runs]))) for key in tasks},
        "runs": runs,
    }


def _diverged(label: str, recipes: list[Recipe], run_dirs: list[Path]) -> dict:
    """The row of a recipe one of whose seeds diverged: its size and which runs, no losses to compare."""
    params, flops = model_size(recipes[0])
    return {
        "recipe": label,
        "source": recipes[0].source,
        "parameters": params,
        "flops_per_token": flops,
        "diverged": [str(d) for d in run_dirs],
    }


def _add_differences(rows: list[dict]) -> None:
    """Each variant's paired difference from the base (rows[0]) in final train and validation loss (none for
    a diverged recipe, nor for any when the base diverged)."""
    if "runs" not in rows[0]:
        return
    base = rows[0]["runs"]
    for row in (row for row in rows[1:] if "runs" in row):
        row["vs_base"] = {}
        for key in ("train_loss", "val_loss"):
            difference = paired_difference([r[key] for r in base], [r[key] for r in row["runs"]], LEVEL)
            row["vs_base"][key] = vars(difference)


def _si(value: float) -> str:
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:.3g}"


def format_table(rows: list[dict]) -> str:
    """The comparison as aligned text; the difference columns say variant − base (negative: variant better);
    then one column per downstream task metric (train.eval_tasks), its final score."""
    seeds = max(len(row.get("runs", [])) for row in rows)
    tasks = list(dict.fromkeys(key for row in rows for key in row.get("tasks", {})))

    def loss(stat):
        return f"{stat['mean']:.4f}" + (f" ± {stat['std']:.4f}" if seeds > 1 else "")

    header = ["recipe", "params", "FLOPs/tok", "tok/s", "train loss", "val loss", "Δ val vs base"]
    if seeds > 1:
        header[-1] += f" [{LEVEL:.0%} CI]"
        header.append("p")
    header += [key.removeprefix("tasks/") for key in tasks]
    table = [header]
    for i, row in enumerate(rows):
        if "runs" not in row:  # diverged, or short of the budget
            what, runs = (
                ("diverged", len(row["diverged"])) if "diverged" in row else ("short of budget", len(row["short"]))
            )
            table.append(
                [
                    row["recipe"],
                    _si(row["parameters"]),
                    _si(row["flops_per_token"]),
                    "",
                    what,
                    f"{runs} run{'s' * (runs > 1)}",
                    "(base)" if i == 0 else "",
                    *([""] * (seeds > 1)),
                    *([""] * len(tasks)),
                ]
            )
            continue
        cells = [
            row["recipe"],
            _si(row["parameters"]),
            _si(row["flops_per_token"]),
            _si(row["tokens_per_s"]),
            loss(row["train_loss"]),
            loss(row["val_loss"]),
        ]
        difference = row.get("vs_base", {}).get("val_loss")
        if difference is None:
            cells += ["(base)" if i == 0 else "(base not compared)"] + ([""] if seeds > 1 else [])
        elif seeds > 1:
            cells += [
                f"{difference['mean']:+.4f} [{difference['ci_low']:+.4f}, {difference['ci_high']:+.4f}]",
                f"{difference['p_value']:.3g}",
            ]
        else:
            cells.append(f"{difference['mean']:+.4f}")
        cells += [loss(row["tasks"][key]) if key in row.get("tasks", {}) else "" for key in tasks]
        table.append(cells)
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in table]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, budget: tuple[str, float] = ("tokens", math.inf)) -> None:
    """Loss vs the budget's axis (tokens, training FLOPs or seconds), one colour per recipe: the mean train curve over seeds, shaded between the seeds' min
    and max, and the validation losses (dashed, mean ± std); the right panel zooms on the second half of the
    run, where variants separate."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    zoom_x, zoom_y = [], []
    for i, row in enumerate(rows):
        steps = min(len(r["curve"]) for r in row["runs"])
        curves = np.array([r["curve"][:steps] for r in row["runs"]])  # (seeds, steps, [tokens, loss])
        tokens, losses = curves[:, :, 0].mean(0), curves[:, :, 1]  # seconds differ per seed: their mean
        evals = np.array([r["val_curve"] for r in row["runs"]])  # (seeds, evaluations, [tokens, loss])
        val_tokens, val_mean = evals[:, :, 0].mean(0), evals[:, :, 1].mean(0)
        val_std = evals[:, :, 1].std(0, ddof=1) if len(evals) > 1 else np.zeros_like(val_mean)
        for ax in axes:
            ax.plot(tokens, losses.mean(0), color=f"C{i}", lw=1.2, label=row["recipe"])
            ax.fill_between(tokens, losses.min(0), losses.max(0), color=f"C{i}", alpha=0.2, lw=0)
            ax.errorbar(val_tokens, val_mean, yerr=val_std, color=f"C{i}", ls="--", marker="o", capsize=3)
        zoom_x.append(tokens[steps // 2])
        late = val_tokens >= tokens[steps // 2]
        zoom_y += [
            losses[:, steps // 2 :].min(),
            losses[:, steps // 2 :].max(),
            *(val_mean - val_std)[late],
            *(val_mean + val_std)[late],
        ]
    margin = 0.05 * (max(zoom_y) - min(zoom_y)) or 0.01
    axes[1].set_xlim(left=min(zoom_x))
    axes[1].set_ylim(min(zoom_y) - margin, max(zoom_y) + margin)
    for ax, title in zip(axes, ("whole run", "second half")):
        ax.set(xlabel=BUDGETS[budget[0]], ylabel="loss", title=title)
        ax.grid(alpha=0.3)
        if math.isfinite(budget[1]):
            ax.axvline(budget[1], color="k", lw=0.8, ls=":")
    axes[0].legend()
    seeds = len(rows[0]["runs"])
    fig.suptitle(
        f"train loss (line: mean over {seeds} seed{'s' * (seeds > 1)}, band: min–max); "
        "dashed: validation loss, mean ± std; dotted: the budget compared at"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- compare


def parse_budget(text: str) -> tuple[str, float | None]:
    """``KIND`` or ``KIND=VALUE`` (``time=600``, ``flops=1e15``) -> (kind, value or None: the most every run reached)."""
    kind, _, value = text.partition("=")
    if kind not in BUDGETS:
        raise UserError(f"--budget {text}: the kind must be one of {', '.join(BUDGETS)}")
    if not value:
        return kind, None
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        raise UserError(f"--budget {text}: the value must be a positive number of {BUDGETS[kind]}")
    return kind, number


def variance(recipes: list[Recipe]) -> dict:
    """What the spread over seeds measures: initialisation always; data order where data.shuffle lets the seed
    set the order of the training documents (in every recipe, or it is a mixed comparison)."""
    shuffled = {recipe.data.shuffle for recipe in recipes}
    order = "mixed" if len(shuffled) > 1 else shuffled.pop()
    what = {
        False: "initialisation only (every seed sees the same batches in the same order)",
        True: "initialisation and data order (data.shuffle: the seed sets both)",
        "mixed": "mixed: data.shuffle is on in some recipes only, so their seeds also vary the data order",
    }[order]
    return {"initialisation": True, "data_order": order, "measured": what}


def _report(rows: list[dict], out: Path, budget: tuple[str, float], spread: dict, seeds: int) -> None:
    """Plot, write compare.json and print the table with what it compared at and which variance it measured."""
    kind, value = budget
    trained = [row for row in rows if "runs" in row]
    if trained:
        plot(trained, out / "compare.png", (kind, value))
    drop = ("curve", "val_curve")  # they stay in each run's metrics.jsonl
    results = [
        {**row, "runs": [{k: v for k, v in run.items() if k not in drop} for run in row["runs"]]}
        if "runs" in row
        else row
        for row in rows
    ]
    (out / "compare.json").write_text(
        json.dumps(
            {
                "base": rows[0]["recipe"],
                "level": LEVEL,
                "test": "paired t (by seed)",
                "budget": {"kind": kind, "value": value, "unit": BUDGETS[kind]},
                "variance": spread,
                "recipes": results,
            },
            indent=2,
        )
    )
    print(format_table(rows))
    print(
        f"validation loss at an equal budget of {_si(value)} {BUDGETS[kind]} (--budget {kind}), read off each "
        f"run's evaluations; train loss: the last {TRAIN_TAIL:.0%} of steps"
    )
    print(f"spread over {seeds} seed{'s' * (seeds > 1)}: {spread['measured']}")
    print(f"wrote {out / 'compare.png'} and {out / 'compare.json'}" if trained else f"wrote {out / 'compare.json'}")


def compare(
    specs: list[str],
    steps: int | None = None,
    seeds: int = 1,
    overrides: dict | None = None,
    out: Path | None = None,
    plugin_specs=(),
    budget: str = "tokens",
    vary_data_order: bool = False,
) -> int:
    """Train (or resume) BASE = specs[0] and every variant for ``seeds`` seeds, then report at ``budget``;
    ``vary_data_order`` sets data.shuffle in every run, so the seed also sets the documents' order."""
    if seeds < 1 or (steps is not None and steps < 1):
        raise UserError("--seeds and --steps must be at least 1")
    kind, value = parse_budget(budget)
    overrides = {
        **(overrides or {}),
        **({"train.steps": steps} if steps else {}),
        **({"data.shuffle": True} if vary_data_order else {}),
    }
    first_seed = load_recipe(specs[0], overrides, plugin_specs).train.seed
    recipes = [
        [load_recipe(spec, {**overrides, "train.seed": first_seed + k}, plugin_specs) for k in range(seeds)]
        for spec in specs
    ]  # recipes[i][k]: recipe i, seed k
    labels = _labels([r[0] for r in recipes])
    out = Path(out) if out else Path("runs") / f"compare-{datetime.now():%Y%m%d-%H%M%S}"
    run_dirs = [[out / label / f"seed-{r.train.seed}" for r in per_seed] for label, per_seed in zip(labels, recipes)]
    diverged = set()  # run directories whose training diverged: a result to table, not a reason to stop
    for k in range(seeds):
        for label, per_seed, dirs in zip(labels, recipes, run_dirs):
            print(f"compare: {label}, seed {per_seed[k].train.seed} -> {dirs[k]}", file=sys.stderr)
            try:
                code = _run(per_seed[k], dirs[k])
            except DivergedError as e:
                print(f"compare: {dirs[k]} diverged ({e}); it is tabled as diverged", file=sys.stderr)
                diverged.add(dirs[k])
                continue
            if code:
                print(
                    f"compare: {dirs[k]} stopped with exit code {code}; rerun the same command to resume",
                    file=sys.stderr,
                )
                return code
    curves = {
        label: [_curves(r, d, kind, model_size(r)[1] if kind == "flops" else 1.0) for r, d in zip(per_seed, dirs)]
        for label, per_seed, dirs in zip(labels, recipes, run_dirs)
        if diverged.isdisjoint(dirs)
    }
    if value is None:  # the most every run reached: each run's curve ends at or after it
        value = min((run["val_curve"][-1][0] for runs in curves.values() for run in runs), default=math.inf)
    rows = [
        _summarize(label, per_seed, curves[label], (kind, value))
        if label in curves
        else _diverged(label, per_seed, [d for d in dirs if d in diverged])
        for label, per_seed, dirs in zip(labels, recipes, run_dirs)
    ]
    _add_differences(rows)
    _report(rows, out, (kind, value), variance([per_seed[0] for per_seed in recipes]), seeds)
    return 0


# ------------------------------------------------------------------------------------------------------- diff


def _flatten(recipe: Recipe) -> dict:
    """Dotted keys -> values; a component becomes ``model.KEY`` (its name) plus ``model.KEY.OPTION`` per option,
    also inside layer tables (``model.layer_types.local.attention.window``)."""
    data = recipe.to_dict()
    flat = {"plugins": data["plugins"]}

    def add_component(prefix: str, value):
        name, options = component(value)
        flat[prefix] = name
        flat.update({f"{prefix}.{option}": v for option, v in options.items()})

    for section in SECTIONS:
        for key, value in data[section].items():
            if section == "model" and key in COMPONENT_KEYS:
                add_component(f"model.{key}", value)
            elif section == "model" and key in LAYER_TABLES:
                for name, table in value.items():
                    flat[f"model.{key}.{name}"] = "table"  # it exists (it may be empty)
                    for kind, spec in table.items():
                        add_component(f"model.{key}.{name}.{kind}", spec)
            else:
                flat[f"{section}.{key}"] = value
    return flat


def _ranges(indices: list[int]) -> str:
    """0, 2, 4, 6 -> "0-6 step 2"; 0, 1, 2, 4 -> "0-2, 4"."""
    if len(indices) > 2 and len({b - a for a, b in itertools.pairwise(indices)}) == 1 and indices[1] - indices[0] > 1:
        return f"{indices[0]}-{indices[-1]} step {indices[1] - indices[0]}"
    runs = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _inline(spec) -> str:
    """A component spec as TOML writes it: "sdpa" or {name = "sdpa", window = 512}."""
    if isinstance(spec, str):
        return json.dumps(spec)
    return (
        "{"
        + ", ".join(f"{k} = {_inline(v) if isinstance(v, (str, dict)) else json.dumps(v)}" for k, v in spec.items())
        + "}"
    )


def format_layout(recipe: Recipe) -> list[str]:
    """The resolved layer layout, one line per distinct layer spec with its layer indices; only the components
    that differ between the lines are shown (all alike: one line)."""
    specs = layer_specs(recipe.model)
    keys = [{kind: canonical(spec) for kind, spec in layer.items()} for layer in specs]
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(json.dumps(key, sort_keys=True), []).append(i)
    if len(groups) == 1:
        return [f"layers {_ranges(list(range(len(specs))))}: all alike"]
    varying = [kind for kind in COMPONENT_KEYS if len({key[kind] for key in keys}) > 1]
    lines = []
    for indices in groups.values():
        spec = specs[indices[0]]
        parts = "  ".join(f"{kind} = {_inline(spec[kind])}" for kind in varying)
        lines.append(
            f"layer {indices[0]}: {parts}"
            if len(indices) == 1
            else f"layers {_ranges(indices)} ({len(indices)}): {parts}"
        )
    return lines


def recipe_diff(a: Recipe, b: Recipe) -> list[tuple[str, object, object]]:
    """(key, value in a, value in b) for every key that differs, components first; a missing option is None."""
    flat_a, flat_b = _flatten(a), _flatten(b)
    keys = [k for k in dict.fromkeys([*flat_a, *flat_b]) if flat_a.get(k) != flat_b.get(k)]
    return sorted(((k, flat_a.get(k), flat_b.get(k)) for k in keys), key=lambda d: not _is_component(d[0]))


def _is_component(key: str) -> bool:
    parts = key.split(".")
    return parts[0] == "model" and (parts[1] in COMPONENT_KEYS or parts[1] in LAYER_TABLES)


def format_diff(a: Recipe, b: Recipe) -> str:
    (params_a, flops_a), (params_b, flops_b) = model_size(a), model_size(b)
    differences = recipe_diff(a, b)
    rows = [
        ("", a.name, b.name),
        ("parameters", f"{params_a:,}", f"{params_b:,}"),
        ("FLOPs/token", f"{flops_a:.4g}", f"{flops_b:.4g}"),
    ]
    for title, wanted in (("components", True), ("hyperparameters", False)):
        group = [
            (f"  {k}", "(unset)" if va is None else str(va), "(unset)" if vb is None else str(vb))
            for k, va, vb in differences
            if _is_component(k) == wanted
        ]
        rows += [(title, "", ""), *group] if group else []
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    layout_a, layout_b = format_layout(a), format_layout(b)
    if layout_a != layout_b:  # the layers that result from the keys above
        lines += [
            "layout",
            f"  {a.name}:",
            *(f"    {line}" for line in layout_a),
            f"  {b.name}:",
            *(f"    {line}" for line in layout_b),
        ]
    return "\n".join(lines + ([] if differences else ["the resolved recipes are identical"]))
