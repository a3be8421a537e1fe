"""BiDet's RPN-parameterised location prior (paper 000 sec. 3.1.3): the frame change and the NLL
against hand numbers, the proposal selection against detectron2's ``find_top_rpn_proposals``,
gradient routing, eval output equal to detectron2's RPN, config errors, and a short
train + inference run with MODEL.BIDET.RPN_PRIOR "rpn" and "standard"."""
import math

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.proposal_generator import RPN
from detectron2.modeling.proposal_generator.proposal_utils import find_top_rpn_proposals
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from aqd_d2.config import ConfigError
from aqd_d2.engine import Trainer
from aqd_d2.modeling.bidet import BiDetFastRCNNOutputLayers, rpn_to_roi_logvar, select_rpn_proposals
from aqd_d2.modeling.bidet.rpn import PRIOR_LOGVAR_FIELD, gaussian_nll
from tests.conftest import tiny_train_opts
from tests.test_configs import load_test_config, tiny_batch

BIDET = "configs/BiDet/FasterRCNN-R18-shapes-voc-cpu-BiDet.yaml"
PLAIN_RPN = ["MODEL.PROPOSAL_GENERATOR.NAME", "RPN", "MODEL.RPN.HEAD_NAME", "StandardRPNHead",
             "MODEL.BIDET.RPN_PRIOR", "standard"]


def _model(extra=()):
    torch.manual_seed(0)
    cfg = load_test_config(BIDET, extra=["MODEL.FPN.OUT_CHANNELS", "32"] + list(extra), narrow=True)
    return cfg, build_model(cfg).train()


def test_frame_change_hand_numbers():
    anchors = torch.tensor([[0.0, 0.0, 16.0, 32.0]] * 2)
    props = torch.tensor([[2.0, 4.0, 10.0, 20.0]] * 2)  # wp = 8 (wa/wp = 2), hp = 16 (ha/hp = 2)
    lv = torch.tensor([[0.1, -0.2, 0.3, 0.5]] * 2)
    out = rpn_to_roi_logvar(lv, anchors, props, (1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0))
    # x: 0.1 + 2 log(10*16/(1*8)) = 0.1 + 2 log 20; w: 0.3 + 2 log(5/1)
    expected = [0.1 + 5.991464547, -0.2 + 5.991464547, 0.3 + 3.218875825, 0.5 + 3.218875825]
    assert out[0].tolist() == pytest.approx(expected, abs=1e-6)
    out = rpn_to_roi_logvar(lv, anchors, props, (2.0, 2.0, 0.5, 0.5), (10.0, 10.0, 5.0, 5.0))
    # x: 2 log(10*16/(2*8)) = 2 log 10; w: 2 log(5/0.5) = 2 log 10
    assert out[1].tolist() == pytest.approx([v + 4.605170186 for v in lv[1].tolist()], abs=1e-6)


def test_frame_change_is_the_linear_map_of_detectron2_box_transforms():
    """An RPN offset t = mu + eps decoded with the RPN's weights and re-encoded against the
    proposal (decoded mu) with the ROI weights gives the ROI delta s * eps with
    s^2 = exp(logvar' - logvar): the derivation in rpn_to_roi_logvar, exactly."""
    wr, wq = (1.0, 2.0, 0.5, 1.5), (10.0, 10.0, 5.0, 5.0)
    rpn_t, roi_t = Box2BoxTransform(wr), Box2BoxTransform(wq)
    anchors = torch.tensor([[3.0, 5.0, 35.0, 21.0], [0.0, 0.0, 8.0, 8.0]])
    mu = torch.tensor([[0.2, -0.1, 0.3, -0.2], [-0.5, 0.4, -0.1, 0.25]])
    eps = torch.tensor([[0.05, -0.03, 0.02, 0.04], [-0.02, 0.06, -0.03, 0.01]])
    props = rpn_t.apply_deltas(mu, anchors)  # detectron2 decodes in float32
    objects = rpn_t.apply_deltas(mu + eps, anchors)
    roi = roi_t.get_deltas(props, objects)
    scale = torch.exp(0.5 * rpn_to_roi_logvar(torch.zeros_like(mu), anchors, props, wr, wq))
    assert torch.allclose(roi, scale * eps, atol=2e-6)


