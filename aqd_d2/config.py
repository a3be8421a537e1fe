"""Config keys that aqd_d2 adds to detectron2's config, and their validation.

``add_aqd_config(cfg)`` adds every key on the cfg it is given (normally a fresh
``get_cfg()``); detectron2's global defaults are never mutated, so importing aqd_d2 does not
change anybody's ``get_cfg()``. Each key is documented on the line above it. Precision keys
live only under ``MODEL.QUANT``.

``validate_aqd_config(cfg)`` checks types, ranges and allowed names of those keys and raises
:class:`ConfigError` naming the key and the allowed values. Registered builders call it at
build time, so a bad value fails before any training starts.
"""
from __future__ import annotations

from detectron2.config import CfgNode as CN

__all__ = ["add_aqd_config", "validate_aqd_config", "ConfigError"]


class ConfigError(ValueError):
    """A config value aqd_d2 cannot use; the message names the key and what is allowed."""


def _add_quant_config(cfg: CN) -> None:
    """MODEL.QUANT: the precision policy read by the conversion pass (aqd_d2.convert).

    Bits are 1..8, or 32 meaning full precision (that side of a layer gets no quantizer).
    Layer names below are ``model.named_modules()`` names of the float detector; every
    pattern is a Python regex that must match the *whole* name (``re.fullmatch``).
    """
    _C = cfg
    _C.MODEL.QUANT = CN()
    # Apply the conversion pass at all. False builds the float detector.
    _C.MODEL.QUANT.ENABLED = False
    # Float meta-architecture (a META_ARCH_REGISTRY name) that the "QuantizedDetector" builder
    # builds and then converts, e.g. "RetinaNet", "GeneralizedRCNN".
    _C.MODEL.QUANT.META_ARCHITECTURE = "RetinaNet"
    # Weight quantization method (aqd_d2.quantization.available_quantizers(), e.g. "liq",
    # "lsq", "dorefa", "twn", "bnn", "xnor", "bwn", "bireal", "fp").
    _C.MODEL.QUANT.W_METHOD = "liq"
    # Weight bits: 1..8, or 32 = float weights. Binary methods need 1.
    _C.MODEL.QUANT.W_BITS = 4
    # Method quantizing each quantized layer's input activation.
    _C.MODEL.QUANT.A_METHOD = "liq"
    # Activation bits: 1..8, or 32 = float activations (e.g. binary-weight nets). Binary: 1.
    _C.MODEL.QUANT.A_BITS = 4
    # Components to quantize (AQD Table 4: backbone / +fpn / +head); each must be defined by
    # COMPONENT_PREFIXES and contain at least one conv/linear layer of the model.
    _C.MODEL.QUANT.SCOPE = ["backbone", "fpn", "head"]
    # "component:prefix" entries; a layer belongs to the component of the longest prefix
    # its name starts with, else to "other" (never quantized unless an override says so).
    # Defaults understand detectron2's names: FPN models (bottom_up = backbone; lateral,
    # output and top-block convs = fpn), plain backbones, RetinaNet/FCOS "head", R-CNN heads.
    _C.MODEL.QUANT.COMPONENT_PREFIXES = [
        "backbone:backbone.bottom_up.",
        "fpn:backbone.fpn_lateral",
        "fpn:backbone.fpn_output",
        "fpn:backbone.top_block.",
        "backbone:backbone.",
        "head:head.",
        "head:proposal_generator.",
        "head:roi_heads.",
    ]
    # Give the first layer FIRST_LAST_BITS precision instead of W_BITS/A_BITS.
    _C.MODEL.QUANT.KEEP_FIRST_FP = True
    # Regex naming the first layer(s); "" = the first conv (registration order) of the
    # "backbone" component, i.e. the stem (else the first conv of the model).
    _C.MODEL.QUANT.FIRST_LAYER = ""
    # Give the last (prediction) layers, named by LAST_LAYERS, FIRST_LAST_BITS precision.
    _C.MODEL.QUANT.KEEP_LAST_FP = True
    # Regexes of the final prediction layers: RetinaNet/FCOS head outputs, RPN outputs,
    # R-CNN box/mask predictors. Patterns matching nothing are fine (several archs).
    _C.MODEL.QUANT.LAST_LAYERS = [
        r"head\.(cls_score|bbox_pred|ctrness)",
        r"proposal_generator\.rpn_head\.(objectness_logits|anchor_deltas)",
        r"roi_heads\.box_predictor\..*",
        r"roi_heads\.mask_head\.predictor",
    ]
    # Bits of the first/last layers: 32 = float (AQD); e.g. 8 = 8-bit. A side that is float
    # globally (W_BITS/A_BITS 32) stays float.
    _C.MODEL.QUANT.FIRST_LAST_BITS = 32
    # Method of the first/last layers when FIRST_LAST_BITS < 32; "" = W_METHOD / A_METHOD
    # (must then be a multi-bit method; with binary methods set e.g. "dorefa").
    _C.MODEL.QUANT.FIRST_LAST_METHOD = ""
    # Per-layer overrides "regex:w_method:w_bits:a_method:a_bits", applied before every
    # other rule (also outside SCOPE and to first/last layers); empty fields take the global
    # value, 32 bits = float side; the last matching entry wins; each must match a layer.
    # E.g. 'head\..*:liq:2:liq:2' (2-bit heads), 'backbone\.bottom_up\.res5\..*::8::8'
    # (8-bit res5, global methods), 'head\.cls_subnet\.0:fp:32:fp:32' (float layer).
    _C.MODEL.QUANT.OVERRIDES = []
    # Weight normalization before weight quantization (AQD sec. 4.1, following APOT), for
    # methods with a `weight_norm` option (LIQ); ignored by the others.
    _C.MODEL.QUANT.W_NORM = True
    # Extra weight-quantizer options "name=value" (value parsed as a Python literal), passed
    # to methods whose constructor has that argument.
    _C.MODEL.QUANT.W_KWARGS = []
    # Same for activation quantizers.
    _C.MODEL.QUANT.A_KWARGS = []


