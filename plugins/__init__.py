"""minsota's built-in plugins (installed as `minsota.builtins`): each module implements the same public
hooks a third-party plugin would, and is listed in minsota's own ``[project.entry-points.minsota]``."""
