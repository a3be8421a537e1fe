"""MODEL.BIDET.*: the paper's defaults and errors that name the key and the allowed values."""
import pytest
from detectron2.config import get_cfg

import aqd_d2
from aqd_d2.config import ConfigError, validate_aqd_config


def _cfg(*opts):
    cfg = aqd_d2.add_aqd_config(get_cfg())
    cfg.merge_from_list(["MODEL.DEVICE", "cpu"] + list(opts))
    return cfg


def test_paper_defaults():
    b = _cfg().MODEL.BIDET
    assert (b.BETA, b.GAMMA, b.FEATURE_PRIOR, b.SOP, b.WARMUP_ITERS) == (10.0, 0.2, "binomial", "sop", 0)
    assert not (b.SOP_DETACH_NORM or b.IB_AS_L2 or b.WARMUP_UNTIL_FIRST_DECAY)  # official-code switches off
    a = b.AUTO
    assert (a.TRANSFORM, a.DELTA, a.THETA, a.ESTIMATOR) == ("sine", 10.0, 5.0, "gan")
    assert (a.D_LR, a.G_LR, a.D_STEPS, a.G_LOSS) == (2e-4, 5e-5, 2, "minimax")
    validate_aqd_config(_cfg())


@pytest.mark.parametrize("opts, match", [
    (["MODEL.BIDET.FEATURE_PRIOR", "laplace"], r"MODEL.BIDET.FEATURE_PRIOR = 'laplace'.*binomial"),
    (["MODEL.BIDET.SOP", "sparse"], r"MODEL.BIDET.SOP = 'sparse'.*csop_no_nc"),
    (["MODEL.BIDET.AUTO.TRANSFORM", "cubic"], r"MODEL.BIDET.AUTO.TRANSFORM.*sine"),
    (["MODEL.BIDET.AUTO.ESTIMATOR", "vae"], r"MODEL.BIDET.AUTO.ESTIMATOR.*beta_vae"),
    (["MODEL.BIDET.GAMMA", "-1.0"], r"MODEL.BIDET.GAMMA"),
    (["MODEL.BIDET.AUTO.OUT_SCALE", "2.0"], r"MODEL.BIDET.AUTO.OUT_SCALE"),
    (["MODEL.BIDET.AUTO.BETA_DIST", "(0.0, 1.0)"], r"MODEL.BIDET.AUTO.BETA_DIST"),
    (["MODEL.BIDET.AUTO.ENABLED", "True"], r"AQD.TRAIN_LOOP = 'AQDTrainLoop'.*BiDetGANLoop"),
])
def test_bad_values_name_key_and_choices(opts, match):
    with pytest.raises(ConfigError, match=match):
        validate_aqd_config(_cfg(*opts))


def test_random_estimators_need_no_gan_loop():
    validate_aqd_config(_cfg("MODEL.BIDET.AUTO.ENABLED", "True",
                             "MODEL.BIDET.AUTO.ESTIMATOR", "random_uniform"))
