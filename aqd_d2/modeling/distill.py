"""Intermediate-layer knowledge transfer (paper 004, sec. III-C, eq. 3) for any aqd_d2 detector,
registered as the meta-architecture builder ``"KnowledgeTransfer"`` (keys ``MODEL.KT.*``).

``build_model(cfg)`` with ``MODEL.META_ARCHITECTURE = "KnowledgeTransfer"`` builds

* the *student*: ``MODEL.KT.STUDENT_META_ARCHITECTURE`` from this cfg (normally
  ``"QuantizedDetector"``, i.e. the binary/quantized detector of ``MODEL.QUANT``);
* the *teacher*: ``MODEL.KT.TEACHER_CONFIG`` (a yaml), or by default this cfg with
  ``MODEL.QUANT.ENABLED False`` (the float twin), loaded from ``MODEL.KT.TEACHER_WEIGHTS``
  (default ``MODEL.WEIGHTS``: the paper initialises the student by copying the teacher), in
  eval mode with ``requires_grad=False`` and always run under ``torch.no_grad()``;

and returns the **student itself** with a :class:`KnowledgeTransferLoss` attached through forward
hooks. The student's class, forward and state_dict keys are unchanged (float and quantized
checkpoints load as usual; the teacher is not in the state_dict, nor in ``parameters()``, so
optimizers and DDP never see it). In training the student's loss dict becomes

``{name: lambda1 * loss for classification losses, lambda2 * loss for localization losses,
   ..., "loss_kt": lambda3 * sum_K mean((F_t - F_s)**2)}``

with classification / localization losses told apart by ``CLS_LOSS_REGEX`` / ``LOC_LOSS_REGEX``
(other losses keep weight 1). K (``MODEL.KT.LAYERS``) are full-match regexes of module names;
a module matched together with one of its ancestors is dropped (``backbone\\.conv5_.*`` means
the conv layers, not also their norms). Each matched module's output (a tensor, or the tensors
of a dict / list) is compared with the teacher module of the same name.

Teacher BN: ``MODEL.KT.TEACHER_BN_MODE`` "eval" uses its running statistics (a fixed teacher);
"batch" normalizes with the batch statistics as the training student does (running statistics
untouched), so that a student equal to its teacher gets exactly zero KT loss.
"""
from __future__ import annotations

import logging
import re
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.modeling import META_ARCH_REGISTRY
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from aqd_d2.config import ConfigError, validate_aqd_config

__all__ = ["KnowledgeTransfer", "KnowledgeTransferLoss", "build_teacher_config",
           "frozen_teacher_config", "resolve_layers"]

logger = logging.getLogger(__name__)


def resolve_layers(model: nn.Module, patterns: Sequence[str]) -> List[str]:
    """Module names fully matching any pattern, without those whose ancestor also matched.

    Raises:
        ConfigError: a pattern matches no module.
    """
    names = [n for n, _ in model.named_modules() if n]
    hits = []
    for p in patterns:
        found = [n for n in names if re.fullmatch(p, n)]
        if not found:
            raise ConfigError(f"MODEL.KT.LAYERS entry {p!r} matches no module of the student")
        hits.extend(found)
    chosen = sorted(set(hits), key=names.index)
    return [n for n in chosen if not any(n.startswith(o + ".") for o in chosen if o != n)]


def _tensors(x) -> List[Tensor]:
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for k in sorted(x) for t in _tensors(x[k])]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    return []


