"""BiDet / AutoBiDet (papers 000, 001): information bottleneck, sparse object priors, complexity
estimator (MODEL.BIDET.*).

Read by :mod:`aqd_d2.modeling.bidet` (losses, the ``BiDetRCNN`` meta-architecture, the box
predictor with a log-variance branch) and :mod:`aqd_d2.engine.gan_loop` (``BiDetGANLoop``).
Defaults are the paper's (beta 10, gamma 0.2, sine transform with delta3 10 and theta3 5);
the official BiDet code's simplifications are switches that default to off.
"""
from __future__ import annotations

from detectron2.config import CfgNode as CN

from .checks import ConfigError, check_choice, check_range  # noqa: F401

FEATURE_PRIORS = ("binomial", "categorical", "gaussian")
FEATURE_REDUCTIONS = ("sum", "mean")
SOP_MODES = ("none", "sop", "csop", "csop_no_nc")
RPN_PRIORS = ("rpn", "standard")
TRANSFORMS = ("linear", "exponential", "sine")
ESTIMATORS = ("gan", "beta_vae", "random_uniform", "random_beta")
G_LOSSES = ("minimax", "non_saturating")
# loops that train the complexity estimator (the GAN / beta-VAE need one)
ESTIMATOR_LOOPS = ("BiDetGANLoop",)


