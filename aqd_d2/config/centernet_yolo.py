"""Keys of binary CenterNet (paper 003), YOLOv2 / DarkNet / MobileNet and knowledge transfer (paper 004)."""
from __future__ import annotations

from detectron2.config import CfgNode as CN

from .checks import ConfigError, check_choice  # noqa: F401


def add_config(cfg: CN) -> None:
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
    # ---- stage-wise binarization (aqd_d2.modeling.stage_schedule, carried by the detector; paper 004 sec. III-B) ----
    _C.AQD.STAGE_BINARIZATION = CN()
    # Groups of quantized layers (full-match regexes of layer names), binarized in this
    # order (paper: reverse depth, M0 = last layers); [] = off.
    _C.AQD.STAGE_BINARIZATION.GROUPS = []
    # Iteration at which each group's quantizers are switched on (non-decreasing; before it
    # the group's quantizers are disabled, i.e. the layer is float).
    _C.AQD.STAGE_BINARIZATION.ITERS = []


def validate(cfg: CN) -> None:
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
    check_choice(cfg, "MODEL.KT.TEACHER_BN_MODE", {"eval", "batch"})
    s = cfg.AQD.STAGE_BINARIZATION
    if len(s.GROUPS) != len(s.ITERS):
        raise ConfigError(f"AQD.STAGE_BINARIZATION.GROUPS ({len(s.GROUPS)}) and ITERS "
                          f"({len(s.ITERS)}) must have the same length")
    if any(b < a for a, b in zip(s.ITERS, s.ITERS[1:])) or any(i < 0 for i in s.ITERS):
        raise ConfigError(f"AQD.STAGE_BINARIZATION.ITERS = {list(s.ITERS)}: must be >= 0 and "
                          "non-decreasing")
