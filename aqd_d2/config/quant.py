"""MODEL.QUANT: the precision policy of the conversion pass (aqd_d2.convert)."""
from __future__ import annotations

from detectron2.config import CfgNode as CN

from .checks import ConfigError, check_choice  # noqa: F401


#: defaults of MODEL.QUANT.SCOPE / COMPONENT_PREFIXES / LAST_LAYERS (also QuantPolicy's defaults,
#: aqd_d2.quant_policy, so the two cannot drift apart)
DEFAULT_SCOPE = ("backbone", "fpn", "head")
DEFAULT_COMPONENT_PREFIXES = (
    "backbone:backbone.bottom_up.",
    "fpn:backbone.fpn_lateral",
    "fpn:backbone.fpn_output",
    "fpn:backbone.top_block.",
    "backbone:backbone.",
    "head:head.",
    "head:proposal_generator.",
    "head:roi_heads.",
)
#: values of MODEL.QUANT.FUSED_KERNELS (a subset of aqd_d2.quantization.triton_ops.FUSED_MODES)
FUSED_KERNELS_CHOICES = ("auto", "off")
DEFAULT_LAST_LAYERS = (
    r"head\.(cls_score|bbox_pred|ctrness)",
    r"proposal_generator\.rpn_head\.(objectness_logits|anchor_deltas|anchor_logvar)",
    r"roi_heads\.box_predictor\..*",
    r"roi_heads\.mask_head\.predictor",
)


def add_config(cfg: CN) -> None:
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
    _C.MODEL.QUANT.SCOPE = list(DEFAULT_SCOPE)
    # "component:prefix" entries; a layer belongs to the component of the longest prefix
    # its name starts with, else to "other" (never quantized unless an override says so).
    # Defaults understand detectron2's names: FPN models (bottom_up = backbone; lateral,
    # output and top-block convs = fpn), plain backbones, RetinaNet/FCOS "head", R-CNN heads.
    _C.MODEL.QUANT.COMPONENT_PREFIXES = list(DEFAULT_COMPONENT_PREFIXES)
    # Give the first layer FIRST_LAST_BITS precision instead of W_BITS/A_BITS.
    _C.MODEL.QUANT.KEEP_FIRST_FP = True
    # Regex naming the first layer(s); "" = the first conv (registration order) of the
    # "backbone" component, i.e. the stem (else the first conv of the model).
    _C.MODEL.QUANT.FIRST_LAYER = ""
    # Give the last (prediction) layers, named by LAST_LAYERS, FIRST_LAST_BITS precision.
    _C.MODEL.QUANT.KEEP_LAST_FP = True
    # Regexes of the final prediction layers: RetinaNet/FCOS head outputs, RPN outputs (with
    # BiDet's log-variance conv),
    # R-CNN box/mask predictors. Patterns matching nothing are fine (several archs).
    _C.MODEL.QUANT.LAST_LAYERS = list(DEFAULT_LAST_LAYERS)
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
    # Fused fake-quantization kernels (aqd_d2.quantization.triton_ops): "auto" runs each
    # quantizer's forward and backward as Triton kernels (1-3 launches instead of ~10-25
    # eager ops, no host syncs) on CUDA tensors when Triton is installed, with the eager
    # formulas and gradients; "off" always uses the eager PyTorch kernels. CPU tensors
    # always use the eager kernels.
    _C.MODEL.QUANT.FUSED_KERNELS = "auto"
    # Eval-mode arithmetic of quantized layers (aqd_d2.layers.integer_eval): "auto" sums the
    # integer codes exactly and applies scales and the folded BN afterwards, as the deployed
    # CPU kernels do, on CPU tensors (so a deployed model gives the trained model's detections
    # bit for bit); "on" also on CUDA; "off" keeps the fake-quant float convolution in eval.
    # Training is not affected.
    _C.MODEL.QUANT.INTEGER_EVAL = "auto"


def validate(cfg: CN) -> None:
    """Check MODEL.QUANT (see :meth:`aqd_d2.quant_policy.QuantPolicy.from_config`).

    Method names are checked against the quantizer registry only when ENABLED (a disabled
    policy builds no quantizer). Checks that need the model (a SCOPE component or override
    matching no layer) run in :func:`aqd_d2.convert.quantize_model`.
    """
    # Imported here: aqd_d2.quant_policy imports this module (ConfigError).
    from ..quant_policy import QuantPolicy

    check_choice(cfg, "MODEL.QUANT.FUSED_KERNELS", FUSED_KERNELS_CHOICES)
    check_choice(cfg, "MODEL.QUANT.INTEGER_EVAL", ("auto", "on", "off"))

    QuantPolicy.from_config(cfg, check_methods=bool(cfg.MODEL.QUANT.ENABLED))