def test_gaussian_nll_hand_numbers():
    t, mu, lv = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.0]), torch.tensor([math.log(2.0), 0.0])
    # 0.5 * (0.25 / 2 + log 2) and 0
    assert gaussian_nll(t, mu, lv).tolist() == pytest.approx([0.4090736, 0.0], abs=1e-6)


def test_logvar_loss_hand_numbers_and_mean_detached():
    cfg, model = _model()
    rpn = model.proposal_generator
    anchors = [Boxes(torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 20.0, 20.0],
                                   [5.0, 5.0, 9.0, 9.0]]))]
    labels = [torch.tensor([1, 0, -1])]
    gt = [torch.tensor([[1.0, 2.0, 11.0, 12.0]] * 3)]  # anchor 0: t = (0.1, 0.2, 0, 0)
    deltas = [torch.zeros(1, 3, 4, requires_grad=True)]
    logvars = [torch.tensor([[[math.log(4.0), 0.0, 0.0, 0.0]] * 3], requires_grad=True)]
    loss = rpn.logvar_loss(anchors, labels, deltas, logvars, gt)
    # 0.5*(0.01/4 + log 4) + 0.5*0.04, over BATCH_SIZE_PER_IMAGE (256) * 1 image, weight 1
    hand = (0.5 * (0.01 / 4 + math.log(4.0)) + 0.5 * 0.04) / 256
    assert cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE == 256 and float(loss.detach()) == pytest.approx(hand, rel=1e-6)
    loss.backward()
    assert deltas[0].grad is None and logvars[0].grad[0, 1:].abs().sum() == 0


def _random_rpn_outputs(seed: int, nan: bool = False):
    g = torch.Generator().manual_seed(seed)
    proposals, logits = [], []
    for n_anchors in (300, 120, 40):
        xy = torch.rand(2, n_anchors, 2, generator=g) * 80 - 8  # some outside the 64x64 image
        wh = torch.rand(2, n_anchors, 2, generator=g) * 30
        wh[:, ::17] = 0.5  # some tiny boxes
        proposals.append(torch.cat([xy, xy + wh], dim=2))
        logits.append(torch.randn(2, n_anchors, generator=g))
    if nan:
        proposals[1][0, 3, 0] = float("nan")
        logits[0][1, 7] = float("inf")
    return proposals, logits


@pytest.mark.parametrize("training", [True, False])
def test_selection_equals_find_top_rpn_proposals(training):
    proposals, logits = _random_rpn_outputs(0, nan=not training)
    sizes = [(64, 64), (48, 60)]
    args = (sizes, 0.7, 100, 50, 1.0, training)
    ours, ids = select_rpn_proposals(proposals, logits, *args)
    ref = find_top_rpn_proposals(proposals, logits, *args)
    all_props, all_logits = torch.cat(proposals, dim=1), torch.cat(logits, dim=1)
    for i, (a, b, k) in enumerate(zip(ours, ref, ids)):
        assert len(a) > 10
        assert torch.equal(a.proposal_boxes.tensor, b.proposal_boxes.tensor)
        assert torch.equal(a.objectness_logits, b.objectness_logits)
        # each proposal is its anchor's decoded box, clipped, and carries that anchor's logit
        boxes = Boxes(all_props[i, k].clone())
        boxes.clip(sizes[i])
        assert torch.equal(boxes.tensor, a.proposal_boxes.tensor)
        assert torch.equal(all_logits[i, k], a.objectness_logits)


def test_training_proposals_equal_detectron2_rpn_and_carry_the_prior():
    _, model = _model()
    images = model.preprocess_image(tiny_batch())
    feats, _ = model._features(images)
    gt = [x["instances"] for x in tiny_batch()]
    gen = model.proposal_generator
    with EventStorage(0):
        torch.manual_seed(3)
        ours, our_losses = gen(images, feats, gt)
        torch.manual_seed(3)
        ref, ref_losses = RPN.forward(gen, images, feats, gt)
    for a, b in zip(ours, ref):
        assert torch.equal(a.proposal_boxes.tensor, b.proposal_boxes.tensor)
        assert torch.equal(a.objectness_logits, b.objectness_logits)
        lv = a.get(PRIOR_LOGVAR_FIELD)
        assert lv.shape == (len(a), 4) and not lv.requires_grad and torch.isfinite(lv).all()
    for k in ("loss_rpn_cls", "loss_rpn_loc"):
        assert torch.equal(our_losses[k], ref_losses[k])
    assert set(our_losses) == set(ref_losses) | {"loss_rpn_logvar"}


