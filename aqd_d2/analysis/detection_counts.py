"""True / false positive and negative counts of a detector (paper 001, appendix B.4, Table 3).

BiDet's appendix reports TP, FP, TN and FN of Xnor-Net, AutoBiDet-SOP and AutoBiDet on VOC
2007 test to show that the sparse object priors remove false positives. The paper does not
spell the definitions out; this module uses the ones its numbers are consistent with:

* predicted positives: detections with ``score >= score_thresh``;
* matching per class at IoU >= ``iou`` (0.5, VOC's criterion), highest score first, each
  detection against the same-class ground truth box of highest IoU, as VOC's evaluation does:
  **TP** if that box is not matched yet; **FP** if it is (a duplicate), or if no same-class box
  reaches ``iou`` (background, bad localisation, or a wrong class). A detection whose best box
  is "ignored" (COCO ``iscrowd`` / VOC ``difficult``) counts as neither;
* **FN**: non-ignored ground truth boxes no detection matched. A wrong-class detection on an
  object is therefore one FP and, unless another detection finds the object, one FN;
* **TN**: candidate boxes the detector scored that are neither predicted positive nor an
  object: ``TN = num_candidates - TP - FP - FN`` per image. Every row of appendix Table 3 sums to
  the same 4,324,086 = 8,732 SSD300 default boxes x 4,952 VOC07 test images / 10 (FP + TN and
  TP + FN are constant across rows), i.e. the universe is the set of candidate (anchor) boxes;
  the factor 1/10 is not explained in the paper and is not applied here. ``num_candidates`` is
  given per image (e.g. :class:`AnchorCounter` records the anchors of the model's anchor
  generator); without it TN is not reported.

``score_thresh`` defaults to 0.01, the test confidence threshold of ssd.pytorch, on which
BiDet's SSD code is built; the paper does not state its threshold (Table 3's ~76 FP per image
and 98% recall for Xnor-Net fit such a low one).
"""
from __future__ import annotations

import logging
from collections import OrderedDict, defaultdict
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import BoxMode
from detectron2.utils import comm
from torch import nn

__all__ = ["count_image", "count_detections", "predictions_from_coco_results", "format_counts",
           "DetectionCountEvaluator", "AnchorCounter", "DEFAULT_SCORE_THRESH"]

logger = logging.getLogger(__name__)

#: default score threshold of a predicted positive (see the module docstring)
DEFAULT_SCORE_THRESH = 0.01


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of XYXY boxes; a: (N, 4), b: (M, 4) -> (N, M). Continuous coordinates
    (area = w * h, as detectron2 / COCO; VOC's +1 pixel convention is not used)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(axis=1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def count_image(pred_boxes, pred_scores, pred_classes, gt_boxes, gt_classes, gt_ignore=None,
                iou: float = 0.5, score_thresh: float = DEFAULT_SCORE_THRESH) -> Dict[str, Any]:
    """TP / FP / FN of one image (definitions in the module docstring).

    Args:
        pred_boxes: (N, 4) XYXY absolute boxes.
        pred_scores: (N,) scores.
        pred_classes: (N,) contiguous class ids.
        gt_boxes: (G, 4) XYXY absolute boxes.
        gt_classes: (G,) class ids.
        gt_ignore: (G,) bool, True for crowd / difficult boxes (None: none ignored).
        iou: IoU threshold of a match.
        score_thresh: detections below it are not predicted positives.
    Returns:
        ``{"TP", "FP", "FN": int, "per_class": {class_id: {"TP", "FP", "FN"}}}``.
    """
    pb = np.asarray(pred_boxes, dtype=np.float64).reshape(-1, 4)
    ps = np.asarray(pred_scores, dtype=np.float64).reshape(-1)
    pc = np.asarray(pred_classes, dtype=np.int64).reshape(-1)
    gb = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    gc = np.asarray(gt_classes, dtype=np.int64).reshape(-1)
    gi = np.zeros(len(gb), bool) if gt_ignore is None else np.asarray(gt_ignore, bool).reshape(-1)
    if not (len(pb) == len(ps) == len(pc)) or not (len(gb) == len(gc) == len(gi)):
        raise ValueError(f"inconsistent lengths: {len(pb)} boxes / {len(ps)} scores / {len(pc)} "
                         f"classes; {len(gb)} gt boxes / {len(gc)} gt classes / {len(gi)} ignore flags")
    keep = ps >= score_thresh
    pb, ps, pc = pb[keep], ps[keep], pc[keep]
    per_class: Dict[int, Dict[str, int]] = defaultdict(lambda: {"TP": 0, "FP": 0, "FN": 0})
    for c in sorted(set(pc.tolist()) | set(gc.tolist())):
        d_idx = np.where(pc == c)[0]
        d_idx = d_idx[np.argsort(-ps[d_idx], kind="stable")]  # highest score first
        g_idx = np.where(gc == c)[0]
        matched = np.zeros(len(g_idx), bool)
        ious = _iou(pb[d_idx], gb[g_idx]) if len(g_idx) else np.zeros((len(d_idx), 0))
        stats = per_class[c]
        for k in range(len(d_idx)):
            if ious.shape[1] == 0 or ious[k].max() < iou:
                stats["FP"] += 1
                continue
            j = int(ious[k].argmax())
            if gi[g_idx[j]]:
                continue  # matched an ignored box: neither TP nor FP (VOC "difficult")
            if matched[j]:
                stats["FP"] += 1  # duplicate detection of an already found object
            else:
                matched[j] = True
                stats["TP"] += 1
        stats["FN"] += int((~matched & ~gi[g_idx]).sum())
    totals = {k: sum(s[k] for s in per_class.values()) for k in ("TP", "FP", "FN")}
    return {**totals, "per_class": {c: dict(s) for c, s in per_class.items()}}


