"""Datasets written in nnU-Net v2's raw format (currently: synthetic tasks for the demo, tests and benchmarks)."""

from .synthetic import TASKS, generate_synthetic_dataset, synthesize_case

__all__ = ["TASKS", "generate_synthetic_dataset", "synthesize_case"]
