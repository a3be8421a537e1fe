"""Top-k accuracy of an image classifier, as a detectron2 ``DatasetEvaluator`` (issue 17).

Used by :class:`~aqd_d2.engine.pretrain.PretrainTrainer` through detectron2's
``inference_on_dataset``: the model's outputs are ``{"logits": (num_classes,)}`` per image
(:class:`~aqd_d2.modeling.meta_arch.classifier.ImageClassifier`), the inputs carry
``"label"``. With several processes the counts are summed over ranks (``comm.gather``).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Dict, List, Sequence

import torch
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

__all__ = ["ClassificationEvaluator"]

logger = logging.getLogger(__name__)


class ClassificationEvaluator(DatasetEvaluator):
    """Top-k accuracy (percent) for each k of ``topk``.

    Args:
        dataset_name: for the log line.
        topk: the k's (``AQD.PRETRAIN.TOPK``); a k above the number of classes counts as the
            number of classes (every label is then in the top k).
    Returns (``evaluate``):
        ``{"classification": {"top1": float, "top5": float, ...}}`` on the main process, ``{}``
        elsewhere and when no image was seen.
    """

    def __init__(self, dataset_name: str, topk: Sequence[int] = (1, 5)):
        self.dataset_name = dataset_name
        self.topk = [int(k) for k in topk]
        self.reset()

    def reset(self) -> None:
        self._correct: List[int] = [0] * len(self.topk)
        self._count = 0

    def process(self, inputs: List[Dict], outputs: List[Dict]) -> None:
        if not inputs:
            return
        logits = torch.stack([o["logits"].detach().float().cpu() for o in outputs])
        labels = torch.as_tensor([int(i["label"]) for i in inputs])
        kmax = min(max(self.topk), logits.shape[1])
        top = logits.topk(kmax, dim=1).indices  # (N, kmax), best first
        hits = top == labels[:, None]
        for j, k in enumerate(self.topk):
            self._correct[j] += int(hits[:, :min(k, kmax)].any(dim=1).sum())
        self._count += len(inputs)

    def evaluate(self) -> Dict:
        parts = comm.gather((self._correct, self._count), dst=0)
        if not comm.is_main_process():
            return {}
        count = sum(n for _, n in parts)
        if count == 0:
            logger.warning("ClassificationEvaluator: no image of %s was evaluated", self.dataset_name)
            return {}
        correct = [sum(c[j] for c, _ in parts) for j in range(len(self.topk))]
        result = OrderedDict((f"top{k}", 100.0 * c / count) for k, c in zip(self.topk, correct))
        logger.info("%s: %s over %d images", self.dataset_name,
                    ", ".join(f"{k} {v:.2f}%" for k, v in result.items()), count)
        return OrderedDict(classification=result)
