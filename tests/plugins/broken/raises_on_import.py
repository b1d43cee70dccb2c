"""A plugin whose import fails: minsota must report it in one line naming the plugin."""

raise RuntimeError("this plugin is broken on purpose")
