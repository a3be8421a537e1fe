"""Where does a two-stage detector's initialisation help or hurt? RoI-level diagnostics.

Issue 17 item 5 asks whether a pretrained backbone helps the C4 Faster R-CNN. AP alone does
not say *why* one initialisation loses; this module measures, on a detection dataset's
ground-truth boxes, three things of a :class:`~detectron2.modeling.GeneralizedRCNN` with a
``StandardROIHeads``-style box branch (``box_pooler`` / ``box_head`` / ``box_predictor``):

* **RPN recall**: the fraction of ground-truth boxes that one of the proposals
  (``MODEL.RPN.POST_NMS_TOPK_TEST`` of them) overlaps with IoU >= ``iou`` (model in eval mode).
* **The detector's own head on ground-truth boxes** (eval mode): how often the arg-max over
  all K+1 classes is the right class, how often the arg-max over the K object classes is
  (background ignored), and the mean softmax probability of the right class. A head that
  ranks the object classes well but calls the objects "background" loses recall to the test
  score threshold (``MODEL.ROI_HEADS.SCORE_THRESH_TEST``), not to its features.
* **Linear probes of the RoI features** (the question "are the features good?" without the
  head's training dynamics): the pooled feature (``box_pooler``, mean over its bins) and the
  box head's output on three kinds of boxes: ground truth (label: its class), random boxes
  and shifted / scaled ground-truth boxes (label: background; both below the background IoU
  ``MODEL.ROI_HEADS.IOU_THRESHOLDS[0]`` with every object). A multinomial logistic
  regression (standardised features, L-BFGS, fixed L2) is fitted on the training split's boxes
  and scored on the test split's, per kind. Features are computed with the model's BN layers
  in **training mode** (per-batch statistics, ``batch_size`` images per batch) by default:
  what a detector fine-tuned with trainable BN sees, and the only meaningful choice for a
  checkpoint whose running statistics come from another task or from no training at all.

Used for the README's "Pretraining a backbone" diagnosis; ``tools/probe_rcnn.py`` is the CLI.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Boxes, BoxMode, pairwise_iou
from torch import nn

__all__ = ["KINDS", "sample_background_boxes", "roi_features", "linear_probe", "head_diagnostics",
           "probe_rcnn", "format_probe"]

logger = logging.getLogger(__name__)

#: the kinds of probed boxes, in the order of their codes 0, 1, 2
KINDS = ("object", "random_background", "partial_background")


def _check_model(model: nn.Module) -> None:
    heads = getattr(model, "roi_heads", None)
    missing = [n for n in ("box_pooler", "box_head", "box_predictor", "box_in_features")
               if not hasattr(heads, n)]
    if getattr(model, "proposal_generator", None) is None or heads is None or missing:
        raise ValueError(
            f"probe_rcnn needs a two-stage detector (GeneralizedRCNN with a proposal generator and "
            f"StandardROIHeads-style box_pooler / box_head / box_predictor); "
            f"{type(model).__name__} lacks "
            f"{missing or ['proposal_generator' if heads is not None else 'roi_heads']}")


def sample_background_boxes(gt: torch.Tensor, image_size: Tuple[int, int], count: int,
                            generator: torch.Generator, max_iou: float = 0.5,
                            min_side: float = 16.0, max_side: float = 64.0,
                            max_tries: int = 1000) -> Tuple[torch.Tensor, torch.Tensor]:
    """``count`` background boxes of an image, alternately random and "partial" (a ground-truth
    box whose corners are each moved by up to +-60% of its width / height), every one with
    IoU < ``max_iou`` against all of ``gt`` (N, 4 XYXY).

    Returns: (boxes (M, 4), kinds (M,) with codes 1 (random) / 2 (partial)); M < count only if
    ``max_tries`` draws did not find enough (crowded images).
    """
    h, w = image_size
    out, kinds = [], []
    for _ in range(max_tries):
        if len(out) >= count:
            break
        if len(out) % 2 == 0 or len(gt) == 0:
            side = torch.empty(2).uniform_(min_side, max_side, generator=generator)
            side = torch.minimum(side, torch.tensor([float(w), float(h)]))
            xy = torch.rand(2, generator=generator) * (torch.tensor([float(w), float(h)]) - side)
            box, kind = torch.cat([xy, xy + side]), 1
        else:
            k = int(torch.randint(len(gt), (1,), generator=generator))
            wh = gt[k, 2:] - gt[k, :2]
            box = gt[k] + torch.cat([wh, wh]) * (torch.rand(4, generator=generator) - 0.5) * 1.2
            box[0::2] = box[0::2].clamp(0, w)
            box[1::2] = box[1::2].clamp(0, h)
            if (box[2:] - box[:2]).min() < 4:
                continue
            kind = 2
        if len(gt) and pairwise_iou(Boxes(box[None]), Boxes(gt)).max() >= max_iou:
            continue
        out.append(box)
        kinds.append(kind)
    if not out:
        return torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
    return torch.stack(out), torch.tensor(kinds)


def _images(cfg, dataset_name: str, limit: Optional[int]) -> List[dict]:
    """Dataset dicts with at least one object, the test-time resize applied (image tensor in
    INPUT.FORMAT, XYXY boxes, classes)."""
    dicts = DatasetCatalog.get(dataset_name)
    # MIN_SIZE_TEST 0: no resize (as detectron2's DatasetMapper at test time)
    aug = (T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
           if cfg.INPUT.MIN_SIZE_TEST else T.NoOpTransform())
    out = []
    for d in dicts:
        anns = [a for a in d.get("annotations", []) if not a.get("iscrowd", 0)]
        if not anns:
            continue
        img = utils.read_image(d["file_name"], format=cfg.INPUT.FORMAT)
        t = aug.get_transform(img) if isinstance(aug, T.Augmentation) else aug
        img = t.apply_image(img)
        boxes = np.stack([BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns])
        out.append({"image": torch.as_tensor(np.ascontiguousarray(img.transpose(2, 0, 1))),
                    "boxes": torch.as_tensor(t.apply_box(boxes), dtype=torch.float32),
                    "classes": torch.tensor([int(a["category_id"]) for a in anns])})
        if limit and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"dataset {dataset_name!r} has no image with an annotated object to probe")
    return out


def _set_bn_train(model: nn.Module, train: bool) -> None:
    """BN layers to training mode (per-batch statistics) or eval mode."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train(train)


