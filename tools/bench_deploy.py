#!/usr/bin/env python
"""Deployment benchmark: real binary / int8 inference vs float, and packed file sizes.

    python tools/bench_deploy.py [--shape 320x320 600x1000 ...] [--size N ...] [--repeats 7]
        [--threads 1] [--skip-e2e] [--skip-layers] [--skip-sizes] [--isa avx2] [--profile]
        [--proposals N] [--json out.json]

1. End to end, one thread: Faster R-CNN R18-FPN (configs/FasterRCNN/R18-FPN-shapes-cpu-*.yaml)
   on one H x W image per ``--shape`` (``--size N`` = NxN; default 320x320 and 600x1000, the
   input of BiDet's binary Faster R-CNN R18, paper 000 Tables 2-4), float vs binary (backbone +
   FPN + RPN binary) vs binary with the box head binarized too, with PASS/FAIL against issue
   7's targets (>= 1.8x and >= 2.5x over float). Each model is prepared with
   :func:`aqd_d2.export.deploy.convert_for_inference`: the float one gets its BN folded, and
   all three get the inference paths of the float ROI heads they share (fused multi-level
   ROIAlign, ``roi_pooler=True``; box-head FCs through oneDNN where measured faster,
   ``float_linear="auto"``), which make the float baseline faster, not slower; the float model
   on the old path (detectron2's ROIPooler + F.linear) is timed in the same rounds as a
   reference row. The models are timed interleaved in one
   process (median of ``--repeats`` rounds) so that load from other processes hits all alike.
   The models are randomly initialised with BN statistics calibrated on the benchmark image
   (:func:`calibrate_bn`); the binary kernels' timing does not depend on the weights, but the
   number of RPN proposals reaching the box head does (NMS); it is pinned to
   MODEL.RPN.POST_NMS_TOPK_TEST for every model by disabling the RPN's NMS (NMS_THRESH 1.0),
   and printed.
   Then each stage (backbone + FPN, RPN, ROI heads) is timed on its own, interleaved, which
   shows the Amdahl bound: the float ROI heads (ROIAlign, the 12544 -> 1024 -> 1024 box head
   on 1000 proposals, NMS) are common to the float and the binary detector, so the binary
   detector cannot be faster than float total / its ROI-head time. Next to each model's ROI
   heads, the same ROI heads on the old path (detectron2's ROIPooler + F.linear, from a second
   conversion with ``roi_pooler=False, float_linear=False``) are timed in the same rounds.
   ``--profile`` adds
   torch.profiler's top operators; ``--isa avx2`` forces the AVX2 kernel variant.
2. Per layer, one thread: the int8 path (:class:`~aqd_d2.export.deploy.Int8ConvInference`,
   including encoding its input; the fused C++ kernel or torch._int_mm, see
   ``AQD_INT8_KERNEL``) vs ``torch.nn.Conv2d`` in float32, the faster of NCHW and
   channels_last, 4-bit and 2-bit, on the conv shapes of RetinaNet/Faster R-CNN R18-FPN at a
   320 input.
3. Packed file size (``save_packed``, format version 3) vs the float checkpoint (``torch.save``
   of the float model's ``state_dict``): binary Faster R-CNN R18-FPN with binarized box head,
   4-bit and 2-bit AQD RetinaNet R18-FPN, binary SSD300-VGG16 (configs/SSD/VGG16-VOC-XNOR.yaml).
   Float references of the binary detectors: their own config with MODEL.QUANT.ENABLED False.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
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
from aqd_d2.export.int8_gemm import INT8_ISA_NAMES, int8_kernel_backend
from aqd_d2.quantization import build_quantizer

REPO = Path(__file__).resolve().parent.parent
FRCNN = {
    # the float reference is the same detector (the binary config's architecture, e.g. its
    # Bi-Real backbone) with the conversion pass off
    "float": "configs/FasterRCNN/R18-FPN-shapes-cpu-binary.yaml",
    "binary (backbone+FPN+RPN)": "configs/FasterRCNN/R18-FPN-shapes-cpu-binary.yaml",
    "binary + box head": "configs/FasterRCNN/R18-FPN-shapes-cpu-binary-boxhead.yaml",
}
FLOAT_OPTS = ["MODEL.QUANT.ENABLED", "False"]
RETINA = {
    "float": "configs/RetinaNet/R18-FPN-shapes-cpu-FP.yaml",
    "4-bit": "configs/RetinaNet/R18-FPN-shapes-cpu-4bit.yaml",
    "2-bit": "configs/RetinaNet/R18-FPN-shapes-cpu-2bit.yaml",
}
#: binary SSD300-VGG16 (paper 000's setting); its float reference is the same detector
#: (BN after every VGG conv, as the binary config has) with the conversion pass off
SSD_BINARY = "configs/SSD/VGG16-VOC-XNOR.yaml"
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


@torch.no_grad()
def calibrate_bn(model: torch.nn.Module, batch: list) -> torch.nn.Module:
    """Set every BN's running statistics to those of ``batch`` (one forward with the BN
    layers in training mode, cumulative average), then eval. A randomly initialised network
    without this can overflow: e.g. the float Bi-Real backbone (no ReLU, a shortcut around
    every conv) reaches 4e5 at P2, the RPN then keeps no box and the ROI heads do no work,
    which would time a different computation than a trained detector's."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    model(batch)
    return model.eval()


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


