"""The plugin manager: built-ins, installed entry points, local files; then one Registry per kind.

Built-in plugins (the modules in `plugins/`, installed as `minsota.builtins.*`) are declared in minsota's
own ``[project.entry-points.minsota]`` and load exactly like a third-party package's (datasette's
DEFAULT_PLUGINS idea, done through the public door). ``MINSOTA_DISABLE_PLUGIN_AUTOLOAD=1`` keeps only the
entry points of minsota's own distribution. Local plugins come from ``--plugin PATH_OR_MODULE`` or a
recipe's ``plugins = [...]``; each is loaded once however often it is named (files compared by resolved path,
modules by name). Every failure is one line naming the plugin and its distribution.
"""

import functools
import importlib
import importlib.metadata
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pluggy

from minsota import hookspecs
from minsota.errors import UserError
from minsota.registry import Registry

# kind (as used in recipes and `minsota list KIND`) -> hook name
KINDS = {
    "norm": "minsota_register_norms",
    "positional": "minsota_register_positional_encodings",
    "attention": "minsota_register_attentions",
    "feedforward": "minsota_register_feedforwards",
    "block": "minsota_register_blocks",
    "recipe": "minsota_register_recipes",
    "source": "minsota_register_data_sources",
    "tokenizer": "minsota_register_tokenizers",
    "optimizer": "minsota_register_optimizers",
    "schedule": "minsota_register_schedules",
}


@dataclass(frozen=True)
class PluginInfo:
    name: str  # the name pluggy knows it by (entry-point name, or module/file name)
    module: str
    distribution: str  # "minsota", a third-party distribution, or "local" for --plugin files/modules
    version: str

    def label(self) -> str:
        if self.distribution == "local":
            return f"'{self.name}' (local {self.module})"
        return f"'{self.name}' ({self.distribution} {self.version})"


@dataclass
class LoadedPlugins:
    """One loaded plugin set: the pluggy manager, each plugin's origin, and one Registry per kind."""

    manager: pluggy.PluginManager
    infos: dict[str, PluginInfo]
    registries: dict[str, Registry]

    def registry(self, kind: str) -> Registry:
        return self.registries[kind]


def _autoload_disabled() -> bool:
    return os.environ.get("MINSOTA_DISABLE_PLUGIN_AUTOLOAD", "").strip().lower() not in ("", "0", "false", "no")


def _entry_point_plugins():
    """(name, loader, PluginInfo) for every entry point in group "minsota", built-ins first."""
    seen, found = set(), []
    for ep in importlib.metadata.entry_points(group="minsota"):
        dist = ep.dist.name if ep.dist is not None else "unknown"
        version = ep.dist.version if ep.dist is not None else "?"
        if (dist, ep.name) in seen:
            continue
        seen.add((dist, ep.name))
        found.append((ep.load, PluginInfo(ep.name, ep.value, dist, version)))
    return sorted(found, key=lambda item: item[1].distribution != "minsota")


def _is_file_spec(spec: str) -> bool:
    """Whether a local plugin spec names a file (``*.py``, or any path that exists) rather than a module."""
    return spec.endswith(".py") or Path(spec).exists()


def resolve_plugin_spec(spec) -> str:
    """A local plugin spec as stored and compared: an existing file as its absolute resolved path (so a run's
    ``recipe.json`` still finds it from another working directory), anything else (a module name, a missing
    file, reported when loaded) unchanged."""
    spec = str(spec)
    return str(Path(spec).resolve()) if Path(spec).is_file() else spec


def unique_plugin_specs(specs) -> list[str]:
    """``specs`` resolved (`resolve_plugin_spec`), each plugin once, in first-seen order: one file or module
    named twice (``--plugin`` and a recipe's ``plugins``, a recipe chain, a resumed run's ``recipe.json``) is
    one plugin, loaded once."""
    return list(dict.fromkeys(map(resolve_plugin_spec, specs)))


