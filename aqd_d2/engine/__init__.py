"""Training: Trainer (DefaultTrainer subclass), :func:`setup` for a project's own
DefaultTrainer, hooks, the optimizer choice and the CPU multi-process launcher."""
from aqd_d2.modeling.training_features import TrainerSetupError

from .checkpoint import AQDCheckpointer, CheckpointError
from .launch import launch, launch_cpu
from .train_loop import TRAIN_LOOP_REGISTRY, AQDTrainLoop, build_train_loop
from . import gan_loop  # noqa: F401,E402  (registers the "BiDetGANLoop" training loop)
from .optimizer import build_optimizer
from .trainer_setup import setup
from .trainer import Trainer, build_evaluator

__all__ = ["AQDCheckpointer", "AQDTrainLoop", "CheckpointError", "TRAIN_LOOP_REGISTRY", "Trainer",
           "TrainerSetupError", "build_evaluator", "build_optimizer", "build_train_loop",
           "launch", "launch_cpu", "setup"]
