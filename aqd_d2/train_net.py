"""Train and evaluate aqd_d2 detectors with detectron2's trainer: the ``train_net.py`` of this
repository and the installed ``aqd-train`` command (same flags), usable from any directory.

    aqd-train --config-file configs/RetinaNet/R18-FPN-shapes-cpu.yaml
    aqd-train --config-file cfg.yaml --num-gpus 8                       # detectron2's launch
    aqd-train --config-file cfg.yaml --num-cpu-procs 2                  # CPU processes (gloo)
    aqd-train --config-file cfg.yaml --resume                           # continue the last run
    aqd-train --config-file cfg.yaml --eval-only MODEL.WEIGHTS out/model_final.pth
    aqd-train --config-file cfg.yaml --coco my_train ann.json images/ DATASETS.TRAIN "('my_train',)"
    aqd-train --config-file cfg.yaml --voc my_voc VOCdevkit/VOC2007 trainval [--voc-classes my_voc a,b]

Trailing ``KEY VALUE`` pairs override the config. A bad config, missing file, unknown dataset
or unusable checkpoint prints one message naming it and exits with status 2 (``--debug``
shows the traceback).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

# aqd_d2 first: it makes detectron2 v0.6 importable on current NumPy / Pillow (aqd_d2.compat)
# and registers the plugin's builders and datasets.
import aqd_d2  # noqa: F401  isort:skip
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .config import ConfigError, add_aqd_config, validate_aqd_config
from .data import register_datasets_from_config
from .engine import AQDCheckpointer, CheckpointError, Trainer, launch
from .engine.checkpoint import QUANTIZER_STATE_MARKERS

__all__ = ["build_parser", "load_config", "setup", "main", "cli", "Trainer", "USER_ERRORS"]

logger = logging.getLogger("aqd_d2")

#: errors that are the input's fault: printed as one line (traceback only with --debug)
USER_ERRORS = (ConfigError, CheckpointError, FileNotFoundError)


def _check_base_chain(path: str, seen: Optional[List[str]] = None) -> None:
    """Follow the ``_BASE_`` chain of a yaml config as detectron2 resolves it (relative to the
    file that names it) and raise :class:`ConfigError` naming both files when a base is
    missing; detectron2's own error names only the missing file."""
    import yaml

    seen = seen or []
    if path in seen:
        raise ConfigError(f"config {seen[-1]!r}: _BASE_ chain loops back to {path!r}")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config {path!r} is not valid YAML: {e}") from None
    base = data.get("_BASE_") if isinstance(data, dict) else None
    if not base or "://" in str(base):
        return
    base = os.path.expanduser(str(base))
    resolved = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
    if not os.path.isfile(resolved):
        raise ConfigError(f"config {path!r}: its _BASE_ {base!r} does not exist "
                          f"(resolved to {os.path.abspath(resolved)!r})")
    _check_base_chain(resolved, seen + [path])


def load_config(args):
    """The config of ``--config-file`` + ``--coco`` / ``--voc`` + trailing overrides, validated
    (not frozen). Raises :class:`ConfigError` naming the file, key or value at fault."""
    if not args.config_file:
        raise ConfigError("--config-file is required (e.g. configs/RetinaNet/R18-FPN-shapes-cpu.yaml)")
    if not os.path.isfile(args.config_file):
        raise ConfigError(f"config file {args.config_file!r} does not exist")
    _check_base_chain(args.config_file)
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
    cfg.AQD.DATASETS.COCO = list(cfg.AQD.DATASETS.COCO) + [list(e) for e in (args.coco or [])]
    classes = dict(args.voc_classes or [])
    voc = [list(e) + ([classes.pop(e[0])] if e[0] in classes else []) for e in args.voc or []]
    if classes:
        raise ConfigError(f"--voc-classes names {sorted(classes)}, which no --voc registers")
    cfg.AQD.DATASETS.VOC = list(cfg.AQD.DATASETS.VOC) + voc
    validate_aqd_config(cfg)
    if getattr(args, "eval_only", False) and cfg.AQD.EVALUATOR == "none":
        raise ConfigError("--eval-only with AQD.EVALUATOR 'none' would evaluate nothing; set "
                          "AQD.EVALUATOR auto / coco / pascal_voc")
    return cfg


