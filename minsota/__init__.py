"""minsota: a compact, hackable state-of-the-art decoder-only language model and trainer.

The public surface: `hookimpl` (for plugins), `override` (replace a registered name deliberately),
`load_plugins` (the registries), `load_recipe` and `build_model`. They are imported on first use (PEP 562), so
`import minsota.cli` does not import torch: the CLI's heavy imports run inside its error handling, where a
Ctrl-C is one line rather than a traceback.
"""

import importlib

__version__ = "0.1.0"
__all__ = ["hookimpl", "override", "Registry", "load_plugins", "load_recipe", "build_model", "__version__"]
_HOMES = {
    "hookimpl": "minsota.hookspecs",
    "override": "minsota.registry",
    "Registry": "minsota.registry",
    "load_plugins": "minsota.plugins",
    "load_recipe": "minsota.loader",
    "build_model": "minsota.model",
}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'minsota' has no attribute {name!r}")
