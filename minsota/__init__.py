"""minsota: a compact, hackable state-of-the-art decoder-only language model and trainer.

The public surface: `hookimpl` (for plugins), `override` (replace a registered name deliberately),
`load_plugins` (the registries), `load_recipe` and `build_model`.
"""

from minsota.hookspecs import hookimpl
from minsota.loader import load_recipe
from minsota.model import build_model
from minsota.plugins import load_plugins
from minsota.registry import Registry, override

__version__ = "0.1.0"
__all__ = ["hookimpl", "override", "Registry", "load_plugins", "load_recipe", "build_model", "__version__"]
