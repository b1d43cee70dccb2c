"""minsota's named TOML recipes (installed as `minsota.recipes`; registered by `minsota.builtins.recipes`)."""