@torch.no_grad()
def roi_features(model: nn.Module, images: Sequence[Mapping], negatives_per_object: int = 2,
                 bn: str = "train", batch_size: int = 25, seed: int = 0,
                 bg_iou: float = 0.5) -> Dict[str, torch.Tensor]:
    """Pooled RoI features (mean over the pooler's bins) and box-head outputs of every object and
    ``negatives_per_object`` background boxes per object (:func:`sample_background_boxes`).

    Returns: {"pooled": (N, C), "head": (N, D), "labels": (N,) class or K (background),
    "kinds": (N,) codes of :data:`KINDS`}. BN statistics: ``bn="train"`` per batch of
    ``batch_size`` images (running statistics are restored afterwards), ``"eval"`` running.
    """
    if bn not in ("train", "eval"):
        raise ValueError(f"bn = {bn!r}: 'train' (per-batch statistics) or 'eval' (running statistics)")
    _check_model(model)
    if not len(images):
        raise ValueError("roi_features needs at least one image")
    heads = model.roi_heads
    num_classes = heads.num_classes
    g = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    saved = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}
    _set_bn_train(model, bn == "train")
    pooled, head, labels, kinds = [], [], [], []
    try:
        for i in range(0, len(images), batch_size):
            batch = images[i:i + batch_size]
            boxes = []
            for d in batch:
                neg, nk = sample_background_boxes(d["boxes"], tuple(d["image"].shape[1:]),
                                                  negatives_per_object * len(d["boxes"]), g,
                                                  max_iou=bg_iou)
                boxes.append(Boxes(torch.cat([d["boxes"], neg]).to(model.device)))
                labels.append(torch.cat([d["classes"], torch.full((len(neg),), num_classes)]))
                kinds.append(torch.cat([torch.zeros(len(d["boxes"]), dtype=torch.long), nk]))
            il = model.preprocess_image([{"image": d["image"]} for d in batch])
            feats = model.backbone(il.tensor)
            x = heads.box_pooler([feats[f] for f in heads.box_in_features], boxes)
            pooled.append(x.mean(dim=(2, 3)).float().cpu())
            head.append(heads.box_head(x).flatten(1).float().cpu())
    finally:  # running statistics and every module's mode (BN included) as they were
        model.load_state_dict(saved, strict=False)
        model.train(was_training)
    return {"pooled": torch.cat(pooled), "head": torch.cat(head), "labels": torch.cat(labels),
            "kinds": torch.cat(kinds)}


def linear_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
                 y_test: torch.Tensor, kinds_test: Optional[torch.Tensor] = None,
                 l2: float = 1e-3, max_iter: int = 300) -> Dict[str, float]:
    """Multinomial logistic regression on standardised features (train split's mean / std),
    L-BFGS, loss = cross-entropy + ``l2`` * |W|^2. Returns accuracies in percent: "train",
    "test" and, with ``kinds_test``, "test_<kind>" for each of :data:`KINDS` present."""
    if len(x_train) == 0 or len(x_test) == 0:
        raise ValueError("linear_probe needs at least one training and one test sample")
    mu, sd = x_train.mean(0), x_train.std(0, unbiased=False) + 1e-6
    xtr, xte = (x_train - mu) / sd, (x_test - mu) / sd
    num = int(max(y_train.max(), y_test.max())) + 1
    with torch.random.fork_rng():
        torch.manual_seed(0)
        lin = nn.Linear(xtr.shape[1], num)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(lin(xtr), y_train) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        ok_tr = (lin(xtr).argmax(1) == y_train).float()
        ok_te = (lin(xte).argmax(1) == y_test).float()
    out = {"train": 100 * ok_tr.mean().item(), "test": 100 * ok_te.mean().item()}
    if kinds_test is not None:
        for code, name in enumerate(KINDS):
            sel = kinds_test == code
            if sel.any():
                out[f"test_{name}"] = 100 * ok_te[sel].mean().item()
    return out