def _validate_quant_config(cfg: CN) -> None:
    """Check MODEL.QUANT (see :meth:`aqd_d2.quant_policy.QuantPolicy.from_config`).

    Method names are checked against the quantizer registry only when ENABLED (a disabled
    policy builds no quantizer). Checks that need the model (a SCOPE component or override
    matching no layer) run in :func:`aqd_d2.convert.quantize_model`.
    """
    # Imported here: aqd_d2.quant_policy imports this module (ConfigError).
    from .quant_policy import QuantPolicy

    QuantPolicy.from_config(cfg, check_methods=bool(cfg.MODEL.QUANT.ENABLED))


def _add_engine_config(cfg: CN) -> None:
    """Keys read by aqd_d2.engine (trainer, hooks)."""
    _C = cfg
    _C.AQD = CN()
    # Evaluator for the test datasets: "auto" picks it from the dataset's metadata
    # evaluator_type ("coco" -> COCOEvaluator, "pascal_voc" -> PascalVOCDetectionEvaluator).
    _C.AQD.EVALUATOR = "auto"


def _add_detector_config(cfg: CN) -> None:
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


def _validate_detector_config(cfg: CN) -> None:
    """Check the keys of :func:`_add_detector_config`."""
    from .modeling.meta_arch.fcos import BOX_LOSS_TYPES
    from .modeling.meta_arch.head_norm import HEAD_NORMS

    _check_choice(cfg, "MODEL.RETINANET.HEAD_NORM", set(HEAD_NORMS))
    _check_choice(cfg, "MODEL.FCOS.HEAD_NORM", set(HEAD_NORMS))
    _check_choice(cfg, "MODEL.FCOS.BOX_LOSS_TYPE", set(BOX_LOSS_TYPES))
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
        node = cfg
        for part in key.split("."):
            node = node[part]
        if int(node) < 1:
            raise ConfigError(f"{key} = {node}: must be >= 1")
    if not 0.0 < f.PRIOR_PROB < 1.0:
        raise ConfigError(f"MODEL.FCOS.PRIOR_PROB = {f.PRIOR_PROB}: must be in (0, 1)")


def add_aqd_config(cfg: CN) -> CN:
    """Add every aqd_d2 config key to ``cfg`` (in place) and return it.

    Args:
        cfg: a detectron2 config, normally ``detectron2.config.get_cfg()``.
    Returns:
        the same ``cfg``, now accepting the ``MODEL.QUANT.*`` and ``AQD.*`` keys.
    """
    if "QUANT" in cfg.MODEL and "AQD" in cfg:
        return cfg  # already added
    _add_quant_config(cfg)
    _add_engine_config(cfg)
    _add_detector_config(cfg)
    _add_centernet_yolo_config(cfg)
    return cfg