def add_config(cfg: CN) -> None:
    """Add MODEL.BIDET.* (each key documented on the line above it)."""
    _C = cfg
    _C.MODEL.BIDET = CN()
    # beta of paper 000 eq. 2 / 7: weight of the detection (class + location) information
    # terms relative to I(X;F). Used when AUTO.ENABLED is False.
    _C.MODEL.BIDET.BETA = 10.0
    # gamma of eq. 7: weight of the sparse-object-prior term J2.
    _C.MODEL.BIDET.GAMMA = 0.2
    # I(X;F) prior of the high-level feature maps: "binomial" (binary maps, paper 000 sec.
    # 3.1.2), "categorical" (2^n-class uniform prior for n-bit maps, appendix B.2), "gaussian"
    # (N(0,1) for real-valued maps of pruned / efficient models, appendix B.2).
    _C.MODEL.BIDET.FEATURE_PRIOR = "binomial"
    # Bits n of the feature maps for FEATURE_PRIOR "categorical" (2^n levels in [-1, 1]).
    _C.MODEL.BIDET.FEATURE_BITS = 2
    # Backbone outputs that carry the information bottleneck (sampled in training, binarized
    # / rounded in eval); [] = every backbone output (all FPN levels).
    _C.MODEL.BIDET.IB_FEATURES = []
    # Weight of the I(X;F) term (1 in eq. 7), multiplying the reduction of FEATURE_REDUCTION
    # (per image; then averaged over the images of the batch).
    _C.MODEL.BIDET.FEATURE_WEIGHT = 1.0
    # How I(X;F) is reduced over the elements of the IB feature maps of an image: "sum" (paper
    # 000 eq. 7: sum over t, s of log p(f_st|x)/p(f_st)) or "mean" (averaged over the elements;
    # the earlier aqd_d2 form, which weights the feature term 1/E of eq. 7 for E elements).
    # The detection terms are averaged over the Z sampled RoIs (R-CNN) / positives (SSD) of an
    # image, so eq. 7's balance is FEATURE_REDUCTION "sum" with FEATURE_WEIGHT 1/Z and
    # GAMMA gamma/Z (aqd_d2.modeling.bidet.objective.eq7_weights; the paper configs ship it).
    _C.MODEL.BIDET.FEATURE_REDUCTION = "mean"
    # Sparse object priors: "sop" (eq. 6/7 J2), "csop" (class-aware, eq. 11 with 1/n_c),
    # "csop_no_nc" (eq. 11 without 1/n_c; Table 1 ablation), "none" (no J2).
    _C.MODEL.BIDET.SOP = "sop"
    # Official-code switch: detach the SOP normaliser sum_k p_k (paper: False, gradients flow
    # through s_j = p_j / sum_k p_k).
    _C.MODEL.BIDET.SOP_DETACH_NORM = False
    # Official-code switch: I(X;F) as an L2 penalty on the (float) feature maps, mean(f^2)/2,
    # with deterministic features, instead of the KL against FEATURE_PRIOR with sampling.
    _C.MODEL.BIDET.IB_AS_L2 = False
    # Iterations at the start of training without the I(X;F) and SOP terms and with beta = 1
    # on the detection terms (0 = the paper: all terms from the first iteration).
    _C.MODEL.BIDET.WARMUP_ITERS = 0
    # Official-code switch: the warm-up lasts until the first learning-rate decay
    # (SOLVER.STEPS[0]); overrides WARMUP_ITERS.
    _C.MODEL.BIDET.WARMUP_UNTIL_FIRST_DECAY = False
    # Clamp of the predicted log-variance of the location posteriors (numerical safety).
    _C.MODEL.BIDET.LOGVAR_CLAMP = 10.0
    # Location prior p(l) of two-stage detectors (BiDetROIHeads): "rpn" (paper 000 sec. 3.1.3,
    # "parameterized by RPN": N(0, RPN-predicted variance) in proposal coordinates; needs
    # MODEL.PROPOSAL_GENERATOR.NAME "BiDetRPN" and MODEL.RPN.HEAD_NAME "BiDetRPNHead", which
    # learn the variance by maximum likelihood, loss_rpn_logvar) or "standard" (N(0, I)).
    _C.MODEL.BIDET.RPN_PRIOR = "rpn"

    # AutoBiDet (paper 000 sec. 3.2): per-image beta = T(s), s from the complexity estimator.
    _C.MODEL.BIDET.AUTO = CN()
    # Use per-image beta from the complexity estimator instead of MODEL.BIDET.BETA.
    _C.MODEL.BIDET.AUTO.ENABLED = False
    # eq. 10 transform T: "linear" d1 + t1*s, "exponential" d2*exp(t2*s), "sine"
    # d3 + t3*sin(pi/2*s).
    _C.MODEL.BIDET.AUTO.TRANSFORM = "sine"
    # delta of eq. 10 (delta3 = 10 in the paper).
    _C.MODEL.BIDET.AUTO.DELTA = 10.0
    # theta of eq. 10 (theta3 = 5 in the paper).
    _C.MODEL.BIDET.AUTO.THETA = 5.0
    # Score s source: "gan" (D(G(f)), eq. 9-10), "beta_vae" (exp(-MSE) of a beta-VAE
    # reconstruction, appendix Table 6), "random_uniform" (U[0,1]) / "random_beta"
    # (Beta(a, b)) (appendix Table 5).
    _C.MODEL.BIDET.AUTO.ESTIMATOR = "gan"
    # (a, b) of the Beta distribution for ESTIMATOR "random_beta" (Be(1,3), Be(2,2), Be(3,1)).
    _C.MODEL.BIDET.AUTO.BETA_DIST = (2.0, 2.0)
    # beta of the beta-VAE (weight of its KL term) for ESTIMATOR "beta_vae".
    _C.MODEL.BIDET.AUTO.VAE_BETA = 1.0
    # Backbone output fed to the generator (None-like "" = the first IB feature).
    _C.MODEL.BIDET.AUTO.IN_FEATURE = ""
    # Side of the reconstructed image relative to the input (1/2 SSD, 1/4 Faster R-CNN).
    _C.MODEL.BIDET.AUTO.OUT_SCALE = 0.25
    # Channels of the generator / discriminator (SN-GAN-style, widened as in the paper).
    _C.MODEL.BIDET.AUTO.CHANNELS = 64
    # Adam learning rate of the discriminator (2e-4) and of the generator (5e-5).
    _C.MODEL.BIDET.AUTO.D_LR = 2e-4
    _C.MODEL.BIDET.AUTO.G_LR = 5e-5
    # Adam betas of both GAN optimizers.
    _C.MODEL.BIDET.AUTO.ADAM_BETAS = (0.0, 0.9)
    # Discriminator steps per generator step (2 in the paper).
    _C.MODEL.BIDET.AUTO.D_STEPS = 2
    # Generator loss: "minimax" (eq. 9 as written: minimise log(1 - D(G(f)))) or
    # "non_saturating" (minimise -log D(G(f))).
    _C.MODEL.BIDET.AUTO.G_LOSS = "minimax"