def _gt_arrays(record: Mapping) -> tuple:
    """(boxes XYXY (G, 4), classes (G,), ignore (G,)) of a detectron2 dataset dict."""
    anns = record.get("annotations", [])
    boxes = [BoxMode.convert(list(a["bbox"]), a.get("bbox_mode", BoxMode.XYXY_ABS), BoxMode.XYXY_ABS)
             for a in anns]
    classes = [int(a["category_id"]) for a in anns]
    ignore = [bool(a.get("iscrowd", 0)) or bool(a.get("difficult", 0)) for a in anns]
    return (np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(classes, np.int64),
            np.asarray(ignore, bool))


def _pred_arrays(pred: Mapping, id_map: Optional[Mapping[int, int]]) -> tuple:
    """(boxes XYXY, scores, classes) of one prediction record: ``{"instances": Instances}``
    (model output), ``{"instances": [coco result dicts]}`` (COCOEvaluator's saved file) or
    ``{"instances": {"boxes": (N, 4) XYXY, "scores": (N,), "classes": (N,)}}``."""
    inst = pred.get("instances", [])
    if isinstance(inst, Mapping):
        return (np.asarray(inst["boxes"], np.float64).reshape(-1, 4), np.asarray(inst["scores"]),
                np.asarray(inst["classes"], np.int64))
    if hasattr(inst, "pred_boxes"):
        return (inst.pred_boxes.tensor.detach().cpu().numpy(), inst.scores.detach().cpu().numpy(),
                inst.pred_classes.detach().cpu().numpy())
    boxes = [BoxMode.convert(list(d["bbox"]), BoxMode.XYWH_ABS, BoxMode.XYXY_ABS) for d in inst]
    classes = [int(d["category_id"]) for d in inst]
    if id_map is not None:
        classes = [id_map[c] for c in classes]
    return (np.asarray(boxes, np.float64).reshape(-1, 4),
            np.asarray([float(d["score"]) for d in inst]), np.asarray(classes, np.int64))


def predictions_from_coco_results(results: Iterable[Mapping]) -> List[dict]:
    """Group a COCO results json (a list of ``{"image_id", "category_id", "bbox" XYWH, "score"}``)
    into ``[{"image_id", "instances": [...]}]`` records, the format of COCOEvaluator's
    ``instances_predictions.pth``."""
    by_image: Dict[Any, list] = defaultdict(list)
    for r in results:
        by_image[r["image_id"]].append(r)
    return [{"image_id": k, "instances": v} for k, v in by_image.items()]


