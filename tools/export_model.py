#!/usr/bin/env python
"""Export a trained (fake-)quantized detector to a packed file: 1-bit weights as bits with
their per-channel scales, k-bit weights as k-bit codes with step/offset, batch norms as
their eval-mode affine map (bit-identical outputs; ``--keep-bn-state`` stores their own
state instead, for a file meant for fine-tuning), everything else (float layers, quantizer
state) as is (format: :mod:`aqd_d2.export.packing`, version 3 unless ``--format-version``).

    python tools/export_model.py --config-file configs/FasterRCNN/R18-FPN-shapes-cpu-binary-boxhead.yaml \
        --weights output/.../model_final.pth --output model.packed [KEY VALUE ...]

Load it for inference with real binary / int8 kernels (``tools/infer_packed.py``, or
``aqd_d2.export.deploy.load_for_inference(build_model(cfg), path)``). Without ``--weights``
the randomly initialised model is exported (for size checks only).
"""
from __future__ import annotations

import argparse
import io
import logging
import sys

import torch

import aqd_d2  # noqa: F401  isort:skip  (compat shims + registrations before detectron2)
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from aqd_d2.export import save_packed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--weights", default="", help="trained checkpoint of the config's model")
    p.add_argument("--output", required=True, help="packed file to write")
    p.add_argument("--keep-bn-state", action="store_true",
                   help="store batch norms' gamma/beta/mean/var instead of their eval-mode affine map")
    p.add_argument("--format-version", type=int, default=3, choices=[1, 2, 3],
                   help="packed file format (1: torch.save dict, 2: container, 3: container with "
                        "implicit offsets and affine batch norms)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = p.parse_args(argv)
    cfg = get_cfg()
    aqd_d2.add_aqd_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""] + list(args.opts))
    model = build_model(cfg)
    if args.weights:
        from aqd_d2.engine import AQDCheckpointer

        AQDCheckpointer(model).load(args.weights)
    else:
        logging.getLogger(__name__).warning("no --weights: exporting the randomly initialised model")
    model.eval()
    report = save_packed(model, args.output, version=args.format_version, bn_affine=not args.keep_bn_state)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    import os

    size = os.path.getsize(args.output)
    print(f"wrote {args.output}: {size / 2**20:.3f} MB; {len(report.layers)} packed layers; "
          f"state_dict at full precision {buf.tell() / 2**20:.3f} MB ({buf.tell() / size:.1f}x larger); "
          f"tensor payload {report.full_precision_bytes / 2**20:.3f} -> {report.packed_bytes / 2**20:.3f} MB "
          f"({report.ratio:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
