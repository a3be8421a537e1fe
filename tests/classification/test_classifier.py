"""ImageClassifier (registered meta-architecture), its checkpoint names, distillation and the
top-k evaluator (issue 17 item 1)."""
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from aqd_d2.config import ConfigError
from aqd_d2.engine.classification_eval import ClassificationEvaluator
from aqd_d2.modeling.meta_arch.classifier import ImageClassifier
from tests.classification.common import PRETRAIN_DIR, pretrain_cfg, tiny_pretrain_opts

R18 = PRETRAIN_DIR / "R18-shapes-cpu.yaml"


def _batch(n=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8),
             "label": i % 6} for i in range(n)]


def _cfg(tmp_path, *opts):
    return pretrain_cfg(R18, tiny_pretrain_opts(tmp_path) + list(opts))


def test_build_train_eval_and_checkpoint_names(tmp_path):
    model = build_model(_cfg(tmp_path))
    assert isinstance(model, ImageClassifier) and model.in_feature == "res5"
    losses = model(_batch())
    assert set(losses) == {"loss_cls"} and losses["loss_cls"].requires_grad
    losses["loss_cls"].backward()
    assert model.backbone.stem.conv1.weight.grad is not None
    model.eval()
    with torch.no_grad():
        out = model(_batch(3))
    assert len(out) == 3 and out[0]["logits"].shape == (6,)
    # the checkpoint holds the FPN detector's names; loading them back restores the model
    sd = model.state_dict()
    assert any(k.startswith("backbone.bottom_up.res5.") for k in sd)
    assert not any(k.startswith("backbone.res") or k.startswith("backbone.stem") for k in sd)
    assert "cls_head.fc.weight" in sd
    other = build_model(_cfg(tmp_path))
    missing, unexpected = other.load_state_dict(sd, strict=True)
    assert not missing and not unexpected
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    # and through detectron2's checkpointer (what --resume uses)
    DetectionCheckpointer(model, str(tmp_path)).save("m")
    third = build_model(_cfg(tmp_path))
    DetectionCheckpointer(third).load(str(tmp_path / "m.pth"))
    assert torch.equal(third.cls_head.fc.weight, model.cls_head.fc.weight)
    assert torch.equal(third.backbone.res5[0].conv1.weight, model.backbone.res5[0].conv1.weight)


def test_quantized_classifier_keeps_fc_float(tmp_path):
    model = build_model(_cfg(tmp_path, "MODEL.QUANT.ENABLED", "True", "MODEL.QUANT.W_METHOD",
                             "dorefa", "MODEL.QUANT.A_METHOD", "dorefa"))
    assert type(model.cls_head.fc) is torch.nn.Linear
    swapped = [n for n, m in model.named_modules() if type(m).__name__ == "QConv2d"]
    assert any(n.startswith("backbone.res2") for n in swapped)
    assert not any(n.startswith("cls_head") for n in swapped)
    assert set(model(_batch())) == {"loss_cls"}


def test_knowledge_distillation_from_a_float_teacher(tmp_path):
    teacher = build_model(_cfg(tmp_path))
    DetectionCheckpointer(teacher, str(tmp_path)).save("teacher")
    with pytest.raises(ConfigError, match="TEACHER_WEIGHTS .* does not exist"):
        build_model(_cfg(tmp_path, "MODEL.CLS.KD_WEIGHT", "0.5", "MODEL.CLS.TEACHER_WEIGHTS",
                         str(tmp_path / "nope.pth")))
    student = build_model(_cfg(tmp_path, "MODEL.CLS.KD_WEIGHT", "0.5", "MODEL.CLS.KD_TEMPERATURE",
                               "2.0", "MODEL.CLS.TEACHER_WEIGHTS", str(tmp_path / "teacher.pth")))
    assert not any(k.startswith("_teacher") for k in student.state_dict())
    assert all(not p.requires_grad for p in student.teacher.parameters())
    # a student equal to its teacher: the KL term is zero, CE is halved
    student.load_state_dict(teacher.state_dict())
    student.eval()
    teacher.eval()
    student.training = True  # the losses, with the same (running) BN statistics as the teacher
    losses = student(_batch())
    assert float(losses["loss_kd"]) == pytest.approx(0.0, abs=1e-6)
    teacher.training = True
    ce = teacher(_batch())["loss_cls"]
    assert float(losses["loss_cls"]) == pytest.approx(0.5 * float(ce), rel=1e-5)


def test_evaluator_topk_hand_numbers():
    ev = ClassificationEvaluator("hand", topk=(1, 2, 9))
    ev.reset()
    logits = torch.tensor([[3.0, 2.0, 1.0], [0.0, 2.0, 1.0], [0.0, 1.0, 2.0], [2.0, 0.0, 1.0]])
    labels = [0, 2, 0, 1]  # top-1 hits: #0; top-2 hits: #0, #1 (2 is second), #2? no (0 last)
    ev.process([{"label": y} for y in labels[:2]], [{"logits": l} for l in logits[:2]])
    ev.process([{"label": y} for y in labels[2:]], [{"logits": l} for l in logits[2:]])
    res = ev.evaluate()["classification"]
    assert res["top1"] == pytest.approx(25.0)
    assert res["top2"] == pytest.approx(50.0)
    assert res["top9"] == pytest.approx(100.0)  # k above the class count: every label counts
    ev.reset()
    assert ev.evaluate() == {}
