"""A plugin whose hookimpl matches no hookspec (a typo): minsota must refuse it, naming the plugin."""

from minsota import hookimpl


@hookimpl
def minsota_register_norm():  # the hook is minsota_register_norms
    return {}
