"""Filter pruning hooks (SFP, PFEC) and the efficient Light-Head R-CNN / ShuffleNetV2 parts
(BiDet's extensions to pruned and efficient detectors: paper 000 Table 4, appendix 001 B.2).

Keys: ``AQD.PRUNING.*`` (read by :mod:`aqd_d2.engine.pruning`), ``MODEL.SHUFFLENETV2.*``
(read by :mod:`aqd_d2.modeling.backbone.shufflenetv2`) and ``MODEL.LIGHT_HEAD.*`` (read by
:mod:`aqd_d2.modeling.meta_arch.lighthead`).
"""
from __future__ import annotations

import re

from detectron2.config import CfgNode as CN

from .checks import ConfigError, check_choice, check_range

__all__ = ["add_config", "validate", "SHUFFLENETV2_CHANNELS"]

#: ShuffleNetV2 output channels of (conv1, stage2, stage3, stage4, conv5) per width multiplier
#: (Ma et al. 2018, Table 5).
SHUFFLENETV2_CHANNELS = {
    0.5: (24, 48, 96, 192, 1024),
    1.0: (24, 116, 232, 464, 1024),
    1.5: (24, 176, 352, 704, 1024),
    2.0: (24, 244, 488, 976, 2048),
}
_SHUFFLE_FEATURES = ("stem", "stage2", "stage3", "stage4", "conv5")


def add_config(cfg: CN) -> None:
    """Add this section's keys (each documented on the line above it)."""
    _C = cfg
    _C.AQD.PRUNING = CN()
    # Filter pruning applied by the detector itself before each training step (aqd_d2.pruning.schedule): "none"; "sfp" (soft filter pruning, He et al.
    # 2018: every INTERVAL iterations zero the lowest-norm filters, which keep training and may
    # regrow); "pfec" (Li et al. 2017: rank filters by L1 norm once at START_ITER, then keep
    # them at zero for the rest of training, i.e. a permanent mask).
    _C.AQD.PRUNING.METHOD = "none"
    # Fraction of each selected layer's filters that is pruned, in [0, 1). Appendix 001 B.2:
    # 0.7 for SFP, 0.3 for PFEC. floor(RATE * N) filters of a layer with N filters are pruned.
    _C.AQD.PRUNING.RATE = 0.3
    # How RATE is read: "pruned" (the papers' wording: RATE of the filters are pruned) or
    # "kept" (the official SFP code's --rate, the fraction kept: its rate 0.7 prunes 30%).
    _C.AQD.PRUNING.RATE_MEANS = "pruned"
    # Filter norm used to rank filters: "l2" (SFP, Lp norm with p = 2), "l1" (PFEC, sum of
    # absolute kernel weights), or "auto" (l2 for sfp, l1 for pfec).
    _C.AQD.PRUNING.NORM = "auto"
    # Regexes (re.search) over module names: the nn.Conv2d layers whose output filters are
    # pruned. Default: every conv of the backbone's bottom-up network.
    _C.AQD.PRUNING.LAYERS = [r"^backbone\.(bottom_up\.)?"]
    # Regexes over module names excluded from LAYERS (e.g. the stem, shortcut convs).
    _C.AQD.PRUNING.EXCLUDE = []
    # Coupled layers, "regex=>replacement": a pruned layer whose name matches regex passes its
    # mask to the conv named re.sub(regex, replacement, name) (same output channels), e.g. the
    # depthwise conv after a pruned 1x1 conv ("(branch_main)\.0$=>\1.1" in ShuffleNetV2), so
    # the channel is zero all the way to the next dense conv, as if it were removed.
    _C.AQD.PRUNING.COUPLED = []
    # Consumer rules "regex=>replacement" for hard pruning after training
    # (aqd_d2.pruning.compact.remove_pruned_channels): re.sub on a pruned conv's name gives the
    # conv that reads its output (e.g. "conv1$=>conv2" in a ResNet basic block); the pruned
    # filters and the consumer's matching input channels are then removed. [] = keep masks.
    _C.AQD.PRUNING.CONSUMERS = []
    # SFP: iterations between two pruning steps (the paper prunes once per epoch; 0 = one
    # epoch of DATASETS.TRAIN, ceil(#images / SOLVER.IMS_PER_BATCH)). SFP also prunes before
    # the first step (at START_ITER) and after the last one (the final compact model).
    _C.AQD.PRUNING.INTERVAL = 0
    # First iteration at which pruning is applied (PFEC: the one pruning step; SFP: the first).
    _C.AQD.PRUNING.START_ITER = 0
    # Also zero the scale and shift of the norm layer attached to a pruned conv
    # (detectron2 Conv2d.norm), so a pruned filter's output is exactly 0 after the norm, as if
    # the channel were removed (the channel removal of PFEC / SFP's final compact model).
    _C.AQD.PRUNING.PRUNE_NORM = True

    _C.MODEL.SHUFFLENETV2 = CN()
    # Width multiplier (Ma et al. 2018, Table 5): 0.5, 1.0, 1.5 or 2.0.
    _C.MODEL.SHUFFLENETV2.WIDTH_MULT = 0.5
    # Features returned, any of "stem" (stride 4), "stage2" (8), "stage3" (16), "stage4" (32),
    # "conv5" (32, the 1x1 conv after stage4).
    _C.MODEL.SHUFFLENETV2.OUT_FEATURES = ["stage3", "conv5"]
    # Norm after every conv (detectron2 get_norm names: "BN", "SyncBN", "FrozenBN", "GN", ...).
    _C.MODEL.SHUFFLENETV2.NORM = "BN"
    # Freeze the first N blocks (0 none, 1 the stem, 2 the stem + stage2, ... 5 all).
    _C.MODEL.SHUFFLENETV2.FREEZE_AT = 0

    _C.MODEL.LIGHT_HEAD = CN()
    # Kernel size k of the large separable convolution (Light-Head R-CNN, sec. 3.3: 15).
    _C.MODEL.LIGHT_HEAD.KERNEL_SIZE = 15
    # C_mid of the large separable convolution (Light-Head R-CNN: 64 for the small "S" model,
    # 256 for the large "L" model).
    _C.MODEL.LIGHT_HEAD.MID_CHANNELS = 64
    # alpha of the thin feature map: C_out = alpha * p * p with p = ROI_BOX_HEAD.POOLER_RESOLUTION
    # (Light-Head R-CNN: alpha = 10, so 490 channels for p = 7).
    _C.MODEL.LIGHT_HEAD.ALPHA = 10
    # ReLU on the thin feature map (sum of the two separable branches) before PS-RoIAlign.
    _C.MODEL.LIGHT_HEAD.RELU = True


