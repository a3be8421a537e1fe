#!/usr/bin/env python
"""Train and evaluate aqd_d2 detectors with detectron2's trainer.

Usage (the detectron2 conventions):
    python train_net.py --config-file configs/RetinaNet/R18-FPN-shapes-cpu.yaml
    python train_net.py --config-file configs/RetinaNet/R18-FPN-COCO.yaml --num-gpus 8
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
    python train_net.py --config-file ... --resume                 # continue the last run
    python train_net.py --config-file ... --num-cpu-procs 2        # CPU processes (gloo)
Trailing KEY VALUE pairs override the config.
"""
import logging
import os

# aqd_d2 first: it makes detectron2 v0.6 importable on current NumPy / Pillow (aqd_d2.compat)
# and registers the plugin's builders and datasets.
import aqd_d2  # noqa: F401  isort:skip
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from aqd_d2.config import ConfigError, add_aqd_config, validate_aqd_config
from aqd_d2.engine import AQDCheckpointer, Trainer, launch

logger = logging.getLogger("aqd_d2")


def setup(args):
    """Config from ``--config-file`` and the trailing overrides, validated and frozen."""
    if not args.config_file:
        raise ConfigError("--config-file is required (e.g. configs/RetinaNet/R18-FPN-shapes-cpu.yaml)")
    if not os.path.isfile(args.config_file):
        raise ConfigError(f"config file {args.config_file!r} does not exist")
    cfg = get_cfg()
    add_aqd_config(cfg)
    # yacs reports unknown keys as KeyError (file) / AssertionError (command line) and type
    # mismatches as ValueError; all of them name the key. Re-raise with where it came from.
    try:
        cfg.merge_from_file(args.config_file)
    except (KeyError, AssertionError, ValueError) as e:
        raise ConfigError(f"{args.config_file}: {e.args[0] if e.args else e}") from None
    try:
        cfg.merge_from_list(args.opts)
    except (KeyError, AssertionError, ValueError) as e:
        raise ConfigError(f"command-line override: {e.args[0] if e.args else e}") from None
    validate_aqd_config(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    # detectron2's default_setup logs only the "detectron2" and "fvcore" loggers; aqd_d2's own
    # messages (conversion report, pruning, stage switches, skipped steps) go to log.txt too.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="aqd_d2", abbrev_name="aqd")
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        AQDCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def build_parser():
    parser = default_argument_parser()
    parser.add_argument(
        "--num-cpu-procs", type=int, default=0,
        help="number of CPU training processes on this machine (gloo); used when --num-gpus 0",
    )
    return parser


if __name__ == "__main__":
    args = build_parser().parse_args()
    if args.num_gpus == 1 and args.num_cpu_procs > 0:
        args.num_gpus = 0  # detectron2's parser defaults --num-gpus to 1
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        num_cpu_processes=args.num_cpu_procs,
    )
