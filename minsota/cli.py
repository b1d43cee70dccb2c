"""The `minsota` command line: train, recipes, list, show, plugins.

Exit codes (every command): 0 ok · 1 internal error · 2 user error (bad recipe, argument, plugin, data
source, checkpoint) · 3 training diverged · 130 after SIGINT · 143 after SIGTERM. A user error is one
line on stderr; MINSOTA_DEBUG=1 adds the traceback.
"""

import argparse
import json
import os
import sys
import traceback
from datetime import datetime
from pathlib import Path

from minsota.errors import EXIT_INTERNAL, EXIT_SIGINT, UserError
from minsota.plugins import KINDS, load_plugins
from minsota.recipe import load_recipe, parse_override


def _overrides(args) -> dict:
    return dict(parse_override(text) for text in args.set)


def _recipe(args):
    return load_recipe(args.recipe, _overrides(args), args.plugin)


def cmd_recipes(args):
    registry = load_plugins(args.plugin).registry("recipe")
    width = max(map(len, registry.list()), default=0)
    for name in registry.list():
        print(f"{name:<{width}}  {registry.describe(name).summary}")


def cmd_list(args):
    plugins = load_plugins(args.plugin)
    kinds = list(KINDS)
    if args.kind:
        kind = args.kind.removesuffix("s") if args.kind not in KINDS else args.kind
        if kind not in KINDS:
            raise UserError(f"unknown component kind '{args.kind}' (one of: {', '.join(KINDS)})")
        kinds = [kind]
    rows = [(kind, e.name, e.provider, e.summary) for kind in kinds
            for e in map(plugins.registry(kind).describe, plugins.registry(kind).list())]
    widths = [max((len(r[i]) for r in rows), default=0) for i in range(3)]
    for row in rows:
        print("  ".join(f"{c:<{w}}" for c, w in zip(row, widths)) + f"  {row[3]}")


def describe_model(recipe) -> list[str]:
    """The lines `show` prints under the recipe: exact parameter count and FLOPs per token."""
    from minsota.model import build_model

    model = build_model(recipe, device="meta")  # nothing allocated: 7B recipes show in a second
    seq_len = recipe.train.seq_len
    return [f"parameters: {model.num_parameters():,}",
            f"FLOPs/token: {model.flops_per_token(seq_len):.4g} (training, seq_len {seq_len})"]


def cmd_show(args):
    recipe = _recipe(args)
    summary = describe_model(recipe)
    print(json.dumps(recipe.to_dict(), indent=2))
    print("\n".join(summary))


def cmd_plugins(args):
    for info in load_plugins(args.plugin).infos.values():
        print(f"{info.name:<14} {info.distribution:<16} {info.version:<10} {info.module}")


def cmd_train(args):
    from minsota.train import train

    if args.resume:
        return train(None, Path(args.resume), resume=True, overrides=_overrides(args), plugins=args.plugin)
    recipe = _recipe(args)
    run_dir = Path(args.out) if args.out else Path("runs") / f"{recipe.name}-{datetime.now():%Y%m%d-%H%M%S}"
    return train(recipe, run_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minsota", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--plugin", action="append", default=[], metavar="PATH_OR_MODULE",
                        help="load a local plugin file or module (repeatable)")
    overridable = argparse.ArgumentParser(add_help=False)
    overridable.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE",
                             help="override a recipe key (TOML value; a bare word is a string)")

    p = sub.add_parser("train", parents=[common, overridable], help="train a recipe (default: quickstart)")
    p.add_argument("recipe", nargs="?", default="quickstart", help="recipe name or TOML path")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory (default: runs/RECIPE-TIMESTAMP)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its newest valid checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("recipes", parents=[common], help="list recipes with a one-line description")
    p.set_defaults(func=cmd_recipes)
    p = sub.add_parser("list", parents=[common], help="list registered components")
    p.add_argument("kind", nargs="?", help=f"one of: {', '.join(KINDS)}")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("show", parents=[common, overridable], help="print a resolved recipe, parameters, FLOPs/token")
    p.add_argument("recipe")
    p.set_defaults(func=cmd_show)
    p = sub.add_parser("plugins", parents=[common], help="list loaded plugins with distribution and version")
    p.set_defaults(func=cmd_plugins)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except UserError as e:
        if os.environ.get("MINSOTA_DEBUG"):
            traceback.print_exc()
        print(f"minsota: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return EXIT_SIGINT
    except Exception:
        traceback.print_exc()
        print("minsota: internal error (a bug: please report it with the traceback above)", file=sys.stderr)
        return EXIT_INTERNAL
