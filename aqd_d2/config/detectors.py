"""Keys of the AQD detectors: FPN with BN + ReLU, head norms, FCOS (paper 002)."""
from __future__ import annotations

from detectron2.config import CfgNode as CN

from .checks import ConfigError, check_choice, get_key  # noqa: F401


def add_config(cfg: CN) -> None:
    """Keys of the AQD detectors (aqd_d2.modeling): FPN with BN + ReLU, head norms, FCOS."""
    _C = cfg
    # ---- FPN (build_aqd_resnet_fpn_backbone) ----
    # ReLU after every FPN conv (lateral, output, P6, P7), i.e. conv -> MODEL.FPN.NORM -> ReLU
    # (AQD sec. 4.3: "each convolution layer is followed by BN and ReLU").
    _C.MODEL.FPN.RELU = False
    # Input of the P6/P7 block: "res5" (detectron2's RetinaNet) or "p5" (FCOS paper).
    _C.MODEL.FPN.TOP_BLOCK_IN_FEATURE = "res5"
    # ---- RetinaNet (AQDRetinaNet) ----
    # Head norm after each tower conv: "", "GN", "BN" (shared by all levels), "SyncBN"
    # (shared NaiveSyncBatchNorm), "MultiLevelBN" (AQD sec. 3.2: per-level statistics and
    # affine), "SyncMultiLevelBN", "CycleBN" (detectron2's per-level statistics, shared
    # affine), "SyncCycleBN". Replaces detectron2's MODEL.RETINANET.NORM for AQDRetinaNet.
    _C.MODEL.RETINANET.HEAD_NORM = ""
    # ---- FCOS (registered "FCOS"; Tian et al. 2019) ----
    _C.MODEL.FCOS = CN()
    _C.MODEL.FCOS.NUM_CLASSES = 80
    # Pyramid levels the head runs on, high to low resolution.
    _C.MODEL.FCOS.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    # Convs per tower (classification and regression), each followed by HEAD_NORM and ReLU.
    _C.MODEL.FCOS.NUM_CONVS = 4
    # Head norm, same choices as MODEL.RETINANET.HEAD_NORM; "GN" is the FCOS paper's.
    _C.MODEL.FCOS.HEAD_NORM = "GN"
    # Prior probability of the classification bias initialisation (focal loss paper).
    _C.MODEL.FCOS.PRIOR_PROB = 0.01
    _C.MODEL.FCOS.FOCAL_LOSS_ALPHA = 0.25
    _C.MODEL.FCOS.FOCAL_LOSS_GAMMA = 2.0
    # Box loss: "iou" (-ln IoU, FCOS paper), "giou" (detectron2/AdelaiDet), "diou", "ciou",
    # "smooth_l1" (on stride-normalized l, t, r, b; beta SMOOTH_L1_BETA).
    _C.MODEL.FCOS.BOX_LOSS_TYPE = "giou"
    _C.MODEL.FCOS.SMOOTH_L1_BETA = 0.0
    # Center sampling: positives only within RADIUS * stride of the box center; 0 = off.
    _C.MODEL.FCOS.CENTER_SAMPLING_RADIUS = 1.5
    # Size-range boundaries m_1..m_{L-1} (pixels): level i regresses boxes whose largest
    # l/t/r/b target is in [m_{i-1}, m_i], m_0 = 0, m_L = inf (FCOS sec. 3.2). One fewer
    # than IN_FEATURES.
    _C.MODEL.FCOS.SIZES_OF_INTEREST = [64, 128, 256, 512]
    # Learnable scalar per level multiplying the box regression (FCOS paper, AdelaiDet; AQD's
    # FCOS); detectron2's FCOS omits it.
    _C.MODEL.FCOS.PER_LEVEL_SCALE = True
    # Centerness branch on the regression tower (True: improved FCOS, detectron2, AdelaiDet)
    # or on the classification tower (False: original paper).
    _C.MODEL.FCOS.CENTERNESS_ON_REG = True
    # Inference: score threshold on sqrt(cls * centerness), top-k per level, NMS IoU.
    _C.MODEL.FCOS.SCORE_THRESH_TEST = 0.05
    _C.MODEL.FCOS.TOPK_CANDIDATES_TEST = 1000
    _C.MODEL.FCOS.NMS_THRESH_TEST = 0.6


def validate(cfg: CN) -> None:
    """Check the keys of :func:`_add_detector_config`."""
    from ..modeling.meta_arch.fcos import BOX_LOSS_TYPES
    from ..modeling.meta_arch.head_norm import HEAD_NORMS

    check_choice(cfg, "MODEL.RETINANET.HEAD_NORM", set(HEAD_NORMS))
    check_choice(cfg, "MODEL.FCOS.HEAD_NORM", set(HEAD_NORMS))
    check_choice(cfg, "MODEL.FCOS.BOX_LOSS_TYPE", set(BOX_LOSS_TYPES))
    f = cfg.MODEL.FCOS
    sizes = [float(s) for s in f.SIZES_OF_INTEREST]
    if len(sizes) != len(f.IN_FEATURES) - 1:
        raise ConfigError(
            f"MODEL.FCOS.SIZES_OF_INTEREST = {list(f.SIZES_OF_INTEREST)} needs "
            f"len(MODEL.FCOS.IN_FEATURES) - 1 = {len(f.IN_FEATURES) - 1} boundaries"
        )
    if any(b <= a for a, b in zip([0.0] + sizes, sizes)):
        raise ConfigError(f"MODEL.FCOS.SIZES_OF_INTEREST = {sizes} must be positive and increasing")
    if f.CENTER_SAMPLING_RADIUS < 0:
        raise ConfigError(f"MODEL.FCOS.CENTER_SAMPLING_RADIUS = {f.CENTER_SAMPLING_RADIUS}: use >= 0 (0 = off)")
    for key in ("MODEL.FCOS.NUM_CONVS", "MODEL.FCOS.NUM_CLASSES"):
        node = get_key(cfg, key)
        if int(node) < 1:
            raise ConfigError(f"{key} = {node}: must be >= 1")
    if not 0.0 < f.PRIOR_PROB < 1.0:
        raise ConfigError(f"MODEL.FCOS.PRIOR_PROB = {f.PRIOR_PROB}: must be in (0, 1)")
