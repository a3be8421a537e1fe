#!/usr/bin/env python
"""The README's main job: float -> quantized -> packed -> fast, in one command, on a CPU.

    python3 tools/run.py demo [--quick] [--out DIR] [--verbose] [KEY VALUE ...]

On the embedded shapes dataset, with detectron2's own trainer and COCO evaluator
(``aqd_d2.train_net``: ``build_parser`` / ``setup`` / ``Trainer``):

1. train the float AQD RetinaNet-R18-FPN (configs/RetinaNet/R18-FPN-shapes-cpu-FP.yaml) from
   scratch;
2. fine-tune it to LIQ 4-bit and to 2-bit, multi-level BN head (configs/RetinaNet/
   R18-FPN-shapes-cpu-{4bit,2bit}.yaml), each starting from the float checkpoint through
   ``MODEL.WEIGHTS`` (a missing float checkpoint is an error, never training from scratch);
3. export: the float model's weights as a ``.pth`` of its state_dict, the quantized models as
   packed files (:func:`aqd_d2.export.save_packed`); load each packed file for deployed
   inference (:func:`aqd_d2.export.deploy.load_for_inference`: k-bit layers on the int8
   kernel path; the float model: :func:`~aqd_d2.export.deploy.convert_for_inference`, BN
   folded);
4. COCO AP / AP50 on the validation set of the model as trained (fake-quant) and as deployed;
   single-image CPU latency of the three deployed models, timed interleaved in this process
   (median of the rounds); one PNG with the three models' detections side by side; one table.

Every stage records a fingerprint of its settings (the full config, chained to the stages it
depends on). Run it again after an interruption and finished stages are reused, a
half-finished training resumes from its last checkpoint (``--resume``), and a stage whose
settings changed starts over. ``--quick`` runs a short schedule (a few minutes) and says so in
the table. Trailing ``KEY VALUE`` pairs override the config of every model.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import hashlib
import json
import logging
import math
import os
import shutil
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

# detectron2 0.6 scripts functions at import time; torch >= 2.10 warns about it on every run
warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message="torch.meshgrid: in an upcoming release")  # detectron2's anchors
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found"

import aqd_d2  # noqa: F401  isort:skip  (compat shims + registrations before detectron2.data)
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.engine import HookBase
from detectron2.evaluation import DatasetEvaluator, DatasetEvaluators
from detectron2.modeling import build_model

from aqd_d2 import train_net
from aqd_d2.analysis.visualize import draw_boxes, save_grid
from aqd_d2.engine import AQDCheckpointer, build_evaluator
from aqd_d2.export import save_packed
from aqd_d2.export.deploy import convert_for_inference, load_for_inference

REPO = Path(__file__).resolve().parent.parent
FLOAT_CL = "float, channels_last"
CONFIGS = REPO / "configs" / "RetinaNet"


@dataclass(frozen=True)
class Variant:
    key: str     # folder name under --out
    label: str   # table row
    config: Path
    bits: int    # 32: float


VARIANTS = (
    Variant("float", "float", CONFIGS / "R18-FPN-shapes-cpu-FP.yaml", 32),
    Variant("4bit", "4-bit LIQ", CONFIGS / "R18-FPN-shapes-cpu-4bit.yaml", 4),
    Variant("2bit", "2-bit LIQ", CONFIGS / "R18-FPN-shapes-cpu-2bit.yaml", 2),
)


@dataclass(frozen=True)
class Schedule:
    float_iters: int
    quant_iters: int
    float_lr: float = 0.01
    quant_lr: float = 0.01
    latency_repeats: int = 30
    # FPN and head width (the configs' 256 halved): the same loss per iteration on this data in
    # half the time (0.37 vs 0.78 s per float iteration of batch 8 on 2 idle cores), so the
    # float model gets 900 iterations within the 10-minute budget instead of 450
    fpn_channels: int = 128


FULL = Schedule(float_iters=900, quant_iters=150)
QUICK = Schedule(float_iters=200, quant_iters=50, latency_repeats=10)


class DemoError(RuntimeError):
    """A stage cannot run (e.g. the float checkpoint a quantized stage starts from is missing)."""


# ---- progress lines ----------------------------------------------------------------------------
def _clock(seconds: float) -> str:
    s = int(round(max(seconds, 0)))
    return f"{s // 60}:{s % 60:02d}"


class Progress:
    """One line per stage after its first unit of work, about every tenth of it, and at its
    end: ``[k/n] name  done/total unit  elapsed  ETA``. The ETA is the rate since the first
    unit (which also pays for start-up: building, loading, first-call set-up) times what is
    left."""

    def __init__(self, index: int, total: int, name: str):
        self.head = f"[{index}/{total}] {name:<32}"
        self.start = time.perf_counter()
        self.last = -1
        self.origin = None  # (time, done) at the first update

    def say(self, text: str) -> None:
        print(f"{self.head} {text}", flush=True)

    def update(self, done: int, total: int, unit: str) -> None:
        """``done`` of ``total`` units (a resumed training starts above 0)."""
        now = time.perf_counter()
        first = self.origin is None
        if first:
            self.origin = (now, done)
        step = max(1, total // 10)
        if not first and done != total and done // step == self.last // step:
            return
        self.last = done
        t0, d0 = self.origin
        eta = ""
        if done != total:
            eta = "  ETA " + (_clock((now - t0) / (done - d0) * (total - done)) if done > d0 else "...")
        self.say(f"{unit} {done:>4}/{total:<4} {_clock(now - self.start)} elapsed{eta}")

    def done(self, text: str = "done") -> float:
        elapsed = time.perf_counter() - self.start
        self.say(f"{text} ({_clock(elapsed)})")
        return elapsed


class _ProgressHook(HookBase):
    def __init__(self, progress: Progress):
        self.progress = progress

    def after_step(self):
        t = self.trainer
        self.progress.update(t.iter + 1, t.max_iter, "iter")


class _ProgressEvaluator(DatasetEvaluator):
    """Counts the images detectron2's ``inference_on_dataset`` hands the evaluators."""

    def __init__(self, progress: Progress, total: int, offset: int = 0):
        self.progress, self.total, self.offset, self.n = progress, total, offset, 0

    def reset(self):
        self.n = 0

    def process(self, inputs, outputs):
        self.n += len(inputs)
        self.progress.update(self.offset + self.n, self.total, "image")

    def evaluate(self):
        return None