def count_detections(predictions: Sequence[Mapping], dataset_dicts: Sequence[Mapping], iou: float = 0.5,
                     score_thresh: float = DEFAULT_SCORE_THRESH,
                     num_candidates: Union[None, int, Mapping[Any, int]] = None,
                     category_id_map: Optional[Mapping[int, int]] = None,
                     class_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """TP / FP / FN (and TN) of a detector over a dataset (appendix B.4 of paper 001).

    Args:
        predictions: one record per image, ``{"image_id", "instances"}`` with ``instances`` a
            detectron2 ``Instances`` (pred_boxes / scores / pred_classes, image coordinates),
            a list of COCO result dicts, or a dict of arrays ``boxes`` (XYXY) / ``scores`` /
            ``classes``. Images without a record have no detections.
        dataset_dicts: detectron2 dataset dicts (``image_id``, ``annotations`` with ``bbox``,
            ``bbox_mode``, ``category_id``, optional ``iscrowd`` / ``difficult``).
        iou: IoU threshold of a match.
        score_thresh: minimum score of a predicted positive.
        num_candidates: candidate boxes per image (an int for all, or ``{image_id: n}``);
            None: TN is None.
        category_id_map: maps the ``category_id`` of COCO result dicts to the dataset dicts'
            ids (``thing_dataset_id_to_contiguous_id``); None: used as they are.
        class_names: names for the per-class table (index = class id).
    Returns:
        ``{"TP", "FP", "FN", "TN", "num_images", "num_gt", "iou", "score_thresh", "per_class"}``;
        ``per_class`` maps a class name (or id) to its TP / FP / FN.
    Raises:
        ValueError: a prediction for an image not in ``dataset_dicts``, or fewer candidates
            than TP + FP + FN in an image.
    """
    preds = {p["image_id"]: p for p in predictions}
    unknown = set(preds) - {d["image_id"] for d in dataset_dicts}
    if unknown:
        raise ValueError(f"predictions for {len(unknown)} image ids that are not in the dataset, "
                         f"e.g. {sorted(map(str, unknown))[:3]}")
    totals = {"TP": 0, "FP": 0, "FN": 0}
    tn: Optional[int] = 0 if num_candidates is not None else None
    per_class: Dict[int, Dict[str, int]] = defaultdict(lambda: {"TP": 0, "FP": 0, "FN": 0})
    num_gt = 0
    for record in dataset_dicts:
        gb, gc, gi = _gt_arrays(record)
        num_gt += int((~gi).sum())
        pred = preds.get(record["image_id"])
        pb, ps, pc = _pred_arrays(pred, category_id_map) if pred is not None else (
            np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64))
        r = count_image(pb, ps, pc, gb, gc, gi, iou=iou, score_thresh=score_thresh)
        for k in totals:
            totals[k] += r[k]
        for c, s in r["per_class"].items():
            for k in s:
                per_class[c][k] += s[k]
        if tn is not None:
            n = num_candidates if isinstance(num_candidates, int) else num_candidates[record["image_id"]]
            rest = int(n) - r["TP"] - r["FP"] - r["FN"]
            if rest < 0:
                raise ValueError(f"image {record['image_id']!r}: {n} candidates < TP + FP + FN = "
                                 f"{r['TP'] + r['FP'] + r['FN']}; num_candidates must count every "
                                 "box the detector scores (e.g. its anchors)")
            tn += rest
    name = (lambda c: class_names[c]) if class_names is not None else (lambda c: c)
    return {**totals, "TN": tn, "num_images": len(dataset_dicts), "num_gt": num_gt, "iou": iou,
            "score_thresh": score_thresh,
            "per_class": {name(c): dict(per_class[c]) for c in sorted(per_class)}}


def format_counts(counts: Mapping[str, Any]) -> str:
    """A text table: one row per class and a total row (TN only in the total)."""
    from tabulate import tabulate

    rows = [(str(c), s["TP"], s["FP"], s["FN"], "") for c, s in counts["per_class"].items()]
    tn = counts["TN"]
    rows.append(("all", counts["TP"], counts["FP"], counts["FN"], "-" if tn is None else tn))
    head = (f"detections with score >= {counts['score_thresh']}, IoU >= {counts['iou']}, "
            f"{counts['num_images']} images, {counts['num_gt']} objects")
    return head + "\n" + tabulate(rows, headers=["class", "TP", "FP", "FN", "TN"])