def test_rpn_and_standard_prior_differ_only_in_the_prior_terms():
    """Same seed: the variance branch is initialised on a forked RNG, so every other parameter
    and every other loss is identical; only loss_box_ib's value and loss_rpn_logvar differ."""
    out = {}
    for prior, extra in (("rpn", []), ("standard", PLAIN_RPN)):
        _, model = _model(extra)
        torch.manual_seed(1)
        with EventStorage(0):
            out[prior] = model(tiny_batch())
    assert set(out["rpn"]) == set(out["standard"]) | {"loss_rpn_logvar"}
    for k, v in out["standard"].items():
        if k != "loss_box_ib":
            assert torch.equal(v, out["rpn"][k]), k
    assert float(out["rpn"]["loss_box_ib"]) != float(out["standard"]["loss_box_ib"])


def test_appended_ground_truth_proposals_get_the_standard_prior():
    _, model = _model()
    heads = model.roi_heads
    assert heads.proposal_append_gt
    targets = [x["instances"] for x in tiny_batch()]
    proposals = []
    for t in targets:
        p = Instances(t.image_size)
        p.proposal_boxes = Boxes(torch.tensor([[0.0, 0.0, 30.0, 30.0], [10.0, 10.0, 50.0, 60.0]]))
        p.objectness_logits = torch.zeros(2)
        p.set(PRIOR_LOGVAR_FIELD, torch.ones(2, 4))
        proposals.append(p)
    with EventStorage(0):
        sampled = heads.label_and_sample_proposals(proposals, targets)
    for s in sampled:
        lv, from_gt = s.get(PRIOR_LOGVAR_FIELD), s.objectness_logits > 10  # gt: logit ~23
        assert len(s) == 4 and int(from_gt.sum()) == 2
        assert torch.equal(lv[from_gt], torch.zeros(2, 4))
        assert torch.equal(lv[~from_gt], torch.ones(2, 4))
    assert not any(t.has(PRIOR_LOGVAR_FIELD) for t in targets)  # the caller's targets untouched


def _grads(loss, params):
    gs = torch.autograd.grad(loss, [p for _, p in params], retain_graph=True, allow_unused=True)
    return {n for (n, _), g in zip(params, gs) if g is not None and g.abs().sum() > 0}


def test_gradient_routing():
    _, model = _model()
    with EventStorage(0):
        losses = model(tiny_batch())
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head = "proposal_generator.rpn_head."
    lv = _grads(losses["loss_rpn_logvar"], params)
    assert {head + "anchor_logvar.weight", head + "anchor_logvar.bias"} <= lv
    # the mean is detached: no gradient to the deltas / objectness convs or the ROI heads
    assert not any(n.startswith((head + "anchor_deltas", head + "objectness_logits", "roi_heads."))
                   for n in lv)
    for k, v in losses.items():
        if k == "loss_rpn_logvar":
            continue
        g = _grads(v, params)
        assert not any("anchor_logvar" in n for n in g), k
        if k in ("loss_cls", "loss_box_ib", "loss_sop"):  # the ROI losses: nothing to the RPN
            assert not any(n.startswith("proposal_generator.") for n in g), k


def _predictor(rpn_prior: str) -> BiDetFastRCNNOutputLayers:
    return BiDetFastRCNNOutputLayers(ShapeSpec(channels=8), box2box_transform=Box2BoxTransform(
        (10.0, 10.0, 5.0, 5.0)), num_classes=2, rpn_prior=rpn_prior)


def _proposals(prior_logvar):
    p = Instances((32, 32))
    p.proposal_boxes = Boxes(torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 5.0, 5.0]]))
    p.gt_boxes = Boxes(torch.tensor([[1.0, 2.0, 11.0, 12.0], [0.0, 0.0, 5.0, 5.0]]))
    p.gt_classes = torch.tensor([0, 2])  # one foreground, one background
    if prior_logvar is not None:
        p.set(PRIOR_LOGVAR_FIELD, prior_logvar)
    return [p]