def _local_plugin(spec: str):
    path = Path(spec)
    if _is_file_spec(spec):
        if path.is_dir():
            raise UserError(f"--plugin {spec}: is a directory; give a plugin's .py file or an importable module name")
        if not path.is_file():
            raise UserError(f"--plugin {spec}: no such file")
        if path.suffix != ".py":  # importlib has no loader for it: say what a plugin file is
            raise UserError(f"--plugin {spec}: not a Python file (a plugin file ends in .py)")

        def load():
            mod_spec = importlib.util.spec_from_file_location(f"minsota_local_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[mod_spec.name] = module  # importable by name: torch.compile looks its globals up there
            mod_spec.loader.exec_module(module)
            return module

        return load, PluginInfo(path.stem, str(path.resolve()), "local", "")
    return (lambda: importlib.import_module(spec)), PluginInfo(spec, spec, "local", "")


# where loaded third-party and local plugins live (a module's file, or a package's directory + "/"), so that
# an error raised from their code is reported as theirs (`plugin_of`)
_SOURCES: dict[str, PluginInfo] = {}


def plugin_of(filename: str) -> PluginInfo | None:
    """The loaded plugin (not minsota's own) whose code ``filename`` is, if any."""
    return next(
        (
            info
            for where, info in _SOURCES.items()
            if filename == where or (where.endswith(os.sep) and filename.startswith(where))
        ),
        None,
    )


def _register(pm: pluggy.PluginManager, load, info: PluginInfo, infos: dict):
    try:
        module = load()
    except Exception as e:  # the plugin's own import failed: report it, not a traceback
        raise UserError(f"plugin {info.label()} failed to import: {type(e).__name__}: {e}") from e
    file = getattr(module, "__file__", None)
    if file and info.distribution != "minsota":
        _SOURCES[os.path.dirname(file) + os.sep if os.path.basename(file) == "__init__.py" else file] = info
    if pm.is_registered(module):
        return
    try:
        pm.register(module, name=info.name if info.name not in infos else f"{info.name}@{info.module}")
    except pluggy.PluginValidationError as e:
        raise UserError(f"plugin {info.label()} is invalid: {e}") from e
    infos[pm.get_name(module)] = info


@functools.lru_cache(maxsize=8)
def _load(extra: tuple[str, ...], autoload_disabled: bool) -> LoadedPlugins:
    pm = pluggy.PluginManager("minsota")
    pm.add_hookspecs(hookspecs)
    infos: dict[str, PluginInfo] = {}
    entry_points = _entry_point_plugins()
    if not any(info.distribution == "minsota" for _, info in entry_points):
        raise UserError(
            "minsota's built-in plugins are not installed (no 'minsota' entry points): run `pip install -e .`"
        )
    for load, info in entry_points:
        if autoload_disabled and info.distribution != "minsota":
            continue
        _register(pm, load, info, infos)
    for spec in extra:
        _register(pm, *_local_plugin(spec), infos)
    try:
        pm.check_pending()  # a misspelt hook name fails loudly instead of silently registering nothing
    except pluggy.PluginValidationError as e:
        raise UserError(f"plugin {infos[pm.get_name(e.plugin)].label()}: {e}") from e

    registries = {}
    for kind, hook_name in KINDS.items():
        registry = registries[kind] = Registry(kind)
        # in load order (built-ins first), so a clash names the newcomer second and overrides can follow
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            info = infos[impl.plugin_name]
            try:
                provided = impl.function()
            except Exception as e:
                raise UserError(f"plugin {info.label()} raised in {hook_name}: {type(e).__name__}: {e}") from e
            if not isinstance(provided, dict):
                raise UserError(f"plugin {info.label()}: {hook_name} must return a dict of name -> factory")
            for name, factory in provided.items():
                registry.register(name, factory, provider=info.name)
    return LoadedPlugins(pm, infos, registries)


def load_plugins(extra=()) -> LoadedPlugins:
    """The plugin set for these local plugin specs (cached: hooks run once per process and set).

    Loading is idempotent: a spec repeated, or one file spelt two ways (relative and absolute), is loaded once.
    """
    return _load(tuple(unique_plugin_specs(extra)), _autoload_disabled())
