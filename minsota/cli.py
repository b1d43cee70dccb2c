"""The `minsota` command line: train, prepare, recipes, list, show, plugins, compare, diff, generate, eval,
import-hf, export-hf, bench.

Exit codes (every command): 0 ok · 1 internal error · 2 user error (bad recipe, argument, plugin, data
source, checkpoint) · 3 training diverged · 130 after SIGINT · 141 when stdout's reader has gone (`| head`),
quietly · 143 after SIGTERM. A user error is one line on stderr; MINSOTA_DEBUG=1 adds the traceback.
"""

import argparse
import json
import math
import os
import select
import sys
import traceback
from datetime import datetime
from pathlib import Path

from minsota.errors import EXIT_INTERNAL, EXIT_SIGINT, EXIT_SIGPIPE, UserError
from minsota.plugins import KINDS, load_plugins, plugin_of
from minsota.recipe import component, describe_recipe_file, parse_override


def finite_float(text: str) -> float:
    """An argparse type: a float that is a number (nan and inf are refused, as every float argument's)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def path_arg(text: str) -> str:
    """An argparse type for every path argument (a recipe name or path, a data spec): an empty one ('' from an
    unset shell variable) is a mistake, never the current directory or a default."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path")
    return text


def _overrides(args) -> dict:
    return dict(parse_override(text) for text in args.set)


def _recipe(args):
    from minsota.loader import load_recipe  # torch comes with it: inside main's error handling

    return load_recipe(args.recipe, _overrides(args), args.plugin)


def _summary(kind: str, entry) -> str:
    """A component's summary; a recipe's is the ``description`` its file states."""
    return describe_recipe_file(entry.factory) if kind == "recipe" else entry.summary


def cmd_recipes(args):
    registry = load_plugins(args.plugin).registry("recipe")
    width = max(map(len, registry.list()), default=0)
    for name in registry.list():
        print(f"{name:<{width}}  {_summary('recipe', registry.describe(name))}")


def cmd_list(args):
    loaded = load_plugins(args.plugin)
    kinds = list(KINDS)
    if args.kind:
        kind = args.kind.removesuffix("s") if args.kind not in KINDS else args.kind
        if kind not in KINDS:
            raise UserError(f"unknown component kind '{args.kind}' (one of: {', '.join(KINDS)})")
        kinds = [kind]
    rows = [
        (kind, e.name, e.provider, _summary(kind, e))
        for kind in kinds
        for e in map(loaded.registry(kind).describe, loaded.registry(kind).list())
    ]
    widths = [max((len(r[i]) for r in rows), default=0) for i in range(3)]
    for row in rows:
        print("  ".join(f"{c:<{w}}" for c, w in zip(row, widths)) + f"  {row[3]}")


def cmd_show(args):
    from minsota.compare import format_layout
    from minsota.loader import recipe_record
    from minsota.memory import summary
    from minsota.model import active_size, build_model, model_size
    from minsota.optim import build_optimizer, describe_groups

    recipe = _recipe(args)
    params, flops = model_size(recipe)  # on "meta": 7B recipes show in a second
    groups = describe_groups(build_optimizer(build_model(recipe, device="meta"), recipe.train, recipe.plugins))
    resolved = recipe_record(recipe)
    del resolved["layers"]  # as the layout below, one line per distinct layer
    print(json.dumps(resolved, indent=2))
    print("layout:", *format_layout(recipe), sep="\n  ")
    print(f"parameters: {params:,}")
    active = active_size(recipe)
    if active != params:  # a mixture of experts: a token uses only its experts
        print(f"active parameters: {active:,} per token")
    print(f"FLOPs/token: {flops:.4g} (training, seq_len {recipe.train.seq_len})")
    print(f"memory: {summary(recipe)}")
    print(f"parameter groups: {component(recipe.train.optimizer)[0]}")
    print("\n".join(f"  {row}" for row in groups))


def cmd_plugins(args):
    for info in load_plugins(args.plugin).infos.values():
        print(f"{info.name:<14} {info.distribution:<16} {info.version:<10} {info.module}")


def cmd_train(args):
    from minsota.train import resume, train

    if args.allow_change and not args.resume:
        raise UserError("--allow-change applies to --resume only (a new run has no earlier recipe to differ from)")
    if args.resume:
        if args.recipe is not None:
            raise UserError(
                f"a recipe ('{args.recipe}') and --resume are exclusive: --resume {args.resume} "
                f"continues with the run's own recipe.json; change keys with --set"
            )
        if args.out is not None:
            raise UserError(f"--out and --resume are exclusive: the run continues in its own directory ({args.resume})")
        return resume(Path(args.resume), _overrides(args), args.plugin, args.allow_change)
    args.recipe = "quickstart" if args.recipe is None else args.recipe
    recipe = _recipe(args)
    run_dir = Path(args.out) if args.out else Path("runs") / f"{recipe.name}-{datetime.now():%Y%m%d-%H%M%S}"
    return train(recipe, run_dir)