class AnchorCounter:
    """Records how many anchors (candidate boxes) a detector's anchor generator produces per
    image, for the TN count. Forward hooks on every submodule named ``anchor_generator``
    (detectron2's RPN, RetinaNet, FCOS, ...); the hooks live here, not in the model.

    Args:
        model: a detectron2 detector.
    Raises:
        ValueError: the model has no ``anchor_generator`` submodule.
    """

    def __init__(self, model: nn.Module):
        gens = [m for n, m in model.named_modules() if n.split(".")[-1] == "anchor_generator"]
        if not gens:
            raise ValueError(f"{type(model).__name__} has no 'anchor_generator' submodule: give the "
                             "number of candidate boxes per image explicitly")
        self.last: Optional[int] = None
        self._handles = [g.register_forward_hook(self._hook) for g in gens]

    def _hook(self, module: nn.Module, inputs, output) -> None:
        # output: list over levels of Boxes (one image's anchors; shared by the batch)
        self.last = int(sum(len(b) for b in output))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class DetectionCountEvaluator(DatasetEvaluator):
    """detectron2 ``DatasetEvaluator`` giving :func:`count_detections` on a registered dataset,
    e.g. ``Trainer.test(cfg, model, DetectionCountEvaluator("voc_2007_test"))``.

    Args:
        dataset_name: a DatasetCatalog name (its dicts are the ground truth).
        iou: IoU threshold.
        score_thresh: minimum score of a predicted positive.
        num_candidates: None (no TN), an int per image, or an :class:`AnchorCounter` on the
            evaluated model (its count of the batch just processed is used).
        distributed: gather predictions from all ranks (as detectron2's evaluators).

    After :meth:`evaluate`, ``counts`` holds the full :func:`count_detections` result (with
    the per-class table) on the main process.
    """

    def __init__(self, dataset_name: str, iou: float = 0.5, score_thresh: float = DEFAULT_SCORE_THRESH,
                 num_candidates: Union[None, int, AnchorCounter] = None, distributed: bool = True):
        self.dataset_name = dataset_name
        self.iou, self.score_thresh = iou, score_thresh
        self.num_candidates = num_candidates
        self.distributed = distributed
        self._class_names = MetadataCatalog.get(dataset_name).get("thing_classes")
        self.reset()

    def reset(self) -> None:
        self.counts: Optional[Dict[str, Any]] = None
        self._predictions: List[dict] = []
        self._candidates: Dict[Any, int] = {}

    def process(self, inputs: List[dict], outputs: List[dict]) -> None:
        n = self.num_candidates.last if isinstance(self.num_candidates, AnchorCounter) else self.num_candidates
        for inp, out in zip(inputs, outputs):
            inst = out["instances"].to(torch.device("cpu"))
            self._predictions.append({"image_id": inp["image_id"], "instances": {
                "boxes": inst.pred_boxes.tensor.numpy(), "scores": inst.scores.numpy(),
                "classes": inst.pred_classes.numpy()}})
            if n is not None:
                self._candidates[inp["image_id"]] = int(n)

    def evaluate(self) -> "OrderedDict[str, Dict[str, float]]":
        preds, cands = self._predictions, self._candidates
        if self.distributed:
            comm.synchronize()
            preds = [p for part in comm.gather(preds, dst=0) for p in part]
            cands = {k: v for part in comm.gather(cands, dst=0) for k, v in part.items()}
            if not comm.is_main_process():
                return OrderedDict()
        seen = {p["image_id"] for p in preds}  # every processed image has a record
        dicts = [d for d in DatasetCatalog.get(self.dataset_name) if d["image_id"] in seen]
        counts = count_detections(preds, dicts, iou=self.iou, score_thresh=self.score_thresh,
                                  num_candidates=cands if cands else None, class_names=self._class_names)
        logger.info("Detection counts on %s:\n%s", self.dataset_name, format_counts(counts))
        self.counts = counts
        res = {k: float(counts[k]) for k in ("TP", "FP", "FN")}
        if counts["TN"] is not None:
            res["TN"] = float(counts["TN"])
        return OrderedDict(counts=res)