def validate(cfg: CN) -> None:
    """Check MODEL.BIDET.*; raise ConfigError naming the key and the allowed values."""
    b = "MODEL.BIDET."
    check_range(cfg, b + "BETA", 0.0)
    check_range(cfg, b + "GAMMA", 0.0)
    check_choice(cfg, b + "FEATURE_PRIOR", FEATURE_PRIORS)
    check_range(cfg, b + "FEATURE_BITS", 1, 8)
    check_range(cfg, b + "FEATURE_WEIGHT", 0.0)
    check_choice(cfg, b + "FEATURE_REDUCTION", FEATURE_REDUCTIONS)
    check_choice(cfg, b + "SOP", SOP_MODES)
    check_choice(cfg, b + "SOP_DETACH_NORM", (True, False))
    check_choice(cfg, b + "IB_AS_L2", (True, False))
    check_range(cfg, b + "WARMUP_ITERS", 0)
    check_choice(cfg, b + "WARMUP_UNTIL_FIRST_DECAY", (True, False))
    check_range(cfg, b + "LOGVAR_CLAMP", 0.0, lo_open=True)
    check_choice(cfg, b + "RPN_PRIOR", RPN_PRIORS)
    a = b + "AUTO."
    check_choice(cfg, a + "ENABLED", (True, False))
    check_choice(cfg, a + "TRANSFORM", TRANSFORMS)
    check_range(cfg, a + "DELTA", 0.0)
    check_range(cfg, a + "THETA", 0.0)
    check_choice(cfg, a + "ESTIMATOR", ESTIMATORS)
    dist = cfg.MODEL.BIDET.AUTO.BETA_DIST
    if len(dist) != 2 or min(float(v) for v in dist) <= 0:
        raise ConfigError(f"{a}BETA_DIST = {dist!r}: must be two positive numbers (a, b)")
    check_range(cfg, a + "VAE_BETA", 0.0)
    check_range(cfg, a + "OUT_SCALE", 0.0, 1.0, lo_open=True)
    check_range(cfg, a + "CHANNELS", 4)
    check_range(cfg, a + "D_LR", 0.0, lo_open=True)
    check_range(cfg, a + "G_LR", 0.0, lo_open=True)
    if len(cfg.MODEL.BIDET.AUTO.ADAM_BETAS) != 2:
        raise ConfigError(f"{a}ADAM_BETAS = {cfg.MODEL.BIDET.AUTO.ADAM_BETAS!r}: two numbers")
    check_range(cfg, a + "D_STEPS", 0)
    check_choice(cfg, a + "G_LOSS", G_LOSSES)
    auto = cfg.MODEL.BIDET.AUTO
    if auto.ENABLED and auto.ESTIMATOR in ("gan", "beta_vae") and \
            cfg.AQD.TRAIN_LOOP not in ESTIMATOR_LOOPS:
        raise ConfigError(
            f"MODEL.BIDET.AUTO.ESTIMATOR = {auto.ESTIMATOR!r} needs a loop that trains the "
            f"complexity estimator: AQD.TRAIN_LOOP = {cfg.AQD.TRAIN_LOOP!r}; choose one of "
            f"{list(ESTIMATOR_LOOPS)}")
