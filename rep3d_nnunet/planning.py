"""A Rep3D-aware nnU-Net planner: patch and batch size chosen with the Rep3D network's own memory estimate.

nnU-Net looks up planners only inside its own package, so this planner runs through ``rep3d-nnunet plan``, which
calls nnU-Net's planning and preprocessing API with this class. The plans file it writes (identifier
``Rep3DPlans`` by default) has ``rep3d_nnunet.architecture.Rep3DUNet`` as architecture and is used as
``nnUNetv2_train DATASET CONFIG FOLD -tr nnUNetTrainerRep3D -p Rep3DPlans``.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from .config import PAPER_SETTINGS, REP3D_NETWORK_CLASS, Rep3DSettings, rep3d_architecture

DEFAULT_PLANS_IDENTIFIER = "Rep3DPlans"
PAPER_PLANS_IDENTIFIER = "Rep3DPaperPlans"


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
                                                self._spacing_for_estimate or [1.0] * len(patch_size),
                                                self.settings.replace(topology="plan"))
        network = get_network_from_plans(REP3D_NETWORK_CLASS, kwargs, req_import, input_channels, output_channels,
                                         allow_init=False)
        return network.compute_conv_feature_map_size(patch_size)

    def settings_for(self, dim: int) -> Rep3DSettings:
        """The Rep3D settings a ``dim``-D configuration is planned with."""
        return self.settings

    def adjust_plan(self, plan: dict) -> dict:
        """Hook for presets that fix what nnU-Net would choose (patch, batch); called before the architecture."""
        return plan

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier, approximate_n_voxels_dataset,
                                    _cache):
        self._spacing_for_estimate = [float(s) for s in spacing]
        # The cache is keyed on patch and strides only; keep Rep3D estimates apart from any other planner's.
        plan = super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                   approximate_n_voxels_dataset, _cache.setdefault("rep3d", {}))
        plan = self.adjust_plan(plan)
        architecture = plan["architecture"]
        kwargs, req_import = rep3d_architecture(architecture["network_class_name"], architecture["arch_kwargs"],
                                                plan["patch_size"], spacing, self.settings_for(len(spacing)))
        plan["architecture"] = {
            "network_class_name": REP3D_NETWORK_CLASS,
            "arch_kwargs": _jsonable(kwargs),
            "_kw_requires_import": tuple(req_import),
        }
        return plan


class PaperPresetPlanner(Rep3DPlanner):
    """The paper's preprocessing and network (``preprocessing.PAPER_PRESETS``) as nnU-Net plans.

    Target spacing, intensity window with percentile min-max normalization (``Rep3DPaperPreprocessor``), 96^3 patches
    at batch 2 and the paper's encoder (``config.PAPER_SETTINGS``) in 3d_fullres. No 3d_lowres; the 2d
    configuration nnU-Net always plans keeps a plan-topology Rep3D network (the paper has no 2D model). Preprocessed
    data gets its own identifier: the normalization differs from nnU-Net's.

    Args:
        dataset_name_or_id: the dataset.
        preset: a key of ``PAPER_PRESETS`` (amos_ct, amos_mri, kits21, msd_pancreas, msd_hepatic_vessel).
        plans_name: identifier of the written plans.
        settings: Rep3D settings of the estimate and the written architecture (default: the paper's network).
    """

    def __init__(self, dataset_name_or_id: str | int, preset: str, plans_name: str = PAPER_PLANS_IDENTIFIER,
                 settings: Rep3DSettings = PAPER_SETTINGS, gpu_memory_target_in_gb: float = 40):
        from .preprocessing import PAPER_PREPROCESSOR, paper_preset

        self.preset = paper_preset(preset)
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, PAPER_PREPROCESSOR, plans_name,
                         self.preset.spacing_zyx, settings=settings)
        self.lowres_creation_threshold = 0.0  # the paper trains at full resolution only

    def generate_data_identifier(self, configuration_name: str) -> str:
        return self.plans_identifier + "_" + configuration_name

    def settings_for(self, dim: int) -> Rep3DSettings:
        return self.settings if dim == 3 else self.settings.replace(topology="plan")

    def determine_normalization_scheme_and_whether_mask_is_used_for_norm(self):
        from .preprocessing import PAPER_NORMALIZATION

        channels = len(self.dataset_json["channel_names"])
        return [PAPER_NORMALIZATION] * channels, [False] * channels

    def adjust_plan(self, plan: dict) -> dict:
        from .preprocessing import WINDOW_KEY

        plan[WINDOW_KEY] = list(self.preset.window)
        if len(plan["patch_size"]) == 3:
            plan["patch_size"] = list(self.preset.patch_size)
            plan["batch_size"] = self.preset.batch_size
        return plan


# What nnU-Net's planners size a plan for (nnunetv2 2.8.1's sources): the GPU target in GB and the estimate
# (compute_conv_feature_map_size, voxels) that fills it at the reference batch (2 in 3D, 12 in 2D); the planner
# chooses patch and batch so that estimate x batch stays within reference x reference batch.
PLANNER_BUDGETS = {  # experiment_planner_used: (GB, 3D reference, 2D reference)
    "ExperimentPlanner": (8, 560_000_000, 85_000_000),
    "ResEncUNetPlanner": (8, 680_000_000, 135_000_000),
    "nnUNetPlannerResEncM": (8, 680_000_000, 135_000_000),
    "nnUNetPlannerResEncL": (24, 2_100_000_000, 380_000_000),
    "nnUNetPlannerResEncXL": (40, 3_600_000_000, 560_000_000),
}
_REFERENCE_BATCH = {3: 2, 2: 12}


def estimate_gb(estimate_voxels: float, batch_size: int, dim: int, planner: str = "ExperimentPlanner") -> float:
    """GPU memory on ``planner``'s scale: its reference estimate at its reference batch fills its target in GB."""
    gb, reference_3d, reference_2d = PLANNER_BUDGETS[planner]
    reference = reference_3d if dim == 3 else reference_2d
    return float(estimate_voxels) * batch_size / (reference * _REFERENCE_BATCH[dim]) * gb


@dataclass(frozen=True)
class MemoryCheck:
    """The memory of a Rep3D network on a plan made for another network, estimated as nnU-Net's planner does.

    Attributes:
        planner: the planner that wrote the plan (``experiment_planner_used``).
        target_gb: what that planner sized patch and batch for (for a planner we do not know: what the plan's own
            network needs, which at least fits).
        rep3d_gb: the Rep3D network at the plan's patch and batch (feature maps plus the largest FFT workspace), on
            the same planner's scale.
    """

    planner: str
    target_gb: float
    rep3d_gb: float

    @property
    def ratio(self) -> float:
        return self.rep3d_gb / self.target_gb

    def line(self, dataset: str) -> str:
        return (f"Rep3D on these plans: {self.planner} sized their patch and batch for ~{self.target_gb:.1f} GB; by "
                f"the same estimate the Rep3D network needs ~{self.rep3d_gb:.1f} GB ({self.ratio:.2f}x: feature maps "
                f"plus FFT workspace) and may run out of GPU memory. Fix: rep3d-nnunet plan -d {dataset} "
                f"--gpu-memory-gb {math.ceil(self.target_gb):g}, then train with -p Rep3DPlans.")


def memory_check(plans_manager, configuration_manager, settings: Rep3DSettings, num_input_channels: int,
                 num_output_channels: int) -> MemoryCheck | None:
    """The Rep3D network's memory at the plan's patch and batch against what the plan's planner sized them for; None
    for plans the Rep3D planner wrote (their patch and batch were chosen for the Rep3D network already)."""
    architecture = configuration_manager.configuration["architecture"]
    if architecture["network_class_name"].rsplit(".", 1)[-1] == REP3D_NETWORK_CLASS.rsplit(".", 1)[-1]:
        return None
    patch = list(configuration_manager.patch_size)
    dim, batch = len(patch), configuration_manager.batch_size
    planner = plans_manager.plans.get("experiment_planner_used", "an unknown planner")
    kwargs, req_import = rep3d_architecture(architecture["network_class_name"], architecture["arch_kwargs"], patch,
                                            configuration_manager.spacing, settings)
    rep3d = get_network_from_plans(REP3D_NETWORK_CLASS, kwargs, req_import, num_input_channels, num_output_channels,
                                   allow_init=False)
    scale = planner if planner in PLANNER_BUDGETS else "ExperimentPlanner"
    need = estimate_gb(rep3d.compute_conv_feature_map_size(patch), batch, dim, scale)
    if planner in PLANNER_BUDGETS:
        return MemoryCheck(planner, PLANNER_BUDGETS[planner][0], need)
    # its target is unknown: what its own network needs surely fitted
    own = get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                 architecture["_kw_requires_import"], num_input_channels, num_output_channels,
                                 allow_init=False)
    return MemoryCheck(planner, estimate_gb(own.compute_conv_feature_map_size(patch), batch, dim), need)


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def plan_and_preprocess(dataset_id: int, gpu_memory_gb: float = 8.0, plans_name: str | None = None,
                        configurations: Sequence[str] | None = None, base_features: int = 32,
                        max_features: int | None = None, num_processes: int = 2, preprocess: bool = True,
                        settings: Rep3DSettings = Rep3DSettings(), preset: str | None = None) -> str:
    """Fingerprint (if missing), Rep3D plans, and preprocessing of the configurations whose data is missing.

    Args:
        preset: a paper preset (``preprocessing.PAPER_PRESETS``): the paper's spacing, normalization, patch, batch and
            network instead of nnU-Net's choices and the memory-aware Rep3D plan; only 3d_fullres by default.

    Returns:
        The plans identifier to pass as ``nnUNetv2_train ... -p``.
    """

    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, preprocess_dataset

    from .nnunet_paths import nnunet_folder, raw_dataset
    from .preprocessing import Rep3DPaperPreprocessor, paper_preset

    if gpu_memory_gb <= 0:
        raise ValueError(f"--gpu-memory-gb must be positive, got {gpu_memory_gb}.")
    if preset is not None:
        paper_preset(preset)  # an unknown name fails before any work
    dataset_name = raw_dataset(dataset_id).name  # nnUNet_raw set, and the dataset there
    preprocessed = nnunet_folder("nnUNet_preprocessed") / dataset_name
    if not (preprocessed / "dataset_fingerprint.json").is_file():
        extract_fingerprints([dataset_id], num_processes=num_processes, check_dataset_integrity=True)
    if preset is None:
        plans_name = plans_name or DEFAULT_PLANS_IDENTIFIER
        configurations = configurations or ("2d", "3d_fullres")
        planner = Rep3DPlanner(dataset_id, gpu_memory_gb, plans_name=plans_name, settings=settings,
                               base_num_features=base_features, max_num_features=max_features)
    else:
        plans_name = plans_name or PAPER_PLANS_IDENTIFIER
        configurations = configurations or ("3d_fullres",)
        planner = PaperPresetPlanner(dataset_id, preset, plans_name)
    plans = planner.plan_experiment()
    if preprocess:
        for configuration in configurations:
            if configuration not in plans["configurations"]:
                print(f"Configuration {configuration} is not planned for this dataset; skipping it.")
                continue
            data_identifier = plans["configurations"][configuration].get("data_identifier")
            if data_identifier is not None and (preprocessed / data_identifier).is_dir():
                continue
            if preset is None:
                preprocess_dataset(dataset_id, plans_name, [configuration], [num_processes])
            else:
                # nnU-Net's preprocess_dataset looks the preprocessor up inside its own package only
                Rep3DPaperPreprocessor(verbose=False).run(dataset_id, configuration, plans_name, num_processes)
                copy_ground_truth(dataset_id)
    return plans_name