def _check_regexes(cfg: CN, key: str) -> None:
    values = cfg.AQD.PRUNING[key.rsplit(".", 1)[1]]
    if not isinstance(values, (list, tuple)):
        raise ConfigError(f"{key} = {values!r}: must be a list of regular expressions")
    for v in values:
        try:
            re.compile(v)
        except (re.error, TypeError) as e:
            raise ConfigError(f"{key}: {v!r} is not a valid regular expression ({e})") from None


def validate(cfg: CN) -> None:
    """Check this section's keys; raise ConfigError naming the key and the allowed values."""
    check_choice(cfg, "AQD.PRUNING.METHOD", {"none", "sfp", "pfec"})
    check_range(cfg, "AQD.PRUNING.RATE", 0.0, 1.0, hi_open=True)
    check_choice(cfg, "AQD.PRUNING.RATE_MEANS", {"pruned", "kept"})
    if cfg.AQD.PRUNING.RATE_MEANS == "kept" and float(cfg.AQD.PRUNING.RATE) == 0.0:
        raise ConfigError("AQD.PRUNING.RATE = 0 with RATE_MEANS 'kept' would prune every filter; "
                          "use a rate in (0, 1)")
    check_choice(cfg, "AQD.PRUNING.NORM", {"auto", "l1", "l2"})
    _check_regexes(cfg, "AQD.PRUNING.LAYERS")
    _check_regexes(cfg, "AQD.PRUNING.EXCLUDE")
    for key in ("COUPLED", "CONSUMERS"):
        for rule in cfg.AQD.PRUNING[key]:
            if not isinstance(rule, str) or rule.count("=>") != 1:
                raise ConfigError(f"AQD.PRUNING.{key} entry {rule!r}: write 'regex=>replacement'")
            try:
                re.compile(rule.split("=>")[0])
            except re.error as e:
                raise ConfigError(f"AQD.PRUNING.{key} entry {rule!r}: bad regex ({e})") from None
    check_range(cfg, "AQD.PRUNING.INTERVAL", 0)
    check_range(cfg, "AQD.PRUNING.START_ITER", 0)

    check_choice(cfg, "MODEL.SHUFFLENETV2.WIDTH_MULT", set(SHUFFLENETV2_CHANNELS))
    feats = list(cfg.MODEL.SHUFFLENETV2.OUT_FEATURES)
    bad = [f for f in feats if f not in _SHUFFLE_FEATURES]
    if bad or not feats:
        raise ConfigError(f"MODEL.SHUFFLENETV2.OUT_FEATURES = {feats!r}: choose a non-empty "
                          f"subset of {list(_SHUFFLE_FEATURES)}")
    check_range(cfg, "MODEL.SHUFFLENETV2.FREEZE_AT", 0, 5)

    check_range(cfg, "MODEL.LIGHT_HEAD.KERNEL_SIZE", 1)
    if int(cfg.MODEL.LIGHT_HEAD.KERNEL_SIZE) % 2 != 1:
        raise ConfigError(f"MODEL.LIGHT_HEAD.KERNEL_SIZE = {cfg.MODEL.LIGHT_HEAD.KERNEL_SIZE!r}: "
                          "must be odd (same-size padding)")
    check_range(cfg, "MODEL.LIGHT_HEAD.MID_CHANNELS", 1)
    check_range(cfg, "MODEL.LIGHT_HEAD.ALPHA", 1)