# ---- records: what a finished stage wrote, with the fingerprint of its settings ------------
def _fingerprint(*parts: str) -> str:
    return hashlib.sha256("\n--\n".join(parts).encode()).hexdigest()[:16]


def _read_record(path: Path, fingerprint: str) -> Optional[dict]:
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return rec if rec.get("fingerprint") == fingerprint else None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ---- detectron2 logging: to each stage's log.txt; the console gets warnings only -------------
_D2_LOGGERS = ("detectron2", "fvcore", "aqd_d2")


def _route_logs(sink, console, output_dir: str) -> None:
    """After ``train_net.setup`` (run with stdout redirected to ``sink``): one console handler
    per logger (aqd_d2: warnings; detectron2 / fvcore: errors, e.g. not their expected
    "quantizer state not in the float checkpoint" list), and only the current stage's log file
    (detectron2's setup_logger adds handlers per output folder and keeps the old ones)."""
    here = os.path.abspath(output_dir)
    for name in _D2_LOGGERS:
        log = logging.getLogger(name)
        kept = None
        for h in list(log.handlers):
            stream = getattr(h, "stream", None)
            path = getattr(stream, "name", None)
            if stream in (sink, console, sys.__stdout__, sys.stderr):
                if kept is None:
                    kept = h
                    h.setStream(console)
                    h.setLevel(logging.WARNING if name == "aqd_d2" else logging.ERROR)
                else:
                    log.removeHandler(h)
            elif isinstance(path, str) and not os.path.abspath(path).startswith(here + os.sep):
                log.removeHandler(h)


