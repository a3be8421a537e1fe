#!/usr/bin/env python
"""Quantization-aware training cost of the paper detectors, float vs quantized, one process.

For each model of issue 15's table the float config and its quantized twin are built with
detectron2's stock ``DefaultTrainer.build_model`` (so what is measured is what a user of the
yaml gets), then, one model at a time in this process:

* training: SGD steps (forward + loss + backward + update, momentum 0.9, lr 1e-4) on a batch
  of random uint8 images with random boxes (1-8 per image, random classes); the quantizers
  are initialised by one step first, then ``--warmup`` steps, then ``--steps`` timed steps
  (wall time; CUDA synchronised around each step); median ms/step reported;
* peak memory (CUDA): ``max_memory_allocated`` during the timed steps, minus what was
  allocated before them (parameters, optimizer state);
* CUDA kernel launches per step: device-side events (kernels, memcpy, memset) recorded by
  ``torch.profiler`` over one step;
* inference latency at batch 1 (eval mode, no_grad, one image): median of ``--infer-iters``.

The quantized model runs with the fused kernels (``MODEL.QUANT.FUSED_KERNELS auto``, Triton
on CUDA) and, with ``--eager-too``, also with ``off`` (the eager kernels) for comparison.
``--amp bf16|fp16`` runs the steps under ``torch.autocast`` (the quantizers' rounding grid
stays float32), ``--channels-last`` converts models and inputs to channels_last.

Usage::

    python tools/bench_qat.py --device cuda --out bench_qat.json
    python tools/bench_qat.py --device cpu --batch 2 --size 256 --warmup 1 --steps 2 \
        --models retinanet_r18_4bit

Results are printed as a table and written (after every model) to ``--out`` as JSON.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]

#: name -> (float config, quantized config), issue 15's table
MODELS = {
    "retinanet_r18_4bit": ("configs/RetinaNet/R18-FPN-COCO-FP.yaml", "configs/RetinaNet/R18-FPN-COCO-4bit.yaml"),
    "retinanet_r18_2bit": ("configs/RetinaNet/R18-FPN-COCO-FP.yaml", "configs/RetinaNet/R18-FPN-COCO-2bit.yaml"),
    "fcos_r18_2bit": ("configs/FCOS/R18-FPN-COCO-FP.yaml", "configs/FCOS/R18-FPN-COCO-2bit.yaml"),
    "retinanet_r50_4bit": ("configs/RetinaNet/R50-FPN-COCO-FP.yaml", "configs/RetinaNet/R50-FPN-COCO-4bit.yaml"),
    "frcnn_r18_bireal": ("configs/FasterRCNN/R18-FPN-VOC-FP.yaml", "configs/FasterRCNN/R18-FPN-VOC-BiReal.yaml"),
}


def build(config: str, device: str, fused: str, extra: List[str]):
    import aqd_d2  # first: applies the compatibility shims detectron2 0.6 needs

    from detectron2.config import get_cfg
    from detectron2.engine import DefaultTrainer

    cfg = aqd_d2.add_aqd_config(get_cfg())
    cfg.merge_from_file(str(ROOT / config))
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", device,
                         "MODEL.QUANT.FUSED_KERNELS", fused] + extra)
    model = DefaultTrainer.build_model(cfg)
    return cfg, model


def num_classes(model) -> int:
    """Foreground classes of a built detectron2 detector (R-CNN box head or dense head)."""
    if hasattr(model, "roi_heads"):
        return int(model.roi_heads.num_classes)
    return int(model.num_classes)


def make_batch(n: int, size: int, classes: int, device: str, seed: int = 0):
    import aqd_d2  # noqa: F401
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(n):
        img = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
        k = int(torch.randint(1, 9, (1,), generator=g))
        xy = torch.rand(k, 2, generator=g) * (size * 0.7)
        wh = torch.rand(k, 2, generator=g) * (size * 0.5) + 8
        boxes = torch.cat([xy, (xy + wh).clamp(max=size - 1)], dim=1)
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(boxes.to(device))
        inst.gt_classes = torch.randint(0, classes, (k,), generator=g).to(device)
        batch.append({"image": img.to(device), "instances": inst, "height": size, "width": size})
    return batch


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def autocast(device: str, amp: Optional[str]):
    if not amp:
        return torch.autocast(device, enabled=False)
    return torch.autocast(device, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def measure(model, batch, device, args) -> Dict[str, Optional[float]]:
    model.train()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    scaler = torch.amp.GradScaler(device, enabled=args.amp == "fp16")

    def step():
        with autocast(device, args.amp):
            losses = model(batch)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    step()  # initialises the quantizers' ranges (first batch)
    for _ in range(args.warmup):
        step()
    sync(device)
    base = 0
    if device == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append((time.perf_counter() - t0) * 1000)
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20 if device == "cuda" else None
    launches = None
    if device == "cuda" and args.profile:
        from torch.profiler import ProfilerActivity, profile

        try:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                step()
                sync(device)
            launches = sum(1 for e in prof.events() if e.device_type.name == "CUDA")
        except Exception as e:  # e.g. CUPTI unavailable: keep the other numbers
            print(f"  profiler failed: {type(e).__name__}: {e}", flush=True)
    # inference, batch 1
    model.eval()
    one = [{k: v for k, v in batch[0].items() if k != "instances"}]
    lat = []
    with torch.no_grad():
        for i in range(args.infer_iters + 3):
            sync(device)
            t0 = time.perf_counter()
            with autocast(device, args.amp):
                model(one)
            sync(device)
            if i >= 3:
                lat.append((time.perf_counter() - t0) * 1000)
    del opt
    return {"ms_step": statistics.median(times), "ms_step_min": min(times), "peak_mib": peak,
            "launches": launches, "infer_ms": statistics.median(lat)}


def run_model(name: str, args) -> Dict:
    fcfg, qcfg = MODELS[name]
    out = {"model": name, "float_config": fcfg, "quant_config": qcfg}
    variants = [("float", fcfg, "auto"), ("quant", qcfg, "auto")]
    if args.eager_too:
        variants.append(("quant_eager", qcfg, "off"))
    batch = None
    for label, config, fused in variants:
        torch.manual_seed(0)
        cfg, model = build(config, args.device, fused, args.opts)
        if batch is None:
            batch = make_batch(args.batch, args.size, num_classes(model), args.device)
        if args.channels_last:
            for b in batch:
                b["image"] = b["image"].contiguous(memory_format=torch.channels_last) if b["image"].dim() == 4 else b["image"]
        t0 = time.perf_counter()
        from detectron2.utils.events import EventStorage

        with EventStorage(0):  # detectron2's losses log scalars into the event storage
            out[label] = measure(model, batch, args.device, args)
        out[label]["seconds"] = round(time.perf_counter() - t0, 1)
        del model
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
        print(f"  {name} {label}: {out[label]}", flush=True)
    f, q = out["float"], out["quant"]
    for k in ("ms_step", "peak_mib", "launches", "infer_ms"):
        if f.get(k) and q.get(k) is not None:
            out[f"ratio_{k}"] = q[k] / f[k]
    if "quant_eager" in out and f.get("ms_step"):
        out["ratio_ms_step_eager"] = out["quant_eager"]["ms_step"] / f["ms_step"]
    return out


def fmt(v, spec=".0f") -> str:
    return "-" if v is None else format(v, spec)


def table(rows: List[Dict]) -> str:
    head = ("| model | float ms/step | quant ms/step | ratio | eager-quant ratio | launches f/q (x) "
            "| peak MiB f/q (x) | infer b1 ms f/q (x) |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        f, q = r["float"], r["quant"]
        e = r.get("ratio_ms_step_eager")
        lines.append(
            f"| {r['model']} | {fmt(f['ms_step'], '.1f')} | {fmt(q['ms_step'], '.1f')} | "
            f"{fmt(r.get('ratio_ms_step'), '.2f')}x | {fmt(e, '.2f') + 'x' if e else '-'} | "
            f"{fmt(f['launches'])}/{fmt(q['launches'])} ({fmt(r.get('ratio_launches'), '.2f')}) | "
            f"{fmt(f['peak_mib'])}/{fmt(q['peak_mib'])} ({fmt(r.get('ratio_peak_mib'), '.2f')}) | "
            f"{fmt(f['infer_ms'], '.1f')}/{fmt(q['infer_ms'], '.1f')} ({fmt(r.get('ratio_infer_ms'), '.2f')}) |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=640)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--infer-iters", type=int, default=10)
    p.add_argument("--amp", choices=("bf16", "fp16"), default=None)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--eager-too", action="store_true", help="also time the quantized model with FUSED_KERNELS off")
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument("--budget-s", type=float, default=0.0, help="stop starting new models after this many seconds (0: no limit)")
    p.add_argument("--out", default="")
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch default)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="extra KEY VALUE config overrides")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if args.device == 'cuda' else ''}, "
          f"batch {args.batch} x {args.size}^2, warmup {args.warmup}, steps {args.steps}, "
          f"amp {args.amp}, channels_last {args.channels_last}", flush=True)
    rows = []
    t_start = time.perf_counter()
    for name in args.models:
        if args.budget_s and time.perf_counter() - t_start > args.budget_s:
            print(f"budget spent: skipping {name}", flush=True)
            continue
        rows.append(run_model(name, args))
        if args.out:
            Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
