"""Training: Trainer (DefaultTrainer subclass), hooks, and the CPU multi-process launcher."""
from .checkpoint import AQDCheckpointer, CheckpointError
from .launch import launch, launch_cpu
from .trainer import Trainer, build_evaluator

__all__ = ["AQDCheckpointer", "CheckpointError", "Trainer", "build_evaluator", "launch", "launch_cpu"]