def test_roi_location_term_uses_the_detached_rpn_prior():
    # posterior N(0, 1) on every class; ROI target of the fg proposal (10*0.1, 10*0.2, 0, 0)
    preds = (torch.zeros(2, 3), torch.zeros(2, 8), torch.zeros(2, 8))
    prior = torch.tensor([[math.log(4.0), 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], requires_grad=True)
    loss = _predictor("rpn").losses(preds, _proposals(prior))["loss_box_ib"]
    # post 0.5*(1 + 4) - prior (0.5*(1/4 + log 4) + 0.5*4), over R = 2 sampled ROIs
    assert float(loss) == pytest.approx((2.5 - (0.125 + math.log(2.0) + 2.0)) / 2, abs=1e-6)
    assert not loss.requires_grad  # nothing to the prior (and the posterior here is a constant)
    std = _predictor("standard").losses(preds, _proposals(None))["loss_box_ib"]
    assert float(std) == pytest.approx(0.0, abs=1e-7)  # posterior N(0,1) == prior N(0,I)
    with pytest.raises(ValueError, match="MODEL.BIDET.RPN_PRIOR"):
        _predictor("rpn").losses(preds, _proposals(None))


def test_eval_output_equals_detectron2_rpn_detector():
    _, ours = _model()
    _, plain = _model(PLAIN_RPN)
    res = plain.load_state_dict(ours.state_dict(), strict=False)
    assert not res.missing_keys
    assert sorted(res.unexpected_keys) == ["proposal_generator.rpn_head.anchor_logvar.bias",
                                           "proposal_generator.rpn_head.anchor_logvar.weight"]
    ours.eval(), plain.eval()
    with torch.no_grad():
        a = ours(tiny_batch(1, with_gt=False))[0]["instances"]
        b = plain(tiny_batch(1, with_gt=False))[0]["instances"]
    assert len(a) > 0
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor) and torch.equal(a.scores, b.scores)


def test_config_errors_name_the_keys():
    with pytest.raises(ConfigError, match="MODEL.BIDET.RPN_PRIOR"):
        _model(["MODEL.BIDET.RPN_PRIOR", "gaussian"])
    with pytest.raises(ConfigError, match="MODEL.PROPOSAL_GENERATOR.NAME"):
        _model(["MODEL.PROPOSAL_GENERATOR.NAME", "RPN"])
    with pytest.raises(ConfigError, match="MODEL.RPN.HEAD_NAME"):
        _model(["MODEL.RPN.HEAD_NAME", "StandardRPNHead"])
    with pytest.raises(ConfigError, match="MODEL.ROI_HEADS.NAME"):
        _model(["MODEL.ROI_HEADS.NAME", "StandardROIHeads"])


@pytest.mark.parametrize("prior", ["rpn", "standard"])
def test_trains_two_iterations_and_infers(tmp_path, prior):
    cfg = load_test_config(BIDET, narrow=True, extra=tiny_train_opts(tmp_path, 2) + [
        "DATASETS.TRAIN", "('aqd_shapes_voc_tiny_train',)",
        "DATASETS.TEST", "('aqd_shapes_voc_tiny_val',)",
        "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.BIDET.RPN_PRIOR", prior])
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    head = trainer.model.proposal_generator.rpn_head
    before = None if head.anchor_logvar is None else head.anchor_logvar.weight.detach().clone()
    trainer.train()
    state = torch.load(tmp_path / "model_final.pth", weights_only=False)["model"]
    has_branch = "proposal_generator.rpn_head.anchor_logvar.weight" in state
    assert has_branch == (prior == "rpn")
    if before is not None:
        assert not torch.equal(before, head.anchor_logvar.weight.detach())  # trained
    model = trainer.model.eval()
    with torch.no_grad():
        out = model(tiny_batch(1, with_gt=False))[0]["instances"]
    assert out.image_size == (64, 64) and torch.isfinite(out.pred_boxes.tensor).all()
