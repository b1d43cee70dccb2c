"""Registers every TOML file shipped in `recipes/` under its file stem."""

from importlib.resources import files

from minsota import hookimpl


@hookimpl
def minsota_register_recipes():
    return {p.name.removesuffix(".toml"): p for p in files("minsota.recipes").iterdir() if p.name.endswith(".toml")}