def copy_ground_truth(dataset_id: int) -> None:
    """Copies the training labels to ``gt_segmentations``, as nnU-Net's preprocess_dataset does (its final
    validation evaluates against them)."""
    import shutil
    from pathlib import Path

    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    dataset_name = maybe_convert_to_dataset_name(dataset_id)
    raw = Path(nnUNet_raw) / dataset_name
    dataset_json = json.loads((raw / "dataset.json").read_text())
    target = Path(nnUNet_preprocessed) / dataset_name / "gt_segmentations"
    target.mkdir(parents=True, exist_ok=True)
    for identifier, files in get_filenames_of_train_images_and_targets(str(raw), dataset_json).items():
        shutil.copyfile(files["label"], target / (identifier + dataset_json["file_ending"]))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``rep3d-nnunet plan``."""
    from .preprocessing import PAPER_PRESETS

    parser.add_argument("-d", "--dataset-id", type=int, required=True)
    parser.add_argument("--gpu-memory-gb", type=float, default=8.0, help="GPU memory target (default 8, like nnU-Net)")
    parser.add_argument("--plans-name", default=None, help="default: Rep3DPlans, or Rep3DPaperPlans with --preset")
    parser.add_argument("-c", "--configurations", nargs="+", default=None,
                        help="default: 2d 3d_fullres, or 3d_fullres with --preset")
    parser.add_argument("--preset", default=None, choices=list(PAPER_PRESETS),
                        help="the paper's preprocessing for this benchmark: spacing, intensity window and percentile "
                             "min-max normalization, 96^3 patches, batch 2, the paper's network (appendix A.2)")
    parser.add_argument("--base-features", type=int, default=32, help="features of the first stage (nnU-Net: 32)")
    parser.add_argument("--max-features", type=int, default=None, help="cap on features per stage")
    parser.add_argument("-np", "--num-processes", type=int, default=2)
    parser.add_argument("--no-preprocess", action="store_true", help="write the plans only")


def run_from_args(args: argparse.Namespace) -> None:
    """Plans (and preprocesses) the dataset described by parsed :func:`add_arguments` flags."""
    plan_and_preprocess(args.dataset_id, args.gpu_memory_gb, args.plans_name, args.configurations,
                        args.base_features, args.max_features, args.num_processes, not args.no_preprocess,
                        preset=args.preset)
