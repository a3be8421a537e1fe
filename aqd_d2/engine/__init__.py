"""Training: Trainer (DefaultTrainer subclass), hooks, and the CPU multi-process launcher."""
from .launch import launch, launch_cpu
from .trainer import Trainer, build_evaluator

__all__ = ["Trainer", "build_evaluator", "launch", "launch_cpu"]
