"""A plugin registering a name a built-in already has: an error naming both providers."""

from minsota import hookimpl
from minsota.builtins.norms import RMSNorm


@hookimpl
def minsota_register_norms():
    return {"rmsnorm": RMSNorm}