@torch.no_grad()
def head_diagnostics(model: nn.Module, images: Sequence[Mapping], iou: float = 0.5) -> Dict[str, float]:
    """RPN recall at ``iou`` and the detector's own box classifier on ground-truth boxes (eval
    mode; module docstring). Percentages, and ``p_right`` (mean softmax of the right class)."""
    _check_model(model)
    heads = model.roi_heads
    was_training = model.training
    model.eval()
    hit = right = right_fg = n = 0
    p_right = 0.0
    try:
        for d in images:
            il = model.preprocess_image([{"image": d["image"]}])
            feats = model.backbone(il.tensor)
            proposals, _ = model.proposal_generator(il, feats, None)
            gt = Boxes(d["boxes"].to(model.device))
            y = d["classes"].to(model.device)
            if len(proposals[0]):
                hit += int((pairwise_iou(gt, proposals[0].proposal_boxes).max(1).values >= iou).sum())
            x = heads.box_pooler([feats[f] for f in heads.box_in_features], [gt])
            scores = heads.box_predictor(heads.box_head(x))[0].float().softmax(1)
            right += int((scores.argmax(1) == y).sum())
            right_fg += int((scores[:, :-1].argmax(1) == y).sum())
            p_right += float(scores[torch.arange(len(y)), y].sum())
            n += len(y)
    finally:
        model.train(was_training)
    return {"rpn_recall": 100 * hit / n, "head_right": 100 * right / n,
            "head_right_among_objects": 100 * right_fg / n, "p_right": p_right / n, "objects": n}


def probe_rcnn(cfg, model: nn.Module, train_dataset: Optional[str] = None,
               test_dataset: Optional[str] = None, negatives_per_object: int = 2, bn: str = "train",
               limit: Optional[int] = None, seed: int = 0) -> Dict[str, object]:
    """All diagnostics of the module docstring for ``model`` (built from ``cfg``, weights
    loaded by the caller). Datasets default to ``cfg.DATASETS.TRAIN[0]`` / ``TEST[0]``;
    ``limit`` caps the images per split (tests)."""
    _check_model(model)
    train_dataset = train_dataset or cfg.DATASETS.TRAIN[0]
    test_dataset = test_dataset or cfg.DATASETS.TEST[0]
    bg_iou = float(cfg.MODEL.ROI_HEADS.IOU_THRESHOLDS[0])
    tr_imgs, te_imgs = _images(cfg, train_dataset, limit), _images(cfg, test_dataset, limit)
    tr = roi_features(model, tr_imgs, negatives_per_object, bn=bn, seed=seed, bg_iou=bg_iou)
    te = roi_features(model, te_imgs, negatives_per_object, bn=bn, seed=seed + 1, bg_iou=bg_iou)
    out: Dict[str, object] = {"train_dataset": train_dataset, "test_dataset": test_dataset,
                              "boxes": {"train": len(tr["labels"]), "test": len(te["labels"])},
                              "bn": bn}
    for level in ("pooled", "head"):
        out[f"probe_{level}"] = linear_probe(tr[level], tr["labels"], te[level], te["labels"], te["kinds"])
    out["detector"] = head_diagnostics(model, te_imgs)
    return out


def format_probe(result: Mapping, title: str = "") -> str:
    """A Markdown table of :func:`probe_rcnn`'s result (one row)."""
    d = result["detector"]
    cols = ["RPN recall@0.5", "head: right class", "head: right among objects", "head: mean p(right)"]
    vals = [f"{d['rpn_recall']:.1f}", f"{d['head_right']:.1f}", f"{d['head_right_among_objects']:.1f}",
            f"{d['p_right']:.3f}"]
    for level in ("pooled", "head"):
        p = result[f"probe_{level}"]
        for k in ("test", "test_object", "test_random_background", "test_partial_background"):
            if k in p:
                cols.append(f"probe {level}: {k[5:] if k != 'test' else 'all'}")
                vals.append(f"{p[k]:.1f}")
    head = "| model | " + " | ".join(cols) + " |"
    return "\n".join([head, "|" + "---|" * (len(cols) + 1), f"| {title} | " + " | ".join(vals) + " |"])