def _check_choice(cfg: CN, key: str, allowed) -> None:
    node = cfg
    for part in key.split("."):
        node = node[part]
    if node not in allowed:
        raise ConfigError(f"{key} = {node!r} is not allowed; choose one of {sorted(allowed)}")


def validate_aqd_config(cfg: CN) -> None:
    """Raise :class:`ConfigError` for any aqd_d2 key with a bad type, range or name."""
    if "AQD" not in cfg or "QUANT" not in cfg.MODEL:
        raise ConfigError(
            "this config lacks aqd_d2's keys: call aqd_d2.add_aqd_config(cfg) before "
            "merging an aqd_d2 yaml file"
        )
    _check_choice(cfg, "AQD.EVALUATOR", {"auto", "coco", "pascal_voc", "none"})
    _validate_quant_config(cfg)
    _validate_detector_config(cfg)
    _validate_centernet_yolo_config(cfg)
    _validate_device(cfg)


def _validate_device(cfg: CN) -> None:
    import torch

    device = str(cfg.MODEL.DEVICE)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"MODEL.DEVICE = {device!r} but CUDA is not available on this machine; "
            "add `MODEL.DEVICE cpu` to the command line"
        )
    if not (device == "cpu" or device.startswith("cuda")):
        raise ConfigError(f"MODEL.DEVICE = {device!r}; use 'cpu', 'cuda' or 'cuda:N'")


