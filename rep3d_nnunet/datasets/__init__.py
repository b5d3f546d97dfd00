"""Datasets written in nnU-Net v2's raw format: synthetic tasks for the demo, tests and benchmarks, and converters
for the Rep3D paper's benchmarks (AMOS22 CT/MRI, KiTS21, MSD Pancreas and Hepatic Vessel)."""

from .converters import CONVERTERS, convert_dataset
from .synthetic import TASKS, generate_synthetic_dataset, synthesize_case

__all__ = ["CONVERTERS", "TASKS", "convert_dataset", "generate_synthetic_dataset", "synthesize_case"]
