"""A plugin whose hook raises: minsota must report it in one line naming the plugin and the hook."""

from minsota import hookimpl


@hookimpl
def minsota_register_feedforwards():
    raise KeyError("missing config")
