"""A Rep3D-aware nnU-Net planner: patch and batch size chosen with the Rep3D network's own memory estimate.

nnU-Net looks up planners only inside its own package, so this planner runs through ``rep3d-nnunet plan``, which
calls nnU-Net's planning and preprocessing API with this class. The plans file it writes (identifier
``Rep3DPlans`` by default) has ``rep3d_nnunet.architecture.Rep3DUNet`` as architecture and is used as
``nnUNetv2_train DATASET CONFIG FOLD -tr nnUNetTrainerRep3D -p Rep3DPlans``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from .config import REP3D_NETWORK_CLASS, Rep3DSettings, rep3d_architecture

DEFAULT_PLANS_IDENTIFIER = "Rep3DPlans"


class Rep3DPlanner(ExperimentPlanner):
    """nnU-Net's default planner, with the VRAM estimate and the written architecture swapped for Rep3DUNet.

    The estimate is ``Rep3DUNet.compute_conv_feature_map_size`` (feature maps plus the FFT workspaces of the large
    kernels) compared against nnU-Net's reference value for the memory target, exactly as nnU-Net does for its own
    networks. Preprocessing is nnU-Net's default, so the preprocessed data of ``nnUNetPlans`` is reused.

    Args:
        dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name, overwrite_target_spacing,
            suppress_transpose: as nnU-Net's ``ExperimentPlanner``.
        settings: the Rep3D settings the estimate assumes (the trainer's method; default: LRBM k=21).
        base_num_features: features of the first stage (nnU-Net: 32), doubling per stage.
        max_num_features: cap on features per stage (nnU-Net: 320 in 3D, 512 in 2D).
    """

    def __init__(self, dataset_name_or_id: str | int, gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = DEFAULT_PLANS_IDENTIFIER,
                 overwrite_target_spacing: Sequence[float] | None = None, suppress_transpose: bool = False,
                 settings: Rep3DSettings = Rep3DSettings(), base_num_features: int = 32,
                 max_num_features: int | None = None):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)
        if base_num_features < 1:
            raise ValueError(f"base_num_features must be positive, got {base_num_features}.")
        self.settings = settings
        self.UNet_base_num_features = base_num_features
        if max_num_features is not None:
            self.UNet_max_features_3d = self.UNet_max_features_2d = max_num_features
        self._spacing_for_estimate: Sequence[float] | None = None

    def generate_data_identifier(self, configuration_name: str) -> str:
        # Same preprocessing as nnU-Net's default plans: share its data instead of writing a second copy.
        if configuration_name in ("2d", "3d_fullres"):
            return "nnUNetPlans_" + configuration_name
        return self.plans_identifier + "_" + configuration_name

    def static_estimate_VRAM_usage(self, patch_size, input_channels, output_channels, arch_class_name, arch_kwargs,
                                   arch_kwargs_req_import):
        # nnU-Net's is a staticmethod called through self; ours needs the Rep3D settings, so it is a plain method.
        kwargs, req_import = rep3d_architecture(arch_class_name, arch_kwargs, patch_size,
                                                self._spacing_for_estimate or [1.0] * len(patch_size), self.settings)
        network = get_network_from_plans(REP3D_NETWORK_CLASS, kwargs, req_import, input_channels, output_channels,
                                         allow_init=False)
        return network.compute_conv_feature_map_size(patch_size)

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier, approximate_n_voxels_dataset,
                                    _cache):
        self._spacing_for_estimate = [float(s) for s in spacing]
        # The cache is keyed on patch and strides only; keep Rep3D estimates apart from any other planner's.
        plan = super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                   approximate_n_voxels_dataset, _cache.setdefault("rep3d", {}))
        architecture = plan["architecture"]
        kwargs, req_import = rep3d_architecture(architecture["network_class_name"], architecture["arch_kwargs"],
                                                plan["patch_size"], spacing, self.settings)
        plan["architecture"] = {
            "network_class_name": REP3D_NETWORK_CLASS,
            "arch_kwargs": _jsonable(kwargs),
            "_kw_requires_import": tuple(req_import),
        }
        return plan


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def plan_and_preprocess(dataset_id: int, gpu_memory_gb: float = 8.0, plans_name: str = DEFAULT_PLANS_IDENTIFIER,
                        configurations: Sequence[str] = ("2d", "3d_fullres"), base_features: int = 32,
                        max_features: int | None = None, num_processes: int = 2, preprocess: bool = True,
                        settings: Rep3DSettings = Rep3DSettings()) -> str:
    """Fingerprint (if missing), Rep3D plans, and preprocessing of the configurations whose data is missing.

    Returns:
        The plans identifier to pass as ``nnUNetv2_train ... -p``.
    """
    from pathlib import Path

    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, preprocess_dataset
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if gpu_memory_gb <= 0:
        raise ValueError(f"--gpu-memory-gb must be positive, got {gpu_memory_gb}.")
    if not nnUNet_preprocessed:
        raise ValueError("nnUNet_preprocessed is not set; run 'rep3d-nnunet doctor' to see what is missing.")
    dataset_name = maybe_convert_to_dataset_name(dataset_id)
    preprocessed = Path(nnUNet_preprocessed) / dataset_name
    if not (preprocessed / "dataset_fingerprint.json").is_file():
        extract_fingerprints([dataset_id], num_processes=num_processes, check_dataset_integrity=True)
    planner = Rep3DPlanner(dataset_id, gpu_memory_gb, plans_name=plans_name, settings=settings,
                           base_num_features=base_features, max_num_features=max_features)
    plans = planner.plan_experiment()
    if preprocess:
        for configuration in configurations:
            if configuration not in plans["configurations"]:
                print(f"Configuration {configuration} is not planned for this dataset; skipping it.")
                continue
            data_identifier = plans["configurations"][configuration].get("data_identifier")
            if data_identifier is None or not (preprocessed / data_identifier).is_dir():
                preprocess_dataset(dataset_id, plans_name, [configuration], [num_processes])
    return plans_name