def _check_datasets_registered(cfg) -> None:
    known = set(DatasetCatalog.list())
    for key in ("TRAIN", "TEST"):
        missing = [n for n in cfg.DATASETS[key] if n not in known]
        if missing:
            raise ConfigError(
                f"DATASETS.{key}: {missing} not registered. Register a COCO-json dataset with "
                "--coco NAME JSON_FILE IMAGE_ROOT or a VOC folder with --voc NAME DIRNAME SPLIT "
                "(or AQD.DATASETS.COCO / VOC in the config); detectron2's builtin names "
                "(coco_2017_train, voc_2007_trainval, ...) read $DETECTRON2_DATASETS")


def _resolve_missing_weights(cfg, args) -> None:
    """``MODEL.WEIGHTS`` naming a local file that does not exist: a clear error, or (under
    ``AQD.MISSING_WEIGHTS "scratch"``) one log line and random initialisation. Not checked
    when ``--resume`` finds a checkpoint in OUTPUT_DIR (that one is loaded instead)."""
    path = cfg.MODEL.WEIGHTS
    if not path or "://" in path or os.path.isfile(path):
        return
    if args.resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")):
        return
    where = os.path.abspath(path)
    if cfg.AQD.MISSING_WEIGHTS == "scratch" and not args.eval_only:
        logger.warning("MODEL.WEIGHTS %r not found (%s): training from scratch, as "
                       "AQD.MISSING_WEIGHTS 'scratch' says. Train the float twin of %s first "
                       "(from this directory) to start from its checkpoint instead.",
                       path, where, args.config_file)
        cfg.MODEL.WEIGHTS = ""
        return
    raise ConfigError(
        f"MODEL.WEIGHTS {path!r} does not exist (looked for {where!r}; relative paths are "
        f"relative to the working directory {os.getcwd()!r}). If it is a float checkpoint "
        "written by another config's run (e.g. the *-FP twin of this one), train that config "
        "first from this directory; or start from scratch with MODEL.WEIGHTS '' (or "
        "AQD.MISSING_WEIGHTS scratch)")


def prepare(args):
    """Config loaded and validated, its datasets registered and checked, a missing
    MODEL.WEIGHTS resolved (no side effects on disk): what every process runs first, and the
    launcher's pre-flight check."""
    cfg = load_config(args)
    register_datasets_from_config(cfg)
    _check_datasets_registered(cfg)
    _resolve_missing_weights(cfg, args)
    return cfg


def setup(args, prepare_fn=None):
    """Config from ``--config-file`` and the trailing overrides, validated and frozen;
    detectron2's ``default_setup`` (output folder, logging, seeds). ``prepare_fn`` replaces
    :func:`prepare` (another program's datasets, e.g. ``tools/pretrain_backbone.py``)."""
    cfg = (prepare_fn or prepare)(args)
    cfg.freeze()
    default_setup(cfg, args)
    # detectron2's default_setup logs only the "detectron2" and "fvcore" loggers; aqd_d2's own
    # messages (conversion report, pruning, stage switches, skipped steps) go to log.txt too.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="aqd_d2", abbrev_name="aqd")
    return cfg


def _check_complete_load(checkpointer: AQDCheckpointer, path: str, allow: bool) -> None:
    """``--eval-only`` evaluates exactly the checkpoint: any parameter or quantizer state that
    did not load (missing, or skipped for its shape) is an error naming the file."""
    if not path:
        raise CheckpointError(
            "--eval-only without weights would evaluate a randomly initialised model: set "
            "MODEL.WEIGHTS (or use --resume with a checkpoint in OUTPUT_DIR)")
    inc = getattr(checkpointer, "last_incompatible", None)
    if inc is None or allow:
        return
    problems = []
    if inc.missing_keys:
        quant = [k for k in inc.missing_keys if any(m in k for m in QUANTIZER_STATE_MARKERS)]
        problems.append(f"{len(inc.missing_keys)} model keys missing ({len(quant)} of them "
                        f"quantizer state), e.g. {inc.missing_keys[:3]}")
    if inc.incorrect_shapes:
        problems.append(f"{len(inc.incorrect_shapes)} skipped for their shape, e.g. "
                        f"{[k for k, *_ in inc.incorrect_shapes[:3]]}")
    if problems:
        raise CheckpointError(
            f"--eval-only: checkpoint {path!r} does not hold the whole model: "
            + "; ".join(problems) + ". It was saved from another config (or is a float "
            "checkpoint for a quantized model); evaluating it would report numbers of a "
            "partly random model. Pass --allow-incomplete-weights to evaluate anyway.")


