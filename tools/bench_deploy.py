#!/usr/bin/env python
"""Deployment benchmark: real binary / int8 inference vs float, and packed file sizes.

    python tools/bench_deploy.py [--size 320 [640 ...]] [--repeats 7] [--threads 1] [--skip-e2e]
        [--skip-layers] [--skip-sizes] [--json out.json]

1. End to end, one thread: Faster R-CNN R18-FPN (configs/FasterRCNN/R18-FPN-shapes-cpu-*.yaml)
   on one ``--size`` x ``--size`` image, float vs binary (backbone + FPN + RPN binary) vs binary
   with the box head binarized too. Each model is prepared with
   :func:`aqd_d2.export.deploy.convert_for_inference` (the float one only gets its BN folded,
   which makes the float baseline faster, not slower). The models are timed interleaved in one
   process (median of ``--repeats`` rounds) so that load from other processes hits all alike.
   The models are randomly initialised (timing does not depend on the weights), but the
   number of RPN proposals reaching the box head does (NMS); it is pinned to
   MODEL.RPN.POST_NMS_TOPK_TEST for every model by disabling the RPN's NMS (NMS_THRESH 1.0),
   and printed.
2. Per layer, one thread: the int8 GEMM path (:class:`~aqd_d2.export.deploy.Int8ConvInference`,
   including encoding its input) vs ``torch.nn.Conv2d`` in float32, 4-bit and 2-bit, on the conv
   shapes of RetinaNet/Faster R-CNN R18-FPN at a 320 input.
3. Packed file size (``save_packed``) vs the float checkpoint (``torch.save`` of the float
   model's ``state_dict``): binary Faster R-CNN R18-FPN with binarized box head, 4-bit and
   2-bit AQD RetinaNet R18-FPN. (Binary SSD300-VGG16 is not in aqd_d2 yet: skipped.)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import aqd_d2  # noqa: F401  isort:skip  (compat shims + registrations before detectron2)
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from aqd_d2.export import save_packed
from aqd_d2.export.binary_conv import kernel_backend
from aqd_d2.export.deploy import Int8ConvInference, convert_for_inference, int8_gemm_available
from aqd_d2.quantization import build_quantizer

REPO = Path(__file__).resolve().parent.parent
FRCNN = {
    "float": "configs/FasterRCNN/R18-FPN-shapes-cpu-FP.yaml",
    "binary (backbone+FPN+RPN)": "configs/FasterRCNN/R18-FPN-shapes-cpu-binary.yaml",
    "binary + box head": "configs/FasterRCNN/R18-FPN-shapes-cpu-binary-boxhead.yaml",
}
RETINA = {
    "float": "configs/RetinaNet/R18-FPN-shapes-cpu-FP.yaml",
    "4-bit": "configs/RetinaNet/R18-FPN-shapes-cpu-4bit.yaml",
    "2-bit": "configs/RetinaNet/R18-FPN-shapes-cpu-2bit.yaml",
}
#: extra size rows: (name, config, opts)
SIZE_VARIANTS = {
    "2-bit, first/last layers 8-bit": (RETINA["2-bit"], ["MODEL.QUANT.FIRST_LAST_BITS", "8"]),
}
LAYERS = [  # (C_in, C_out, H=W, k, stride): R18-FPN at a 320 input
    (64, 64, 80, 3, 1), (128, 128, 40, 3, 1), (256, 256, 20, 3, 1), (512, 512, 10, 3, 1),
    (128, 256, 40, 3, 2), (256, 256, 80, 3, 1), (256, 256, 40, 3, 1), (512, 256, 10, 1, 1),
]


def build(rel: str, opts=()) -> torch.nn.Module:
    cfg = get_cfg()
    aqd_d2.add_aqd_config(cfg)
    cfg.merge_from_file(str(REPO / rel))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""] + list(opts))
    torch.manual_seed(0)
    return build_model(cfg).eval()


def interleaved(fns: dict, repeats: int, inner: int = 1, warmup: int = 2) -> dict:
    """Median seconds per call of each function, timed round-robin (each sample: the mean of
    ``inner`` calls) after ``warmup`` calls of each (first calls set up kernels and caches)."""
    times = {k: [] for k in fns}
    for _ in range(warmup):
        for f in fns.values():
            f()
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            for _ in range(inner):
                f()
            times[k].append((time.perf_counter() - t) / inner)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_end_to_end(size: int, repeats: int) -> dict:
    opts = ["MODEL.RPN.NMS_THRESH", "1.0"]  # pin the proposal count (see module docstring)
    image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(0)) * 255
    batch = [{"image": image, "height": size, "width": size}]
    models, counts = {}, {}
    for name, rel in FRCNN.items():
        model, report = convert_for_inference(build(rel, opts), inplace=True)
        models[name] = model
        if name != "float":
            print(f"{name}: {report.count('binary')} binary layers, "
                  f"{report.count('fake-quant weight frozen')} frozen fake-quant")
        with torch.no_grad():
            images = model.preprocess_image(batch)
            props, _ = model.proposal_generator(images, model.backbone(images.tensor))
        counts[name] = len(props[0])
    fns = {k: (lambda m=m: m(batch)) for k, m in models.items()}
    with torch.no_grad():
        t = interleaved(fns, repeats, warmup=2)
    base = t["float"]
    rows = {k: {"seconds": v, "speedup": base / v, "proposals": counts[k]} for k, v in t.items()}
    print(f"\n== end to end, Faster R-CNN R18-FPN, {size}x{size}, {torch.get_num_threads()} thread(s), "
          f"binary kernel {kernel_backend()}, median of {repeats}")
    for k, r in rows.items():
        print(f"  {k:28s} {r['seconds'] * 1e3:9.1f} ms   speedup {r['speedup']:5.2f}x   "
              f"({r['proposals']} proposals)")
    return rows


def bench_layers(repeats: int) -> list:
    if not int8_gemm_available():
        print("torch._int_mm unavailable: int8 layers fall back to float; skipped")
        return []
    print(f"\n== per layer, int8 GEMM (torch._int_mm) vs float32 conv, {torch.get_num_threads()} thread(s), "
          f"median of {repeats}")
    out = []
    g = torch.Generator().manual_seed(0)
    for c, o, hw, k, s in LAYERS:
        x = torch.randn(1, c, hw, hw, generator=g).relu()
        conv = torch.nn.Conv2d(c, o, k, stride=s, padding=k // 2).eval()
        fns = {"float": lambda: conv(x)}
        for bits in (4, 2):
            wq = build_quantizer("lsq", bits, "weight").eval()
            aq = build_quantizer("lsq", bits, "activation").eval()
            codes, step, offset = wq.encode(conv.weight)
            mod = Int8ConvInference(codes, step, offset, bits, aq, conv.bias, (s, s), (k // 2,) * 2, (1, 1))
            fns[f"{bits}bit"] = lambda m=mod: m(x)
        with torch.no_grad():
            t = interleaved(fns, repeats, inner=5, warmup=5)
        row = {"layer": f"{c}->{o} {k}x{k}/s{s} @{hw}x{hw}", "float_ms": t["float"] * 1e3,
               "int8_4bit_ms": t["4bit"] * 1e3, "int8_2bit_ms": t["2bit"] * 1e3,
               "ratio_4bit": t["float"] / t["4bit"], "ratio_2bit": t["float"] / t["2bit"]}
        out.append(row)
        print(f"  {row['layer']:28s} float {row['float_ms']:7.2f} ms | 4-bit {row['int8_4bit_ms']:6.2f} ms "
              f"({row['ratio_4bit']:4.2f}x) | 2-bit {row['int8_2bit_ms']:6.2f} ms ({row['ratio_2bit']:4.2f}x)")
    return out


def bench_sizes() -> list:
    print("\n== packed file vs float checkpoint (torch.save of the float model's state_dict)")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for family, float_rel, q_names in (("Faster R-CNN R18-FPN", FRCNN["float"], ["binary + box head", "binary (backbone+FPN+RPN)"]),
                                           ("RetinaNet R18-FPN (AQD)", RETINA["float"], ["4-bit", "2-bit", *SIZE_VARIANTS])):
            fpath = os.path.join(d, "float.pth")
            torch.save(build(float_rel).state_dict(), fpath)
            fbytes = os.path.getsize(fpath)
            table = FRCNN if family.startswith("Faster") else RETINA
            for q in q_names:
                ppath = os.path.join(d, "packed.pth")
                rel, opts = (table[q], []) if q in table else SIZE_VARIANTS[q]
                save_packed(build(rel, opts), ppath)
                pbytes = os.path.getsize(ppath)
                rows.append({"model": f"{family} {q}", "float_bytes": fbytes, "packed_bytes": pbytes,
                             "ratio": fbytes / pbytes})
                print(f"  {family + ' ' + q:48s} float {fbytes / 2**20:7.2f} MB  packed {pbytes / 2**20:6.2f} MB"
                      f"  {fbytes / pbytes:5.1f}x smaller")
    print("  binary SSD300-VGG16: not in aqd_d2 (no SSD meta-architecture yet): skipped")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, nargs="+", default=[320], help="end-to-end input size(s)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--skip-layers", action="store_true")
    p.add_argument("--skip-sizes", action="store_true")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"torch": torch.__version__, "threads": args.threads, "binary_kernel": kernel_backend()}
    if not args.skip_e2e:
        result["end_to_end"] = {str(s): bench_end_to_end(s, args.repeats) for s in args.size}
    if not args.skip_layers:
        result["int8_layers"] = bench_layers(args.repeats)
    if not args.skip_sizes:
        result["sizes"] = bench_sizes()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