def stage_times(models: dict, batch: list, repeats: int, old_paths: dict = None) -> dict:
    """Median seconds of each stage of each GeneralizedRCNN, timed interleaved: ``backbone``
    (ResNet + FPN), ``rpn`` (proposal generator on those features), ``roi_heads`` (ROIAlign,
    box head, predictor, post-processing on those proposals), and ``roi_heads_old``: the ROI
    heads of ``old_paths[name]`` (same weights, old inference path) on the same inputs."""
    fns = {}
    with torch.no_grad():
        for name, m in models.items():
            images = m.preprocess_image(batch)
            feats = m.backbone(images.tensor)
            props, _ = m.proposal_generator(images, feats)
            fns[(name, "backbone")] = lambda m=m, t=images.tensor: m.backbone(t)
            fns[(name, "rpn")] = lambda m=m, i=images, f=feats: m.proposal_generator(i, f)
            fns[(name, "roi_heads")] = lambda m=m, i=images, f=feats, p=props: m.roi_heads(i, f, p)
            if old_paths:
                fns[(name, "roi_heads_old")] = (lambda m=old_paths[name], i=images, f=feats, p=props:
                                                m.roi_heads(i, f, p))
        return interleaved(fns, repeats, warmup=1)


def print_profile(models: dict, batch: list, rows: int = 12) -> None:
    """torch.profiler's top operators (self CPU time) of one call of each model."""
    for name, m in models.items():
        with torch.no_grad(), torch.profiler.profile() as prof:
            m(batch)
        print(f"\n-- profile: {name} (one call, self CPU time)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


#: issue 7's end-to-end targets over float: model name -> minimum speed-up
TARGETS = {"binary (backbone+FPN+RPN)": 1.8, "binary + box head": 2.5}
#: the float model on the old inference path (detectron2 ROIPooler + F.linear), timed as a reference
OLD_FLOAT = "float, old ROI path"
#: BiDet's binary Faster R-CNN R18 input (paper 000, Tables 2-4: "Faster R-CNN 600 x 1000")
PAPER_SHAPE = (600, 1000)


def parse_shape(text: str) -> tuple:
    """``"HxW"`` -> ``(H, W)``; ``"N"`` -> ``(N, N)``."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", text)
    if not m or int(m.group(1)) < 32 or (m.group(2) and int(m.group(2)) < 32):
        raise argparse.ArgumentTypeError(f"--shape takes HxW (e.g. 600x1000) or N, each >= 32; got {text!r}")
    h = int(m.group(1))
    return h, int(m.group(2) or h)


def bench_end_to_end(shape, repeats: int, stages: bool = True, profile: bool = False,
                     proposals: int = 0) -> dict:
    """End-to-end and per-stage times of the three Faster R-CNN models on one ``shape`` =
    ``(H, W)`` (an int: square) image; returns per-model rows (seconds, speed-up, ...)."""
    opts = ["MODEL.RPN.NMS_THRESH", "1.0"]  # pin the proposal count (see module docstring)
    if proposals:
        opts += ["MODEL.RPN.POST_NMS_TOPK_TEST", str(proposals)]
    h, w = (shape, shape) if isinstance(shape, int) else shape
    image = torch.rand(3, h, w, generator=torch.Generator().manual_seed(0)) * 255
    batch = [{"image": image, "height": h, "width": w}]
    models, old_paths, counts = {}, {}, {}
    for name, rel in FRCNN.items():
        extra = FLOAT_OPTS if name == "float" else []
        model = calibrate_bn(build(rel, opts + extra), batch)
        # the old path (detectron2 ROIPooler + F.linear), same weights, for the stage table
        # fold_bn: every model's float convs get their BN folded (the fastest float path; the
        # default keeps it a module so the deployed model equals the trained one bit for bit)
        old_paths[name], _ = convert_for_inference(model, fold_bn=True, roi_pooler=False, float_linear=False)
        model, report = convert_for_inference(model, inplace=True, fold_bn=True, roi_pooler=True,
                                              float_linear="auto", example_inputs=batch)
        models[name] = model
        onednn = [r[0] for r in report.rows if r[1] == "float (oneDNN)"]
        print(f"{name}: {report.count('binary')} binary layers, "
              f"{report.count('fake-quant weight frozen')} frozen fake-quant, "
              f"{report.count('fused ROIAlign')} fused ROI pooler(s), float linear via oneDNN: "
              f"{', '.join(onednn) or 'none'}")
        with torch.no_grad():
            images = model.preprocess_image(batch)
            props, _ = model.proposal_generator(images, model.backbone(images.tensor))
        counts[name] = len(props[0])
    fns = {k: (lambda m=m: m(batch)) for k, m in models.items()}
    fns[OLD_FLOAT] = lambda m=old_paths["float"]: m(batch)  # reference: the float model before this change
    counts[OLD_FLOAT] = counts["float"]
    with torch.no_grad():
        t = interleaved(fns, repeats, warmup=2)
    base = t["float"]
    rows = {k: {"seconds": v, "speedup": base / v, "proposals": counts[k]} for k, v in t.items()}
    for k in TARGETS:
        rows[k]["speedup_vs_old_float"] = t[OLD_FLOAT] / t[k]
    paper = (h, w) == PAPER_SHAPE
    print(f"\n== end to end, Faster R-CNN R18-FPN, {h}x{w}"
          f"{' (the paper input: BiDet Faster R-CNN R18, paper 000 Tables 2-4)' if paper else ''}, "
          f"{torch.get_num_threads()} thread(s), binary kernel {kernel_backend()}, median of {repeats}")
    for k, r in rows.items():
        target = TARGETS.get(k)
        verdict = ""
        if target is not None:
            r["target"], r["pass"] = target, r["speedup"] >= target
            verdict = f"   target >= {target:.1f}x: {'PASS' if r['pass'] else 'FAIL'}"
        if k in TARGETS:
            verdict += f"   (vs {OLD_FLOAT}: {r['speedup_vs_old_float']:.2f}x)"
        print(f"  {k:28s} {r['seconds'] * 1e3:9.1f} ms   speedup {r['speedup']:5.2f}x   "
              f"({r['proposals']} proposals){verdict}")
    if stages:
        st = stage_times(models, batch, repeats, old_paths)
        print("  stages (ms, median, timed interleaved):      backbone+FPN        RPN  ROI heads"
              "  (old path: d2 ROIPooler + F.linear)")
        for k in models:
            b, r, rh, old = (st[(k, s)] * 1e3 for s in ("backbone", "rpn", "roi_heads", "roi_heads_old"))
            rows[k]["stages_ms"] = {"backbone": b, "rpn": r, "roi_heads": rh}
            rows[k]["roi_heads_old_path_ms"] = old
            print(f"  {k:42s} {b:12.1f} {r:10.1f} {rh:10.1f}  ({old:.1f}, {old / max(rh, 1e-9):.2f}x)")
        fl = rows["float"]["stages_ms"]
        for k in models:
            if k == "float":
                continue
            # Amdahl: the ROI heads (ROIAlign, box head, NMS) bound the end-to-end speed-up
            bound = sum(fl.values()) / max(rows[k]["stages_ms"]["roi_heads"], 1e-9)
            rows[k]["bound_if_backbone_rpn_free"] = bound
            print(f"  {k}: stage sum speed-up {sum(fl.values()) / sum(rows[k]['stages_ms'].values()):.2f}x; "
                  f"even with backbone+FPN+RPN at 0 ms it could not exceed {bound:.2f}x "
                  f"(its ROI heads take {rows[k]['stages_ms']['roi_heads']:.0f} ms)")
    if profile:
        print_profile(models, batch)
    return rows


def bench_layers(repeats: int) -> list:
    """Per conv shape of :data:`LAYERS`: Int8ConvInference (4-bit and 2-bit, input encoding
    included, NCHW float input) vs the float32 conv, whose time is the faster of an NCHW and a
    channels_last run (weight and input in that memory format), as issue 7 defines the
    baseline. The int8 kernel used (C++ variant or torch._int_mm) is printed."""
    if not int8_gemm_available():
        print("torch._int_mm unavailable: int8 layers fall back to float; skipped")
        return []
    backend, isa = int8_kernel_backend()
    kernel = f"C++ kernel, {INT8_ISA_NAMES[isa]}" if backend == "cpp" else "torch._int_mm"
    print(f"\n== per layer, int8 path ({kernel}) vs float32 conv (min of NCHW and channels_last), "
          f"{torch.get_num_threads()} thread(s), median of {repeats}")
    out = []
    g = torch.Generator().manual_seed(0)
    for c, o, hw, k, s in LAYERS:
        x = torch.randn(1, c, hw, hw, generator=g).relu()
        conv = torch.nn.Conv2d(c, o, k, stride=s, padding=k // 2).eval()
        x_cl = x.contiguous(memory_format=torch.channels_last)
        conv_cl = copy.deepcopy(conv).to(memory_format=torch.channels_last)
        fns = {"float": lambda: conv(x), "float_cl": lambda: conv_cl(x_cl)}
        for bits in (4, 2):
            wq = build_quantizer("lsq", bits, "weight").eval()
            aq = build_quantizer("lsq", bits, "activation").eval()
            codes, step, offset = wq.encode(conv.weight)
            mod = Int8ConvInference(codes, step, offset, bits, aq, conv.bias, (s, s), (k // 2,) * 2, (1, 1))
            fns[f"{bits}bit"] = lambda m=mod: m(x)
        with torch.no_grad():
            t = interleaved(fns, repeats, inner=5, warmup=5)
        t_float = min(t["float"], t["float_cl"])
        row = {"layer": f"{c}->{o} {k}x{k}/s{s} @{hw}x{hw}", "float_ms": t_float * 1e3,
               "float_nchw_ms": t["float"] * 1e3, "float_channels_last_ms": t["float_cl"] * 1e3,
               "int8_4bit_ms": t["4bit"] * 1e3, "int8_2bit_ms": t["2bit"] * 1e3,
               "ratio_4bit": t_float / t["4bit"], "ratio_2bit": t_float / t["2bit"]}
        out.append(row)
        print(f"  {row['layer']:28s} float {row['float_ms']:7.2f} ms (NCHW {row['float_nchw_ms']:6.2f}, "
              f"CL {row['float_channels_last_ms']:6.2f}) | 4-bit {row['int8_4bit_ms']:6.2f} ms "
              f"({row['ratio_4bit']:4.2f}x) | 2-bit {row['int8_2bit_ms']:6.2f} ms ({row['ratio_2bit']:4.2f}x)")
    ratios = [r[f"ratio_{b}bit"] for r in out for b in (4, 2)]
    print(f"  {sum(x >= 1.6 for x in ratios)} of {len(ratios)} layer/bit-width pairs reach 1.6x; "
          f"{sum(x < 1.0 for x in ratios)} are slower than float (convert_for_inference(int8='auto') "
          f"measures each layer and deploys those as float)")
    return out


def bench_sizes() -> list:
    print("\n== packed file vs float checkpoint (torch.save of the float model's state_dict)")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for family, float_rel, q_names in (("Faster R-CNN R18-FPN", FRCNN["float"], ["binary + box head", "binary (backbone+FPN+RPN)"]),
                                           ("RetinaNet R18-FPN (AQD)", RETINA["float"], ["4-bit", "2-bit", *SIZE_VARIANTS])):
            fpath = os.path.join(d, "float.pth")
            torch.save(build(float_rel, FLOAT_OPTS if float_rel == FRCNN["float"] else []).state_dict(), fpath)
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
        if (REPO / SSD_BINARY).is_file():
            fpath = os.path.join(d, "float.pth")
            torch.save(build(SSD_BINARY, FLOAT_OPTS).state_dict(), fpath)
            fbytes = os.path.getsize(fpath)
            ppath = os.path.join(d, "packed.pth")
            save_packed(build(SSD_BINARY), ppath)
            pbytes = os.path.getsize(ppath)
            rows.append({"model": "SSD300-VGG16 binary (XNOR)", "float_bytes": fbytes,
                         "packed_bytes": pbytes, "ratio": fbytes / pbytes})
            print(f"  {'SSD300-VGG16 binary (XNOR)':48s} float {fbytes / 2**20:7.2f} MB  packed "
                  f"{pbytes / 2**20:6.2f} MB  {fbytes / pbytes:5.1f}x smaller")
        else:
            print(f"  binary SSD300-VGG16: {SSD_BINARY} not found: skipped")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=parse_shape, nargs="+", default=None,
                   help="end-to-end input shape(s) HxW (default: 320x320 600x1000; 600x1000 is the "
                        "paper's Faster R-CNN input)")
    p.add_argument("--size", type=int, nargs="+", default=None, help="square end-to-end input size(s): N = NxN")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--skip-layers", action="store_true")
    p.add_argument("--skip-sizes", action="store_true")
    p.add_argument("--isa", default="", choices=["", "generic", "popcnt", "avx2", "avx512"],
                   help="force a binary kernel variant (default: the best this CPU runs)")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top operators per model")
    p.add_argument("--proposals", type=int, default=0,
                   help="RPN proposals per image at test time (0: the configs' POST_NMS_TOPK_TEST, 1000)")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    if args.isa:
        os.environ["AQD_BINARY_ISA"] = args.isa
    torch.set_num_threads(args.threads)
    result = {"torch": torch.__version__, "threads": args.threads, "binary_kernel": kernel_backend()}
    if not args.skip_e2e:
        shapes = list(args.shape or []) + [(s, s) for s in args.size or []]
        shapes = shapes or [(320, 320), PAPER_SHAPE]
        result["end_to_end"] = {f"{h}x{w}": bench_end_to_end((h, w), args.repeats, profile=args.profile,
                                                             proposals=args.proposals) for h, w in shapes}
        print("\n== issue 7 targets (binary / float, end to end, 1 thread unless --threads)")
        for key, rows in result["end_to_end"].items():
            verdicts = ", ".join(f"{k} {r['speedup']:.2f}x (>= {r['target']:.1f}x: {'PASS' if r['pass'] else 'FAIL'})"
                                 for k, r in rows.items() if "target" in r)
            paper = " [paper input]" if key == "x".join(map(str, PAPER_SHAPE)) else ""
            print(f"  {key}{paper}: {verdicts}")
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
