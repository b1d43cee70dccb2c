"""A plugin replacing a built-in name deliberately, through the documented switch minsota.override()."""

from minsota import hookimpl, override
from minsota.builtins.norms import RMSNorm


class LoudRMSNorm(RMSNorm):
    """RMSNorm replaced on purpose (the override test checks this summary)."""


@hookimpl
def minsota_register_norms():
    return {"rmsnorm": override(LoudRMSNorm)}