class Demo:
    def __init__(self, args, schedule: Schedule):
        self.args = args
        self.schedule = schedule
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.train_set = f"{args.dataset}_train"
        self.test_set = f"{args.dataset}_val"
        self.fps: Dict[str, str] = {}       # training fingerprint per variant
        self.rows: Dict[str, dict] = {v.key: {"label": v.label} for v in VARIANTS}
        self.stage_times: Dict[str, float] = {}
        self.num_stages = 3 * len(VARIANTS) + 2
        self.stage_index = 0
        self._eval_cfgs: Dict[str, object] = {}
        self._trained: Dict[str, torch.nn.Module] = {}
        self._deployed: Dict[str, tuple] = {}

    # -- configs -----------------------------------------------------------------------------
    def _opts(self, v: Variant) -> List[str]:
        s, a = self.schedule, self.args
        n = s.float_iters if v.bits == 32 else s.quant_iters
        steps = sorted({x for x in (int(0.75 * n), int(0.94 * n)) if 0 < x < n})
        opts = [
            "OUTPUT_DIR", str(self.out / v.key),
            "SEED", "0",
            "DATASETS.TRAIN", f"('{self.train_set}',)",
            "DATASETS.TEST", "()",  # evaluated by the demo itself (fake-quant and deployed)
            "SOLVER.MAX_ITER", str(n),
            "SOLVER.STEPS", str(tuple(steps)),
            "SOLVER.WARMUP_ITERS", str(min(100, n // 8) if v.bits == 32 else min(20, n // 10)),
            "SOLVER.BASE_LR", str(s.float_lr if v.bits == 32 else s.quant_lr),
            "SOLVER.CHECKPOINT_PERIOD", str(max(1, n // 4)),
            "MODEL.FPN.OUT_CHANNELS", str(s.fpn_channels),
        ]
        if a.image_size:
            opts += ["INPUT.MIN_SIZE_TRAIN", f"({a.image_size},)", "INPUT.MAX_SIZE_TRAIN", str(2 * a.image_size),
                     "INPUT.MIN_SIZE_TEST", str(a.image_size), "INPUT.MAX_SIZE_TEST", str(2 * a.image_size)]
        if a.batch:
            opts += ["SOLVER.IMS_PER_BATCH", str(a.batch)]
        if v.bits != 32:
            # explicitly from the float stage's checkpoint; never from scratch (the configs say
            # AQD.MISSING_WEIGHTS "scratch" for users who run them on their own)
            opts += ["MODEL.WEIGHTS", str(self.out / "float" / "model_final.pth"),
                     "AQD.MISSING_WEIGHTS", "raise"]
        return opts + list(a.opts)

    def _train_args(self, v: Variant, resume: bool = False):
        argv = ["--config-file", str(v.config)] + (["--resume"] if resume else []) + self._opts(v)
        return train_net.build_parser().parse_args(argv)

    def train_cfg(self, v: Variant):
        """The training config (validated, no side effects) and its fingerprint."""
        cfg = train_net.load_config(self._train_args(v))
        upstream = "" if v.bits == 32 else self.fps["float"]
        return cfg, _fingerprint(cfg.dump(), upstream)

    def eval_cfg(self, v: Variant):
        """The training config with the validation set as DATASETS.TEST (frozen)."""
        if v.key not in self._eval_cfgs:
            cfg, _ = self.train_cfg(v)
            cfg.DATASETS.TEST = (self.test_set,)
            cfg.MODEL.WEIGHTS = ""
            cfg.freeze()
            self._eval_cfgs[v.key] = cfg
        return self._eval_cfgs[v.key]

    @contextlib.contextmanager
    def _quiet(self):
        """stdout of detectron2's setup / evaluation printing to /dev/null unless --verbose."""
        if self.args.verbose:
            yield sys.stdout
            return
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            yield sink

    def _stage(self, name: str) -> Progress:
        self.stage_index += 1
        return Progress(self.stage_index, self.num_stages, name)

    # -- 1. training -------------------------------------------------------------------------
    def train(self, v: Variant) -> None:
        p = self._stage(("train " if v.bits == 32 else "fine-tune ") + v.label)
        cfg, fp = self.train_cfg(v)
        self.fps[v.key] = fp
        folder = self.out / v.key
        final = folder / "model_final.pth"
        record = folder / "train.json"
        if _read_record(record, fp) and final.is_file():
            self.stage_times[f"train {v.key}"] = 0.0
            p.say(f"reused {final} ({record.name}: same settings)")
            return
        if v.bits != 32 and not Path(cfg.MODEL.WEIGHTS).is_file():
            raise DemoError(f"{v.label}: the float checkpoint {cfg.MODEL.WEIGHTS} it starts from is missing "
                            "(the float stage did not finish)")
        old = _read_record(folder / "started.json", fp)
        if old is None and folder.exists():
            p.say(f"settings changed or no record: starting over in {folder}")
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(folder / "started.json", {"fingerprint": fp})
        last = folder / "last_checkpoint"
        resume = old is not None and last.is_file() and (folder / last.read_text().strip()).is_file()
        console = sys.stdout
        with self._quiet() as sink:
            cfg = train_net.setup(self._train_args(v, resume=resume))
            if sink is not console:
                _route_logs(sink, console, cfg.OUTPUT_DIR)
        trainer = train_net.Trainer(cfg)
        trainer.resume_or_load(resume=resume)
        if resume:
            p.say(f"resuming from iteration {trainer.start_iter} ({folder / 'last_checkpoint'})")
        trainer.register_hooks([_ProgressHook(p)])
        trainer.train()
        del trainer
        gc.collect()
        for f in folder.glob("model_0*.pth"):  # intermediate checkpoints: only for resuming
            f.unlink()
        (folder / "last_checkpoint").write_text("model_final.pth")
        _write_json(record, {"fingerprint": fp, "iterations": cfg.SOLVER.MAX_ITER})
        self.stage_times[f"train {v.key}"] = p.done(f"wrote {final}")

    def trained_model(self, v: Variant) -> torch.nn.Module:
        """The model as trained (quantized: fake-quant) with the stage's final weights, every
        key loaded (built once per run)."""
        if v.key not in self._trained:
            model = build_model(self.eval_cfg(v))
            ckpt = AQDCheckpointer(model)
            path = str(self.out / v.key / "model_final.pth")
            ckpt.load(path)
            inc = getattr(ckpt, "last_incompatible", None)
            if inc is not None and (inc.missing_keys or inc.incorrect_shapes):
                raise DemoError(f"{path} does not hold the whole {v.label} model: {inc.missing_keys[:3]}")
            self._trained[v.key] = model.eval()
        return self._trained[v.key]

    # -- 2. export / deploy ------------------------------------------------------------------
    def weights_file(self, v: Variant) -> Path:
        return self.out / v.key / ("model_weights.pth" if v.bits == 32 else "model.packed")

    def export(self, v: Variant) -> None:
        p = self._stage(f"export {v.label}")
        path, record = self.weights_file(v), self.out / v.key / "export.json"
        rec = _read_record(record, self.fps[v.key])
        if rec is None or not path.is_file():
            model = self.trained_model(v)
            if v.bits == 32:  # the float reference: torch.save of the model's state_dict
                _atomic_torch_save(model.state_dict(), path)
            else:
                save_packed(model, str(path))
            rec = {"fingerprint": self.fps[v.key], "bytes": path.stat().st_size}
            _write_json(record, rec)
            self.stage_times[f"export {v.key}"] = p.done(f"wrote {path} ({rec['bytes'] / 2**20:.2f} MB)")
        else:
            p.say(f"reused {path}")
        self.rows[v.key].update(file=str(path), bytes=rec["bytes"])

    def deployed_model(self, v: Variant):
        """``(inference model, DeployReport)``: float with BN folded; quantized loaded from the
        packed file, k-bit layers on the int8 kernels (``int8=True``). Built once per run."""
        if v.key not in self._deployed:
            if v.bits == 32:
                self._deployed[v.key] = convert_for_inference(self.trained_model(v), int8=True)
            else:
                self._deployed[v.key] = load_for_inference(
                    build_model(self.eval_cfg(v)).eval(), str(self.weights_file(v)), int8=True)
        return self._deployed[v.key]

    # -- 3. evaluation -----------------------------------------------------------------------
    def evaluate(self, v: Variant) -> None:
        p = self._stage(f"evaluate {v.label}")
        record = self.out / v.key / "eval.json"
        n = len(DatasetCatalog.get(self.test_set))
        cfg = self.eval_cfg(v)
        fp = _fingerprint(self.fps[v.key], self.test_set, cfg.dump())
        rec = _read_record(record, fp)
        if rec is None:
            rec = {"fingerprint": fp}
            forms = (("trained", lambda: (self.trained_model(v), None)), ("deployed", lambda: self.deployed_model(v)))
            for i, (form, make) in enumerate(forms):
                model, report = make()
                folder = str(self.out / v.key / f"eval_{form}")  # COCO detections json
                evaluator = DatasetEvaluators([build_evaluator(cfg, self.test_set, folder),
                                               _ProgressEvaluator(p, 2 * n, i * n)])
                with self._quiet():
                    res = train_net.Trainer.test(cfg, model, evaluators=[evaluator])
                rec[form] = {k: float(res["bbox"][k]) for k in ("AP", "AP50", "AP75")}
                if report is not None:
                    rec["deployed_layers"] = {k: report.count(k) for k in ("int8", "fake-quant weight frozen",
                                                                           "float (BN folded)")}
            _write_json(record, rec)
            self.stage_times[f"evaluate {v.key}"] = p.done(
                f"AP {rec['deployed']['AP']:.1f} / AP50 {rec['deployed']['AP50']:.1f} deployed "
                f"(as trained: {rec['trained']['AP']:.1f} / {rec['trained']['AP50']:.1f})")
        else:
            p.say(f"reused {record}")
        self.rows[v.key].update(eval=rec)

    # -- 4. latency and picture --------------------------------------------------------------
    def _inputs(self, records, cfg):
        aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        for rec in records:
            image = read_image(rec["file_name"], format=cfg.INPUT.FORMAT)
            resized = aug.get_transform(image).apply_image(image)
            tensor = torch.as_tensor(np.ascontiguousarray(resized.astype("float32").transpose(2, 0, 1)))
            yield rec, image, [{"image": tensor, "height": image.shape[0], "width": image.shape[1]}]

    def latency(self) -> None:
        p = self._stage("latency (deployed, interleaved)")
        repeats = self.schedule.latency_repeats
        record = self.out / "latency.json"
        fp = _fingerprint(*[self.fps[v.key] for v in VARIANTS], str(repeats), str(torch.get_num_threads()))
        rec = _read_record(record, fp)
        if rec is None:
            models = {v.key: self.deployed_model(v)[0] for v in VARIANTS}
            # the float reference runs in both memory formats; the faster one counts (PyTorch
            # picks its slow native conv for some small NCHW layers, oneDNN for channels_last)
            models[FLOAT_CL] = copy.deepcopy(models["float"]).to(memory_format=torch.channels_last)
            cfg = self.eval_cfg(VARIANTS[0])
            _, image, batch = next(self._inputs(DatasetCatalog.get(self.test_set)[:1], cfg))
            samples = interleaved(models, batch, repeats, lambda k: p.update(k, repeats, "round"))
            rec = {"fingerprint": fp, "threads": torch.get_num_threads(), "repeats": repeats,
                   "image": f"{batch[0]['image'].shape[2]}x{batch[0]['image'].shape[1]}",
                   "median_s": {k: statistics.median(t) for k, t in samples.items()}, "samples_s": samples}
            _write_json(record, rec)
            self.stage_times["latency"] = p.done(
                "median ms: " + ", ".join(f"{k} {t * 1e3:.1f}" for k, t in rec["median_s"].items()))
        else:
            p.say(f"reused {record}")
        self.latency_rec = rec
        med = rec["median_s"]
        for k, t in med.items():
            if k != FLOAT_CL:
                self.rows[k]["latency_s"] = t
        self.rows["float"]["latency_s"] = min(med["float"], med[FLOAT_CL])

    def picture(self) -> None:
        p = self._stage("draw detections")
        path = self.out / "detections.png"
        record = self.out / "detections.json"
        fp = _fingerprint(*[self.fps[v.key] for v in VARIANTS], str(self.args.num_images))
        if _read_record(record, fp) and path.is_file():
            p.say(f"reused {path}")
            self.picture_path = path
            return
        cfg = self.eval_cfg(VARIANTS[0])
        names = MetadataCatalog.get(self.test_set).thing_classes
        models = {v.key: self.deployed_model(v)[0] for v in VARIANTS}
        tiles = []
        for rec, image, batch in self._inputs(DatasetCatalog.get(self.test_set)[: self.args.num_images], cfg):
            rgb = np.ascontiguousarray(image[:, :, ::-1] if cfg.INPUT.FORMAT == "BGR" else image)
            anns = rec.get("annotations", [])
            gt = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]  # XYWH_ABS
            for v in VARIANTS:
                with torch.no_grad():
                    inst = models[v.key](batch)[0]["instances"].to("cpu")
                tile = draw_boxes(rgb, names, gt_boxes=gt, gt_classes=[a["category_id"] for a in anns],
                                  pred_boxes=inst.pred_boxes.tensor.numpy(), pred_classes=inst.pred_classes.numpy(),
                                  pred_scores=inst.scores.numpy())
                tiles.append(_titled(tile, f"{v.label}  (AP {self.rows[v.key]['eval']['deployed']['AP']:.1f})"))
        save_grid(tiles, str(path), columns=len(VARIANTS))
        _write_json(record, {"fingerprint": fp})
        self.picture_path = path
        self.stage_times["picture"] = p.done(f"wrote {path}")


def interleaved(models: Dict[str, torch.nn.Module], batch, repeats: int,
                on_round: Callable[[int], None], warmup: int = 2) -> Dict[str, List[float]]:
    """Seconds per call of each model on ``batch``, round-robin (one call of each per round,
    after ``warmup`` rounds), so that load from other processes hits all models alike."""
    times: Dict[str, List[float]] = {k: [] for k in models}
    with torch.no_grad():
        for r in range(warmup + repeats):
            for k, m in models.items():
                t = time.perf_counter()
                m(batch)
                if r >= warmup:
                    times[k].append(time.perf_counter() - t)
            if r >= warmup:
                on_round(r - warmup + 1)
    return times


def _titled(tile: np.ndarray, title: str, height: int = 16) -> np.ndarray:
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (tile.shape[1], height), (255, 255, 255))
    ImageDraw.Draw(strip).text((4, 2), title, fill=(0, 0, 0))
    return np.concatenate([np.asarray(strip), tile], axis=0)


# ---- the table ---------------------------------------------------------------------------------
def _close(a: float, b: float) -> bool:
    """Equal at the table's precision (0.1 AP); NaN (no detections at all) equals NaN."""
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) < 0.05


def _shown(path) -> str:
    """``path`` relative to the working directory when inside it, else absolute."""
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


def table(demo: Demo, wall: float) -> str:
    s, a = demo.schedule, demo.args
    float_row = demo.rows["float"]
    lines = []
    title = "QUICK RUN (--quick: short schedule, not the full demo's numbers)" if a.quick else "full run"
    lines.append(f"aqd_d2 demo, {title}: AQD RetinaNet-R18-FPN ({s.fpn_channels}-channel FPN and head), "
                 f"{demo.train_set} -> COCO eval on "
                 f"{demo.test_set}; float {s.float_iters} iterations from scratch, each quantized model "
                 f"{s.quant_iters} iterations from the float checkpoint")
    lines.append("")
    lines.append("| model | AP | AP50 | deployed vs as trained | weights file | MB | size vs float "
                 "| latency ms | speed vs float |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for v in VARIANTS:
        r = demo.rows[v.key]
        dep, tr = r["eval"]["deployed"], r["eval"]["trained"]
        same = all(_close(dep[k], tr[k]) for k in ("AP", "AP50"))
        diff = "same AP" if same else f"as trained: {tr['AP']:.1f} / {tr['AP50']:.1f}"
        if v.bits == 32:
            diff += " (BN folded)"
        ratio = float_row["bytes"] / r["bytes"]
        speed = float_row["latency_s"] / r["latency_s"]
        lines.append(
            f"| {v.label} | {dep['AP']:.1f} | {dep['AP50']:.1f} | {diff} | {_shown(r['file'])} "
            f"| {r['bytes'] / 2**20:.2f} | {'1.00x' if v.bits == 32 else f'{ratio:.2f}x smaller'} "
            f"| {r['latency_s'] * 1e3:.1f} | {speed:.2f}x |")
    lat = demo.latency_rec
    layers = {v.key: demo.rows[v.key]["eval"].get("deployed_layers") for v in VARIANTS if v.bits != 32}
    lines.append("")
    lines.append(f"AP / AP50: COCO bbox AP of the deployed model (float: BN folded; quantized: loaded from "
                 f"the packed file, int8 kernel path; layers {layers}). Size: the packed file against "
                 f"torch.save of the float model's state_dict. Latency: one {lat['image']} image, end to "
                 f"end (with post-processing), {lat['threads']} threads, median of {lat['repeats']} "
                 f"interleaved rounds in one process; float: the faster of NCHW "
                 f"({lat['median_s']['float'] * 1e3:.1f} ms) and channels_last "
                 f"({lat['median_s'][FLOAT_CL] * 1e3:.1f} ms).")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short schedule (a few minutes), labelled as such")
    p.add_argument("--out", default="output/demo", help="output folder (default output/demo)")
    p.add_argument("--num-images", type=int, default=4, help="images in the detections PNG")
    p.add_argument("--verbose", action="store_true", help="detectron2's logs on the console too")
    # knobs for tests and experiments (not in --help)
    p.add_argument("--iters", default="", help=argparse.SUPPRESS)        # "FLOAT,QUANT"
    p.add_argument("--lr", default="", help=argparse.SUPPRESS)           # "FLOAT,QUANT"
    p.add_argument("--dataset", default="aqd_shapes", help=argparse.SUPPRESS)  # family: _train / _val
    p.add_argument("--image-size", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--latency-repeats", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ... (every model)")
    args = p.parse_args(argv)
    s = QUICK if args.quick else FULL
    if args.iters:
        f, q = (int(x) for x in args.iters.split(","))
        s = replace(s, float_iters=f, quant_iters=q)
    if args.lr:
        f, q = (float(x) for x in args.lr.split(","))
        s = replace(s, float_lr=f, quant_lr=q)
    if args.latency_repeats:
        s = replace(s, latency_repeats=args.latency_repeats)
    return args, s


def main(argv=None) -> int:
    args, schedule = parse_args(argv)
    start = time.perf_counter()
    demo = Demo(args, schedule)
    print(f"aqd_d2 demo{' (QUICK)' if args.quick else ''}: float -> 4-bit / 2-bit -> packed -> deployed, "
          f"into {demo.out} ({torch.get_num_threads()} threads)", flush=True)
    try:
        for v in VARIANTS:
            demo.train(v)
            demo.export(v)
            demo.evaluate(v)
        demo.latency()
        demo.picture()
    except (DemoError, *train_net.USER_ERRORS) as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - start
    text = table(demo, wall)
    files = [f"  {v.label:<10} {demo.out / v.key}: model_final.pth (training checkpoint), "
             f"{demo.weights_file(v).name}, log.txt, metrics.json, eval_*/ (COCO results)" for v in VARIANTS]
    summary = "\n".join([
        "", text, "",
        f"wall time {_clock(wall)} (this invocation; stages reused from earlier runs take no time), "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f} at the end",
        "files:", *files,
        f"  detections {demo.picture_path} (columns: float / 4-bit / 2-bit; green ground truth, red predictions)",
        f"  table      {demo.out / 'summary.md'}",
    ])
    print(summary)
    (demo.out / "summary.md").write_text(summary.lstrip() + "\n")
    _write_json(demo.out / "summary.json", {"wall_s": wall, "quick": args.quick, "rows": demo.rows,
                                            "stage_s": demo.stage_times, "schedule": asdict(schedule)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