def cmd_prepare(args):
    from minsota.loader import load_recipe
    from minsota.prepared import prepare

    overrides = {**_overrides(args), "data.source": args.source, "data.tokenizer": args.tokenizer}
    recipe = load_recipe(args.recipe, overrides, args.plugin)
    workers = max(1, (os.cpu_count() or 1) - 1) if args.workers is None else args.workers
    prepare(recipe, Path(args.out), workers, max_tokens=args.max_tokens)
    print(f"prepared {args.source} -> {args.out}; train from it with --set data.source={args.out}")


def cmd_compare(args):
    from minsota.compare import compare

    return compare(
        [args.base, *args.variants],
        args.steps,
        args.seeds,
        _overrides(args),
        args.out,
        args.plugin,
        args.budget,
        args.vary_data_order,
    )


def cmd_diff(args):
    from minsota.compare import format_diff
    from minsota.loader import load_recipe

    print(format_diff(load_recipe(args.a, plugin_specs=args.plugin), load_recipe(args.b, plugin_specs=args.plugin)))


def cmd_generate(args):
    from minsota.inference import sample_text

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    print(
        sample_text(
            Path(args.run_dir),
            args.prompt,
            args.max_new_tokens,
            args.temperature,
            args.top_k,
            args.top_p,
            args.seed,
            _overrides(args),
            args.plugin,
        )
    )


def cmd_eval(args):
    given = [
        option
        for option, value in (
            ("--batches", args.batches),
            ("--num-fewshot", args.num_fewshot),
            ("--limit", args.limit),
            ("--include-path", args.include_path),
        )
        if value is not None
    ]
    misplaced = [option for option in given if (option == "--batches") == bool(args.tasks)]  # one mode's, in the other
    if misplaced:
        what = "is for the validation loss, not" if misplaced[0] == "--batches" else "goes with"
        raise UserError(f"{misplaced[0]} {what} --tasks")
    if args.tasks:  # downstream tasks through lm-evaluation-harness (the [eval] extra)
        from minsota.inference import evaluate_run_tasks

        return print(
            evaluate_run_tasks(
                Path(args.run_dir),
                args.tasks.split(","),
                args.num_fewshot,
                args.limit,
                args.batch_size,
                args.include_path,
                _overrides(args),
                args.plugin,
            )
        )
    from minsota.inference import evaluate_run, format_evaluation

    print(format_evaluation(evaluate_run(Path(args.run_dir), _overrides(args), args.plugin, args.batches)))


def cmd_import_hf(args):
    from minsota.hf import import_to_run

    print(f"imported {args.hf_dir} -> {import_to_run(args.hf_dir, args.run_dir)}")


def cmd_export_hf(args):
    from minsota.hf import export_run

    print(f"exported {args.run_dir} -> {export_run(args.run_dir, args.out_dir, args.plugin)}")


def cmd_bench(args):
    import pytest

    suites = Path(__file__).resolve().parents[1] / "benchmarks"  # a source checkout's; wheels do not ship them
    if not suites.is_dir():
        raise UserError(
            f"no benchmark suites at {suites}: `minsota bench` runs from a source checkout (pip install -e .)"
        )
    options = ["--smoke"] if args.smoke else []
    if args.save:
        options.append(f"--benchmark-save={args.save}")
    if args.compare:
        options.append("--benchmark-compare" if args.compare == "latest" else f"--benchmark-compare={args.compare}")
    return int(pytest.main([str(suites), *options, *args.pytest_args]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minsota", description=" ".join(__doc__.split("\n\n")[0].split()))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="PATH_OR_MODULE",
        type=path_arg,
        help="load a local plugin file or module (repeatable)",
    )
    overridable = argparse.ArgumentParser(add_help=False)
    overridable.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="TABLE.KEY=VALUE",
        help="override a recipe key (TOML value; a bare word is a string)",
    )
    for add in (_add_train, _add_catalogue, _add_comparisons, _add_run_tools, _add_bench):  # in `--help`'s order
        add(sub, common, overridable)
    for command in sub.choices.values():  # an unknown option gets its command's usage, not the top level's
        command.set_defaults(parser=command)
    return parser