def _one_image_batch_norm_error(cfg, err: ValueError) -> ConfigError:
    world = comm.get_world_size()
    per = cfg.SOLVER.IMS_PER_BATCH // max(world, 1)
    return ConfigError(
        f"a BatchNorm layer got one value per channel in training ({err}): "
        f"SOLVER.IMS_PER_BATCH = {cfg.SOLVER.IMS_PER_BATCH} over {world} process(es) gives "
        f"{per} image(s) per process. Use at least 2 images per process (raise "
        "SOLVER.IMS_PER_BATCH or use fewer processes) or synchronised BN (naiveSyncBN)")


def main(args, trainer_cls=None, setup_fn=None):
    """Train (or ``--eval-only`` evaluate) in this process; ``trainer_cls`` (default
    :class:`Trainer`) and ``setup_fn`` (default :func:`setup`) let another program reuse it."""
    Trainer_ = trainer_cls or Trainer  # noqa: N806
    cfg = (setup_fn or setup)(args)
    if args.eval_only:
        model = Trainer_.build_model(cfg)
        checkpointer = AQDCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        loaded = (checkpointer.get_checkpoint_file() if args.resume and checkpointer.has_checkpoint()
                  else cfg.MODEL.WEIGHTS)
        _check_complete_load(checkpointer, loaded, args.allow_incomplete_weights)
        res = Trainer_.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    trainer = Trainer_(cfg)
    trainer.resume_or_load(resume=args.resume)
    try:
        return trainer.train()
    except ValueError as e:
        if "Expected more than 1 value per channel" in str(e):
            raise _one_image_batch_norm_error(cfg, e) from e
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = default_argument_parser()
    parser.add_argument(
        "--num-cpu-procs", type=int, default=0,
        help="number of CPU training processes on this machine (gloo); used when --num-gpus 0")
    parser.add_argument(
        "--coco", nargs=3, action="append", metavar=("NAME", "JSON_FILE", "IMAGE_ROOT"),
        help="register a COCO-json dataset under NAME (repeatable); use NAME in DATASETS.*")
    parser.add_argument(
        "--voc", nargs=3, action="append", metavar=("NAME", "DIRNAME", "SPLIT"),
        help="register a Pascal VOC folder (Annotations/, JPEGImages/, ImageSets/Main/SPLIT.txt) "
             "under NAME (repeatable); its classes are the 20 VOC classes unless --voc-classes")
    parser.add_argument(
        "--voc-classes", nargs=2, action="append", metavar=("NAME", "CLASSES"),
        help="comma-separated class names (label order) of the --voc dataset NAME")
    parser.add_argument(
        "--allow-incomplete-weights", action="store_true",
        help="--eval-only: evaluate even when the checkpoint misses keys or has other shapes")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of configuration and input errors")
    return parser


def _fail(err: BaseException) -> int:
    print(f"aqd_d2: error: {err}", file=sys.stderr)
    return 2


def cli(argv: Optional[List[str]] = None, parser: Optional[argparse.ArgumentParser] = None,
        prepare_fn=None, main_fn=None) -> int:
    """The ``aqd-train`` / ``train_net.py`` entry point; returns the exit status. ``parser``,
    ``prepare_fn`` and ``main_fn`` (defaults: :func:`build_parser`, :func:`prepare`,
    :func:`main`) let another program (``tools/pretrain_backbone.py``) reuse it."""
    args = (parser or build_parser()).parse_args(argv)
    if args.num_gpus == 1 and args.num_cpu_procs > 0:
        args.num_gpus = 0  # detectron2's parser defaults --num-gpus to 1
    print("Command Line Args:", args)
    try:
        (prepare_fn or prepare)(args)  # fail here, once, before any process is started
        launch(main_fn or main, args.num_gpus, num_machines=args.num_machines,
               machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,),
               num_cpu_processes=args.num_cpu_procs)
    except USER_ERRORS as e:
        if args.debug:
            raise
        return _fail(e)
    except Exception as e:  # a child process's user error arrives wrapped by the launcher
        cause = _user_error_in(e)
        if cause is None or args.debug:
            raise
        return _fail(cause)
    return 0


def _user_error_in(e: BaseException) -> Optional[str]:
    """The message of a user error raised in a spawned process, if ``e`` carries one."""
    text = str(e)
    for cls in USER_ERRORS:
        marker = f"{cls.__module__}.{cls.__name__}: "
        for m in (marker, f"{cls.__name__}: "):
            if m in text:
                return text.rsplit(m, 1)[1].strip().splitlines()[0]
    return None


if __name__ == "__main__":
    sys.exit(cli())