def _add_centernet_yolo_config(cfg: CN) -> None:
    """Keys of the binary CenterNet (paper 003), YOLOv2 / DarkNet-19 / MobileNet (paper 004),
    knowledge transfer (MODEL.KT) and stage-wise binarization (AQD.STAGE_BINARIZATION)."""
    _C = cfg
    # ---- QuickNet encoder (build_quicknet_backbone; paper 003 sec. 4) ----
    _C.MODEL.QUICKNET = CN()
    # f_s: channels of the stem st(z, f_s); 0 = f_e1 (the paper's qn(z) stem).
    _C.MODEL.QUICKNET.STEM_CHANNELS = 0
    # n_i: residual blocks per scale (N_e = len); each block's 3x3 conv is the binary one.
    _C.MODEL.QUICKNET.DEPTHS = [4, 4, 4, 4]
    # f_ei: channels per scale (same length as DEPTHS).
    _C.MODEL.QUICKNET.WIDTHS = [64, 128, 256, 512]
    # BatchNorm momentum in PyTorch's convention (Keras momentum 0.9 = PyTorch 0.1).
    _C.MODEL.QUICKNET.BN_MOMENTUM = 0.1
    # BatchNorm epsilon (paper: 1e-5).
    _C.MODEL.QUICKNET.BN_EPS = 1e-5
    # ---- CenterNet ("CenterNet" meta-architecture) ----
    _C.MODEL.CENTERNET = CN()
    # Number of heatmap channels (object classes).
    _C.MODEL.CENTERNET.NUM_CLASSES = 20
    # Backbone feature fed to the decoder ("enc" for QuickNet, "res5" for ResNet).
    _C.MODEL.CENTERNET.IN_FEATURE = "enc"
    # z: the square input size of the paper's variants; used by the analysis tools to count
    # MACs (configs also set INPUT.MIN_SIZE_* to it).
    _C.MODEL.CENTERNET.INPUT_SIZE = 512
    # k: kernel of the decoder's stride-2 transposed convs.
    _C.MODEL.CENTERNET.DECODER_KERNEL = 4
    # f_di: output channels of each transposed conv (N_d = len).
    _C.MODEL.CENTERNET.DECODER_CHANNELS = [256, 128, 64]
    # f_h: channels of the 3x3 conv of each head branch.
    _C.MODEL.CENTERNET.HEAD_CHANNELS = 64
    # Loss weights (CenterNet: 1, 0.1, 1).
    _C.MODEL.CENTERNET.HEATMAP_LOSS_WEIGHT = 1.0
    _C.MODEL.CENTERNET.SIZE_LOSS_WEIGHT = 0.1
    _C.MODEL.CENTERNET.OFFSET_LOSS_WEIGHT = 1.0
    # Penalty-reduced focal loss exponents alpha and beta.
    _C.MODEL.CENTERNET.FOCAL_ALPHA = 2.0
    _C.MODEL.CENTERNET.FOCAL_BETA = 4.0
    # IoU bound that sets the Gaussian radius of each object's heatmap peak.
    _C.MODEL.CENTERNET.MIN_OVERLAP = 0.7
    # Initial heatmap probability (bias of the heatmap output = -log((1-p)/p)).
    _C.MODEL.CENTERNET.PRIOR_PROB = 0.1
    # Inference: peaks kept per image, score threshold, max-pool window of peak extraction.
    _C.MODEL.CENTERNET.TOPK_TEST = 100
    _C.MODEL.CENTERNET.SCORE_THRESH_TEST = 0.05
    _C.MODEL.CENTERNET.POOL_KERNEL_TEST = 3
    # ---- DarkNet-19 / MobileNet backbones (build_darknet19_backbone, build_mobilenet_yolo_backbone) ----
    _C.MODEL.DARKNET = CN()
    # Multiplier of every channel count (1.0 = Tables I-II; smaller for CPU demos).
    _C.MODEL.DARKNET.WIDTH_MULT = 1.0
    # Negative slope of the leaky ReLU after each conv + BN.
    _C.MODEL.DARKNET.NEGATIVE_SLOPE = 0.1
    # ---- YOLOv2 ("YOLOv2" meta-architecture) ----
    _C.MODEL.YOLO = CN()
    _C.MODEL.YOLO.NUM_CLASSES = 20
    # Anchor (w, h) pairs in output-grid cells (YOLOv2 VOC anchors); 5 in the paper.
    _C.MODEL.YOLO.ANCHORS = [[1.3221, 1.73145], [3.19275, 4.00944], [5.05587, 8.09892],
                             [9.47112, 4.84053], [11.2364, 10.0071]]
    # Backbone features: the passthrough source (stride 16) and the final map (stride 32).
    _C.MODEL.YOLO.PASSTHROUGH_FEATURE = "conv5"
    _C.MODEL.YOLO.IN_FEATURE = "conv6"
    # Channels of the 1x1 conv before reorg on the passthrough (YOLOv2: 64); 0 = none.
    _C.MODEL.YOLO.PASSTHROUGH_CHANNELS = 64
    # Channels of Conv7_1, Conv7_2, Conv8_1 (times MODEL.DARKNET.WIDTH_MULT).
    _C.MODEL.YOLO.HEAD_CHANNELS = 1024
    # Region loss scales (darknet region layer): object, no-object, class, coordinates.
    _C.MODEL.YOLO.OBJECT_SCALE = 5.0
    _C.MODEL.YOLO.NOOBJECT_SCALE = 1.0
    _C.MODEL.YOLO.CLASS_SCALE = 1.0
    _C.MODEL.YOLO.COORD_SCALE = 1.0
    # Predictions whose best IoU with any gt exceeds this get no no-object loss.
    _C.MODEL.YOLO.IGNORE_THRESH = 0.6
    # Inference: score (objectness * class prob) threshold, NMS IoU, max detections.
    _C.MODEL.YOLO.SCORE_THRESH_TEST = 0.05
    _C.MODEL.YOLO.NMS_THRESH_TEST = 0.45
    _C.MODEL.YOLO.DETECTIONS_PER_IMAGE = 100
    # ---- knowledge transfer ("KnowledgeTransfer" meta-architecture; paper 004 eq. 3) ----
    _C.MODEL.KT = CN()
    # Student: a META_ARCH_REGISTRY name built from this cfg (e.g. "QuantizedDetector").
    _C.MODEL.KT.STUDENT_META_ARCHITECTURE = "QuantizedDetector"
    # Teacher config yaml; "" = this config with MODEL.QUANT.ENABLED False (float twin).
    _C.MODEL.KT.TEACHER_CONFIG = ""
    # Teacher checkpoint; "" = MODEL.WEIGHTS (the student starts from the teacher's weights).
    _C.MODEL.KT.TEACHER_WEIGHTS = ""
    # K: module names (full-match regexes) whose outputs are matched by the L2 loss; each
    # must match at least one module of both networks.
    _C.MODEL.KT.LAYERS = []
    # lambda1: weight of the classification losses (loss names matching CLS_LOSS_REGEX).
    _C.MODEL.KT.LAMBDA_CLS = 1.0
    # lambda2: weight of the localization losses (loss names matching LOC_LOSS_REGEX).
    _C.MODEL.KT.LAMBDA_LOC = 1.0
    # lambda3: weight of sum_K L2(F_t, F_s) (mean squared error per layer), "loss_kt".
    _C.MODEL.KT.LAMBDA_KT = 1.0
    # Which student losses are classification / localization (re.fullmatch on the name).
    _C.MODEL.KT.CLS_LOSS_REGEX = r"loss_(cls|heatmap|obj|noobj|class).*"
    _C.MODEL.KT.LOC_LOSS_REGEX = r"loss_(box|loc|size|offset|coord|bbox|centerness).*"
    # Teacher BatchNorm: "eval" (running statistics, a fixed teacher) or "batch" (batch
    # statistics like the training student; running statistics untouched).
    _C.MODEL.KT.TEACHER_BN_MODE = "eval"
    # ---- stage-wise binarization (aqd_d2.engine.stage_hook; paper 004 sec. III-B) ----
    _C.AQD.STAGE_BINARIZATION = CN()
    # Groups of quantized layers (full-match regexes of layer names), binarized in this
    # order (paper: reverse depth, M0 = last layers); [] = hook off.
    _C.AQD.STAGE_BINARIZATION.GROUPS = []
    # Iteration at which each group's quantizers are switched on (non-decreasing; before it
    # the group's quantizers are disabled, i.e. the layer is float).
    _C.AQD.STAGE_BINARIZATION.ITERS = []