def _add_train(sub, common, overridable) -> None:
    p = sub.add_parser("train", parents=[common, overridable], help="train a recipe (default: quickstart)")
    p.add_argument(
        "recipe", nargs="?", type=path_arg, help="recipe name or TOML path (default: quickstart; not with --resume)"
    )
    p.add_argument(
        "--out", metavar="RUN_DIR", type=path_arg, help="a new run directory (default: runs/RECIPE-TIMESTAMP)"
    )
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        type=path_arg,
        help="continue a run from its newest valid checkpoint (or from RUN_DIR/checkpoints/step-N)",
    )
    p.add_argument(
        "--allow-change",
        action="append",
        default=[],
        metavar="KEY",
        help="with --resume: accept a changed model shape, tokenizer, batch size, sequence length, data source or "
        "order (data.shuffle, train.seed), optimizer or param groups (a dotted key such as data.source, or a table "
        "such as model; repeatable)",
    )
    p.set_defaults(func=cmd_train)
    p = sub.add_parser(
        "prepare",
        parents=[common, overridable],
        help="tokenize a data source once into memory-mapped shards that data.source can name",
    )
    p.add_argument(
        "source", metavar="SOURCE", type=path_arg, help="a data.source spec (a path, glob, stdlib, c4, hf:NAME, ...)"
    )
    p.add_argument(
        "--tokenizer", required=True, type=path_arg, help="a data.tokenizer spec (bytes, gpt-neox-20b, a path, ...)"
    )
    p.add_argument("--out", required=True, metavar="DIR", type=path_arg, help="a new directory")
    p.add_argument(
        "--recipe", default="quickstart", type=path_arg, help="whose data settings apply (text_field, holdout_every)"
    )
    p.add_argument("--workers", type=int, help="tokenizing processes (default: the cores less one)")
    p.add_argument("--max-tokens", type=int, help="end each split after about this many tokens (a prefix)")
    p.set_defaults(func=cmd_prepare)


def _add_catalogue(sub, common, overridable) -> None:
    p = sub.add_parser("recipes", parents=[common], help="list recipes with a one-line description")
    p.set_defaults(func=cmd_recipes)
    p = sub.add_parser("list", parents=[common], help="list registered components")
    p.add_argument("kind", nargs="?", help=f"one of: {', '.join(KINDS)}")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("show", parents=[common, overridable], help="print a resolved recipe, parameters, FLOPs/token")
    p.add_argument("recipe", type=path_arg)
    p.set_defaults(func=cmd_show)
    p = sub.add_parser("plugins", parents=[common], help="list loaded plugins with distribution and version")
    p.set_defaults(func=cmd_plugins)


def _add_comparisons(sub, common, overridable) -> None:
    p = sub.add_parser(
        "compare",
        parents=[common, overridable],
        help="train a base and variants over seeds: table with CIs and p-values, plot, JSON",
    )
    p.add_argument("base", type=path_arg, help="the baseline recipe (name or TOML path)")
    p.add_argument(
        "variants",
        nargs="*",
        metavar="variant",
        type=path_arg,
        help="recipes to compare with it (none: the base's own spread)",
    )
    p.add_argument("--steps", type=int, help="optimizer steps of every run (default: each recipe's own)")
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="runs per recipe, seeds base.train.seed + 0..K-1 (K > 1: confidence intervals, p-values)",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        type=path_arg,
        help="runs and results (default: runs/compare-TIMESTAMP); the same DIR again resumes",
    )
    p.add_argument(
        "--budget",
        default="tokens",
        metavar="KIND[=VALUE]",
        help="compare validation loss at equal tokens (default), flops (training FLOPs) or time "
        "(seconds of training steps); VALUE defaults to the most every run reached",
    )
    p.add_argument(
        "--vary-data-order",
        action="store_true",
        help="let each seed also set the order of the training documents (data.shuffle = true): the spread is "
        "initialisation and data-order variance, not initialisation alone",
    )
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("diff", parents=[common], help="components and hyperparameters two recipes differ in")
    p.add_argument("a", metavar="A", type=path_arg, help="recipe name or TOML path")
    p.add_argument("b", metavar="B", type=path_arg, help="recipe name or TOML path")
    p.set_defaults(func=cmd_diff)


