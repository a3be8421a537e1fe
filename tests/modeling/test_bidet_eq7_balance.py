"""The BiDet objective at paper 000 eq. 7's balance (issue 16, item 4): the feature term summed
over the elements of the high-level feature maps (eq. 7 sums over t, s), the weights that make
the loss eq. 7 / Z when the detection terms are averaged over Z per image, the effective weights
of any setting, and the shipped paper configs (beta 10, gamma 0.2 in eq. 7's balance)."""
import math

import pytest
import torch
from detectron2.config import get_cfg

import aqd_d2
from aqd_d2.config import ConfigError, validate_aqd_config
from aqd_d2.modeling.bidet.bottleneck import FeatureBottleneck
from aqd_d2.modeling.bidet.objective import BiDetObjective, eq7_effective_weights, eq7_weights
from tests.conftest import REPO


def test_eq7_weights_hand_numbers():
    assert eq7_weights(0.2, 256) == {"FEATURE_WEIGHT": 1 / 256, "GAMMA": 0.2 / 256}
    assert eq7_weights(0.2, 512) == {"FEATURE_WEIGHT": 0.001953125, "GAMMA": 0.000390625}
    with pytest.raises(ValueError, match="> 0"):
        eq7_weights(0.2, 0)


def test_effective_weights_hand_numbers():
    # C4 Faster R-CNN at 600 x 1000: E = 256 x 38 x 63 res4 elements, Z = 256 RoIs
    E, Z = 256 * 38 * 63, 256
    assert E == 612864
    w = eq7_effective_weights("sum", 1 / 256, 10.0, 0.2 / 256, E, Z)
    assert w == pytest.approx({"feature": 1.0, "detection": 10.0, "sop": 0.2})
    # the mean form with FEATURE_WEIGHT 1, GAMMA 0.2: 256 / 612864 : 10 : 51.2
    w = eq7_effective_weights("mean", 1.0, 10.0, 0.2, E, Z)
    assert w == pytest.approx({"feature": 256 / 612864, "detection": 10.0, "sop": 51.2})
    assert w["feature"] == pytest.approx(4.177e-4, rel=1e-3)
    with pytest.raises(ValueError, match="FEATURE_REDUCTION"):
        eq7_effective_weights("avg", 1.0, 10.0, 0.2, E, Z)


def _objective(reduction: str, weight: float) -> BiDetObjective:
    return BiDetObjective(bottleneck=FeatureBottleneck(prior="binomial"), feature_weight=weight,
                          feature_reduction=reduction)


def test_feature_term_sum_and_mean_hand_numbers():
    """KL(Bern(p) || Bern(1/2)) = p ln p + (1-p) ln(1-p) + ln 2; p = sigmoid(ln 3) = 3/4 gives
    0.75 ln 0.75 + 0.25 ln 0.25 + ln 2 = 0.1308120 per element, 0 for logit 0."""
    kl = 0.75 * math.log(0.75) + 0.25 * math.log(0.25) + math.log(2.0)
    assert kl == pytest.approx(0.1308120, abs=1e-7)
    a = torch.zeros(2, 1, 2, 2)
    a[0, 0, 0, 0] = math.log(3.0)           # image 0: one element at p = 3/4
    a[1, 0, 0, :] = math.log(3.0)           # image 1: two
    b = torch.zeros(2, 3, 1, 1)             # a second map, 3 elements per image, KL 0
    params = {"p3": a, "p4": b}
    obj = _objective("sum", 0.5).eval()
    assert obj.feature_elements(params) == 4 + 3
    _, term = obj(params)                    # eq. 7: sum over the 7 elements, times 0.5
    assert term.tolist() == pytest.approx([0.5 * kl, 0.5 * 2 * kl], abs=1e-6)
    _, mean = _objective("mean", 0.5).eval()(params)  # per element: / 7
    assert mean.tolist() == pytest.approx([0.5 * kl / 7, 0.5 * 2 * kl / 7], abs=1e-7)
    with pytest.raises(ValueError, match="FEATURE_REDUCTION"):
        _objective("avg", 1.0)


def test_bad_reduction_is_a_config_error():
    cfg = aqd_d2.add_aqd_config(get_cfg())
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BIDET.FEATURE_REDUCTION = "avg"
    with pytest.raises(ConfigError, match="MODEL.BIDET.FEATURE_REDUCTION"):
        validate_aqd_config(cfg)


PAPER_CONFIGS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs" / "BiDet").rglob("*.yaml"))


@pytest.mark.parametrize("rel_path", PAPER_CONFIGS)
def test_paper_configs_optimise_eq7_balance(rel_path):
    """Every BiDet paper config: eq. 7's sum, FEATURE_WEIGHT = 1/Z, GAMMA = 0.2/Z, BETA 10
    (AutoBiDet replaces beta by its T(s)); for R-CNN configs Z is the RoIs sampled per image."""
    cfg = aqd_d2.add_aqd_config(get_cfg())
    cfg.merge_from_file(str(REPO / rel_path))
    b = cfg.MODEL.BIDET
    assert b.FEATURE_REDUCTION == "sum"
    z = 1.0 / b.FEATURE_WEIGHT
    assert b.GAMMA * z == pytest.approx(0.2, rel=1e-6)
    assert b.BETA == 10.0
    arch = cfg.MODEL.QUANT.META_ARCHITECTURE
    if arch == "BiDetRCNN":
        assert z == pytest.approx(cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE)
    w = eq7_effective_weights("sum", b.FEATURE_WEIGHT, b.BETA, b.GAMMA, 1000.0, z)
    assert w == pytest.approx({"feature": 1.0, "detection": 10.0, "sop": 0.2})
