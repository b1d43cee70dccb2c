"""A recipe with what it needs loaded: its plugins, its ``extends`` chain, its local data paths made absolute.

`minsota.recipe` is the schema (TOML, ``extends``, overrides, validation against registries it is handed);
this module, one floor up, composes it with the plugin manager and the data specs, and writes the record a
run saves as ``recipe.json`` (the resolved recipe plus the plugins and versions it was built with).
"""

import json
from pathlib import Path

from minsota.data import absolute_local_paths
from minsota.errors import UserError
from minsota.plugins import load_plugins, unique_plugin_specs
from minsota.recipe import SECTIONS, Recipe, apply_overrides, build_recipe, find_recipe, read_chain


def load_recipe(name_or_path: str, overrides: dict | None = None, plugin_specs=()) -> Recipe:
    """Read, inherit, override and validate a recipe (a registered name or a TOML path).

    ``overrides`` maps dotted keys to values, e.g. ``{"model.n_layers": 4}``; ``plugin_specs`` are extra local
    plugins (files or modules, as ``--plugin``). Raises `UserError` (one line, naming file and key) on any problem.
    """
    loaded = load_plugins(plugin_specs)
    path = find_recipe(str(name_or_path), loaded.registry("recipe"))
    merged, origins = read_chain(path, loaded.registry("recipe"))
    recipe_plugins = merged.get("plugins", [])
    if recipe_plugins:  # the recipe brings plugins of its own: components may live there
        loaded = load_plugins([*plugin_specs, *recipe_plugins])
    override_keys = apply_overrides(merged, origins, overrides)
    name = path.stem
    recipe = build_recipe(merged, origins, name, str(path), override_keys, loaded.registries)
    recipe.plugins = unique_plugin_specs([*plugin_specs, *recipe_plugins])  # absolute: a resume works from any cwd
    absolute_local_paths(recipe.data, loaded)  # local data paths too: the same files from any cwd
    return recipe


def recipe_from_dict(data: dict, source: str, overrides: dict | None = None, plugin_specs=()) -> Recipe:
    """Rebuild a resolved recipe (a run's ``recipe.json``), re-validated, with optional overrides."""
    all_plugins = unique_plugin_specs([*data.get("plugins", []), *plugin_specs])  # --resume RUN --plugin same.py: once
    loaded = load_plugins(all_plugins)
    merged = {s: dict(data.get(s, {})) for s in SECTIONS}
    merged["description"] = data.get("description", "")
    merged["plugins"] = all_plugins
    origins: dict[str, str] = {}
    override_keys = apply_overrides(merged, origins, overrides)
    recipe = build_recipe(merged, origins, data.get("name", "recipe"), source, override_keys, loaded.registries)
    # an override's local data path made absolute, as load_recipe does; the saved ones are kept as written
    absolute_local_paths(recipe.data, loaded, [k for k in ("source", "tokenizer") if f"data.{k}" in override_keys])
    return recipe


def read_recipe_json(path: Path, overrides: dict | None = None, plugin_specs=()) -> Recipe:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: invalid JSON or not UTF-8
        raise UserError(f"{path}: cannot read resolved recipe: {e}") from None
    return recipe_from_dict(data, str(path), overrides, plugin_specs)


def recipe_record(recipe: Recipe) -> dict:
    """What a run saves as ``recipe.json``: the resolved recipe with the plugins (and versions) it was built with."""
    data = recipe.to_dict()
    loaded = load_plugins(recipe.plugins).infos.values()
    return {
        "name": data["name"],
        "description": data["description"],
        "plugins": data["plugins"],
        "loaded_plugins": {i.name: f"{i.distribution} {i.version}".strip() for i in loaded},
        **{section: data[section] for section in SECTIONS},
        "layers": data["layers"],
    }