def _add_run_tools(sub, common, overridable) -> None:
    p = sub.add_parser("generate", parents=[common, overridable], help="sample text from a run (KV cache)")
    p.add_argument("run_dir", metavar="RUN_DIR", type=path_arg, help="a run directory, or RUN_DIR/checkpoints/step-N")
    p.add_argument("--prompt", default="", help="text to continue (default: a new document)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=finite_float, default=1.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the K likeliest tokens (0: all)")
    p.add_argument(
        "--top-p", type=finite_float, default=1.0, help="nucleus: the likeliest tokens holding P probability"
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser(
        "eval",
        parents=[common, overridable],
        help="validation loss, perplexity (bits/byte for bytes) of a run, e.g. on another data.source; "
        "or downstream tasks (--tasks)",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", type=path_arg, help="a run directory, or RUN_DIR/checkpoints/step-N")
    p.add_argument("--batches", type=int, help="validation micro-batches (default: the recipe's train.eval_batches)")
    p.add_argument(
        "--tasks",
        metavar="TASK,...",
        help="lm-evaluation-harness tasks instead (hellaswag,arc_easy; "
        "needs the [eval] extra): prints the harness's table, writes RUN_DIR/eval/step-N-*.json",
    )
    p.add_argument("--num-fewshot", type=int, metavar="K", help="with --tasks: few-shot examples (default: the task's)")
    p.add_argument("--limit", type=int, metavar="N", help="with --tasks: the first N examples of each task")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="with --tasks: requests per forward")
    p.add_argument(
        "--include-path", metavar="DIR", type=path_arg, help="with --tasks: a directory of task YAML files (local data)"
    )
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser(
        "import-hf",
        help="a Hugging Face model directory (Llama, Mistral, OLMo 2, GPT-2, Gemma 2/3, Mixtral, OLMoE, Qwen3-MoE, "
        "DeepSeek-V3) -> a run directory (recipe.json, checkpoints/step-0)",
    )
    p.add_argument(
        "hf_dir", metavar="HF_DIR", type=path_arg, help="a save_pretrained directory (config.json, safetensors)"
    )
    p.add_argument("run_dir", metavar="RUN_DIR", type=path_arg, help="a new run directory")
    p.set_defaults(func=cmd_import_hf)
    p = sub.add_parser("export-hf", parents=[common], help="a run's newest checkpoint -> a Hugging Face directory")
    p.add_argument("run_dir", metavar="RUN_DIR", type=path_arg, help="a run directory, or RUN_DIR/checkpoints/step-N")
    p.add_argument(
        "out_dir", metavar="OUT_DIR", type=path_arg, help="a new directory for config.json and model.safetensors"
    )
    p.set_defaults(func=cmd_export_hf)


def _add_bench(sub, common, overridable) -> None:
    p = sub.add_parser("bench", help="run the benchmarks (kernels, blocks, train step vs HF): one summary table")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, each case once: do they run, does parity hold")
    p.add_argument("--save", metavar="NAME", help="store the results as JSON under .benchmarks/ (--benchmark-save)")
    p.add_argument(
        "--compare",
        nargs="?",
        const="latest",
        metavar="RUN",
        help="compare with a stored run (default: the newest) (--benchmark-compare)",
    )
    p.add_argument(
        "pytest_args",
        nargs="*",
        metavar="-- PYTEST_ARGS",
        help="passed on to pytest after --, e.g. -- -k attention --benchmark-disable",
    )
    p.set_defaults(func=cmd_bench)


def _stdout_gone() -> bool:
    """Whether stdout is a pipe or socket whose reader has closed it (`minsota list | head -1`)."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), 0)  # POLLERR and POLLHUP are reported whatever is asked for
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poll.poll(0))
    except (OSError, ValueError, AttributeError):  # no stdout, or one without a descriptor
        return False


def main(argv=None) -> int:
    try:
        args, unknown = build_parser().parse_known_args(argv)
        if unknown:
            args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    except KeyboardInterrupt:
        return _interrupted(KeyboardInterrupt())
    try:
        code = args.func(args) or 0
        sys.stdout.flush()  # a pipe's reader gone: found here, not at interpreter exit
        return code
    except BrokenPipeError:
        if not _stdout_gone():  # some other pipe: a bug
            return _internal_error()
        # Python's "Note on SIGPIPE": nothing more to write, and no error left for the flush at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_SIGPIPE
    except UserError as e:
        if os.environ.get("MINSOTA_DEBUG"):
            traceback.print_exc()
        print(f"minsota: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        return _interrupted(e)
    except Exception:
        return _internal_error()


def _interrupted(e: KeyboardInterrupt) -> int:
    """Ctrl-C outside the training loop (which checkpoints instead): one line, saying what was left (the trainer
    puts that in the exception), exit 130."""
    print(f"\nminsota: interrupted{f': {e}' if str(e) else ''}", file=sys.stderr)
    return EXIT_SIGINT


def _internal_error() -> int:
    """Exit 1 with the traceback, blaming the innermost plugin frame if a loaded plugin's code raised."""
    traceback.print_exc()
    frames = traceback.extract_tb(sys.exc_info()[2])
    culprit = next(((frame, info) for frame in reversed(frames) if (info := plugin_of(frame.filename))), None)
    if culprit:
        frame, info = culprit
        print(
            f"minsota: error in plugin {info.label()} at {frame.filename}:{frame.lineno}: "
            f"{sys.exc_info()[0].__name__} (its traceback above)",
            file=sys.stderr,
        )
    else:
        print("minsota: internal error (a bug: please report it with the traceback above)", file=sys.stderr)
    return EXIT_INTERNAL
