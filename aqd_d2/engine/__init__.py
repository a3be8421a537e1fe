"""Training: Trainer (DefaultTrainer subclass), hooks, and the CPU multi-process launcher."""
from .checkpoint import AQDCheckpointer, CheckpointError
from .launch import launch, launch_cpu
from .train_loop import TRAIN_LOOP_REGISTRY, AQDTrainLoop, build_train_loop
from . import gan_loop  # noqa: F401,E402  (registers the "BiDetGANLoop" training loop)
from .trainer import Trainer, build_evaluator

__all__ = ["AQDCheckpointer", "AQDTrainLoop", "CheckpointError", "TRAIN_LOOP_REGISTRY", "Trainer",
           "build_evaluator", "build_train_loop", "launch", "launch_cpu"]
