"""Built-in learning-rate schedules: each a multiplier of every parameter group's base lr after the trainer's
warmup (``train.warmup_steps``/``warmup_shape``, shared by all schedules), so groups keep their ratios.

cosine decay to ``min_lr_ratio`` (Chinchilla, Hoffmann et al. 2022, arXiv:2203.15556; the default),
warmup-stable-decay (Hu et al. 2024, arXiv:2404.06395) with the 1-sqrt cooldown of Hägele et al. 2024
(arXiv:2405.18392), constant, linear decay, and inverse square root (Vaswani et al. 2017, arXiv:1706.03762;
continued from the end of warmup). Options default to the ``[train]`` keys of the same name.
"""

import math

from minsota import hookimpl


def _ratio(cfg, min_lr_ratio):
    ratio = cfg.min_lr_ratio if min_lr_ratio is None else min_lr_ratio
    if not 0 <= ratio <= 1:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {ratio}")
    return ratio


def cosine(cfg, min_lr_ratio: float | None = None):
    """Cosine decay from 1 after warmup to min_lr_ratio on the last step."""
    warmup, ratio = cfg.warmup_count(), _ratio(cfg, min_lr_ratio)

    def multiplier(step: int) -> float:
        progress = (step - warmup) / max(1, cfg.steps - 1 - warmup)
        return ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def wsd(cfg, min_lr_ratio: float | None = None, decay_fraction: float | None = None):
    """Warmup-stable-decay: 1 until the last decay_fraction of steps, then a 1-sqrt cooldown to min_lr_ratio."""
    ratio, fraction = _ratio(cfg, min_lr_ratio), cfg.decay_fraction if decay_fraction is None else decay_fraction
    if not 0 <= fraction <= 1:
        raise ValueError(f"decay_fraction must be in [0, 1], got {fraction}")
    decay_start = cfg.steps - round(fraction * cfg.steps)

    def multiplier(step: int) -> float:
        if step < decay_start:
            return 1.0
        return ratio + (1 - ratio) * (1 - math.sqrt((step - decay_start + 1) / (cfg.steps - decay_start)))

    return multiplier


def constant(cfg):
    """1 after warmup (schedule-free optimizers want this)."""
    return lambda step: 1.0


def linear(cfg, min_lr_ratio: float | None = None):
    """Linear decay from 1 after warmup to min_lr_ratio on the last step."""
    warmup, ratio = cfg.warmup_count(), _ratio(cfg, min_lr_ratio)
    return lambda step: 1 - (1 - ratio) * (step - warmup) / max(1, cfg.steps - 1 - warmup)


def inverse_sqrt(cfg, timescale: int | None = None):
    """1/sqrt(step / timescale) from step = timescale (default: the warmup's length, at least 1)."""
    scale = timescale if timescale is not None else max(1, cfg.warmup_count())
    if scale < 1:
        raise ValueError(f"timescale must be >= 1, got {scale}")
    return lambda step: math.sqrt(scale / max(step, scale))


@hookimpl
def minsota_register_schedules():
    return {"cosine": cosine, "wsd": wsd, "constant": constant, "linear": linear, "inverse-sqrt": inverse_sqrt}