def _validate_centernet_yolo_config(cfg: CN) -> None:
    """Check the keys of :func:`_add_centernet_yolo_config`."""
    q = cfg.MODEL.QUICKNET
    if len(q.DEPTHS) != len(q.WIDTHS) or not q.DEPTHS:
        raise ConfigError(f"MODEL.QUICKNET.DEPTHS {list(q.DEPTHS)} and WIDTHS {list(q.WIDTHS)} "
                          "must be non-empty lists of the same length")
    if any(int(n) < 0 for n in q.DEPTHS) or any(int(f) < 1 for f in q.WIDTHS):
        raise ConfigError("MODEL.QUICKNET.DEPTHS must be >= 0 and WIDTHS >= 1")
    c = cfg.MODEL.CENTERNET
    if c.DECODER_KERNEL < 2:
        raise ConfigError(f"MODEL.CENTERNET.DECODER_KERNEL = {c.DECODER_KERNEL}: must be >= 2")
    if c.NUM_CLASSES < 1 or c.HEAD_CHANNELS < 1:
        raise ConfigError("MODEL.CENTERNET.NUM_CLASSES and HEAD_CHANNELS must be >= 1")
    if not 0.0 < c.MIN_OVERLAP < 1.0:
        raise ConfigError(f"MODEL.CENTERNET.MIN_OVERLAP = {c.MIN_OVERLAP}: must be in (0, 1)")
    y = cfg.MODEL.YOLO
    if not y.ANCHORS or any(len(a) != 2 or min(a) <= 0 for a in y.ANCHORS):
        raise ConfigError(f"MODEL.YOLO.ANCHORS = {y.ANCHORS}: need positive [w, h] pairs")
    if cfg.MODEL.DARKNET.WIDTH_MULT <= 0:
        raise ConfigError("MODEL.DARKNET.WIDTH_MULT must be > 0")
    _check_choice(cfg, "MODEL.KT.TEACHER_BN_MODE", {"eval", "batch"})
    s = cfg.AQD.STAGE_BINARIZATION
    if len(s.GROUPS) != len(s.ITERS):
        raise ConfigError(f"AQD.STAGE_BINARIZATION.GROUPS ({len(s.GROUPS)}) and ITERS "
                          f"({len(s.ITERS)}) must have the same length")
    if any(b < a for a, b in zip(s.ITERS, s.ITERS[1:])) or any(i < 0 for i in s.ITERS):
        raise ConfigError(f"AQD.STAGE_BINARIZATION.ITERS = {list(s.ITERS)}: must be >= 0 and "
                          "non-decreasing")
