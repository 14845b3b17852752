"""Training loops: joint (all tasks every step, through a balancer) and alternating."""

from taskbalance.training.alternating import (
    AlternatingResult,
    dataset_size,
    task_schedule,
    train_alternating,
)
from taskbalance.training.joint import JointResult, split_batch, train_joint

__all__ = [
    "AlternatingResult",
    "JointResult",
    "dataset_size",
    "split_batch",
    "task_schedule",
    "train_alternating",
    "train_joint",
]