class KnowledgeTransferLoss:
    """Teacher + feature hooks + loss rewriting attached to a student (see module doc).

    A plain object (not an ``nn.Module``) so that the teacher stays outside the student's
    parameters and state_dict. Captured features live only during one student forward.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, layers: Sequence[str],
                 lambda_cls: float = 1.0, lambda_loc: float = 1.0, lambda_kt: float = 1.0,
                 cls_loss_regex: str = r"loss_(cls|heatmap|obj|noobj|class).*",
                 loc_loss_regex: str = r"loss_(box|loc|size|offset|coord|bbox|centerness).*",
                 teacher_bn_mode: str = "eval"):
        if teacher_bn_mode not in ("eval", "batch"):
            raise ConfigError(f"MODEL.KT.TEACHER_BN_MODE = {teacher_bn_mode!r}: use 'eval' or 'batch'")
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.layer_names = resolve_layers(student, layers)
        t_modules = dict(teacher.named_modules())
        missing = [n for n in self.layer_names if n not in t_modules]
        if missing:
            raise ConfigError(f"MODEL.KT.LAYERS: the teacher has no module(s) {missing}")
        self.lambdas = (float(lambda_cls), float(lambda_loc), float(lambda_kt))
        self.cls_re, self.loc_re = re.compile(cls_loss_regex), re.compile(loc_loss_regex)
        self.teacher_bn_mode = teacher_bn_mode
        self._feats: Dict[str, Dict[str, List[Tensor]]] = {"student": {}, "teacher": {}}
        s_modules = dict(student.named_modules())
        for n in self.layer_names:
            s_modules[n].register_forward_hook(self._capture("student", n))
            t_modules[n].register_forward_hook(self._capture("teacher", n))
        student.register_forward_hook(self._after_student_forward)

    def _capture(self, side: str, name: str):
        def hook(module, args, output):
            if side == "student" and not module.training:
                return
            self._feats[side].setdefault(name, []).extend(_tensors(output))
        return hook

    @torch.no_grad()
    def _run_teacher(self, batched_inputs) -> None:
        bns = [m for m in self.teacher.modules() if isinstance(m, _BatchNorm)]
        saved = [(m.training, m.momentum, None if m.num_batches_tracked is None
                  else m.num_batches_tracked.clone()) for m in bns]
        if self.teacher_bn_mode == "batch":
            for m in bns:  # batch statistics; momentum 0 leaves the running statistics as they are
                m.train()
                m.momentum = 0.0
        try:
            self.teacher(batched_inputs)
        finally:
            for m, (training, momentum, tracked) in zip(bns, saved):
                m.train(training)
                m.momentum = momentum
                if tracked is not None:
                    m.num_batches_tracked.copy_(tracked)

    def kt_loss(self) -> Tensor:
        """``sum_K mean((F_t - F_s)**2)`` over the captured features."""
        total = None
        for n in self.layer_names:
            fs, ft = self._feats["student"].get(n, []), self._feats["teacher"].get(n, [])
            if len(fs) != len(ft) or not fs:
                raise RuntimeError(f"knowledge transfer: layer {n!r} produced {len(fs)} student "
                                   f"and {len(ft)} teacher feature maps")
            for s, t in zip(fs, ft):
                term = F.mse_loss(s, t.to(s.dtype))
                total = term if total is None else total + term
        return total

    def _after_student_forward(self, module, args, output):
        if not module.training or not isinstance(output, dict):
            self._clear()
            return None
        try:
            self._run_teacher(args[0])
            kt = self.kt_loss()
        finally:
            feats = self._feats
            self._clear()
        del feats
        lc, ll, lk = self.lambdas
        out = {}
        for k, v in output.items():
            if self.cls_re.fullmatch(k):
                v = lc * v
            elif self.loc_re.fullmatch(k):
                v = ll * v
            out[k] = v
        out["loss_kt"] = lk * kt
        return out

    def _clear(self) -> None:
        self._feats = {"student": {}, "teacher": {}}


def frozen_teacher_config(cfg: CfgNode, config_file: str = "",
                          meta_architecture: str = "") -> CfgNode:
    """A frozen teacher's config: ``config_file`` merged into a fresh aqd_d2 config (on
    ``cfg``'s device), or ``cfg`` with quantization off (and ``MODEL.META_ARCHITECTURE =
    meta_architecture`` if given); in both, without the student's training schedules
    (``AQD.STAGE_BINARIZATION``, ``AQD.PRUNING``). Shared by ``MODEL.KT`` and ``MODEL.CLS``'s
    distillation (:mod:`aqd_d2.modeling.meta_arch.classifier`)."""
    if config_file:
        from detectron2.config import get_cfg

        from aqd_d2.config import add_aqd_config

        tcfg = add_aqd_config(get_cfg())
        tcfg.merge_from_file(config_file)
        tcfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    else:
        tcfg = cfg.clone()
        tcfg.defrost()
        if meta_architecture:
            tcfg.MODEL.META_ARCHITECTURE = meta_architecture
        tcfg.MODEL.QUANT.ENABLED = False
    # The teacher is frozen: no training schedule (stage-wise binarization, pruning) of the
    # student's config applies to it.
    tcfg.AQD.STAGE_BINARIZATION.GROUPS = []
    tcfg.AQD.STAGE_BINARIZATION.ITERS = []
    tcfg.AQD.PRUNING.METHOD = "none"
    return tcfg


def build_teacher_config(cfg: CfgNode) -> CfgNode:
    """The teacher's config: ``MODEL.KT.TEACHER_CONFIG`` merged into a fresh aqd_d2 config, or
    this cfg with quantization off and the student's meta-architecture; in both, without
    training schedules (``AQD.STAGE_BINARIZATION``, ``AQD.PRUNING``)."""
    kt = cfg.MODEL.KT
    tcfg = frozen_teacher_config(cfg, kt.TEACHER_CONFIG, kt.STUDENT_META_ARCHITECTURE)
    if tcfg.MODEL.META_ARCHITECTURE == "KnowledgeTransfer":
        raise ConfigError("the teacher config must not itself use MODEL.META_ARCHITECTURE "
                          "'KnowledgeTransfer'")
    return tcfg


@META_ARCH_REGISTRY.register()
def KnowledgeTransfer(cfg: CfgNode) -> nn.Module:  # noqa: N802 (registry name)
    """Build the student with a frozen teacher attached (see module doc).

    Returns:
        the student model; its ``knowledge_transfer`` attribute is the :class:`KnowledgeTransferLoss`.
    """
    validate_aqd_config(cfg)
    kt = cfg.MODEL.KT
    name = kt.STUDENT_META_ARCHITECTURE
    if name == "KnowledgeTransfer" or name not in META_ARCH_REGISTRY:
        raise ConfigError(f"MODEL.KT.STUDENT_META_ARCHITECTURE = {name!r}: name a detector "
                          "registered in META_ARCH_REGISTRY (e.g. 'QuantizedDetector')")
    scfg = cfg.clone()
    scfg.defrost()
    scfg.MODEL.META_ARCHITECTURE = name
    student = META_ARCH_REGISTRY.get(name)(scfg)
    tcfg = build_teacher_config(cfg)
    teacher = META_ARCH_REGISTRY.get(tcfg.MODEL.META_ARCHITECTURE)(tcfg)
    teacher.to(torch.device(cfg.MODEL.DEVICE))
    weights = kt.TEACHER_WEIGHTS or cfg.MODEL.WEIGHTS
    if weights:
        DetectionCheckpointer(teacher).load(weights)
    else:
        logger.warning("knowledge transfer: no MODEL.KT.TEACHER_WEIGHTS / MODEL.WEIGHTS, the "
                       "teacher keeps its random initialization")
    student.knowledge_transfer = KnowledgeTransferLoss(
        student, teacher, list(kt.LAYERS), kt.LAMBDA_CLS, kt.LAMBDA_LOC, kt.LAMBDA_KT,
        kt.CLS_LOSS_REGEX, kt.LOC_LOSS_REGEX, kt.TEACHER_BN_MODE,
    )
    return student

