"""Rep3D-aware nnU-Net planners (patch and batch chosen with the Rep3D network's own memory estimate), and the memory
check of plans made for another network.

nnU-Net looks up planners only inside its own package, so these planners run through ``rep3d-nnunet plan``, which
calls nnU-Net's planning and preprocessing API with them. ``--planner`` picks the nnU-Net planner they extend
(``PLANNERS``: nnU-Net's default, or a residual-encoder preset, whose residual encoder the Rep3D network keeps). The
plans file written (``Rep3DPlans`` by default) has ``rep3d_nnunet.architecture.Rep3DUNet`` as architecture and is
used as ``nnUNetv2_train DATASET CONFIG FOLD -tr nnUNetTrainerRep3D -p Rep3DPlans``.

Memory is counted on nnU-Net's scale: a planner sizes patch and batch so that its network's
``compute_conv_feature_map_size`` (feature-map voxels per sample) times the batch stays within a reference value
that stands for its GB target (``PLANNER_SCALES``). The FFT workspace of the large kernels is float32 memory of
another kind, converted at 4 bytes an element: its per-sample part grows with the batch, the kernel spectra do not.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import (
    nnUNetPlannerResEncL,
    nnUNetPlannerResEncM,
    nnUNetPlannerResEncXL,
)
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from .config import PAPER_SETTINGS, REP3D_NETWORK_CLASS, Rep3DSettings, rep3d_architecture

DEFAULT_PLANS_IDENTIFIER = "Rep3DPlans"
PAPER_PLANS_IDENTIFIER = "Rep3DPaperPlans"

# What nnU-Net's planners size a plan for (nnunetv2 2.8.1's sources): the estimate (compute_conv_feature_map_size,
# voxels per sample) that, at the reference batch (2 in 3D, 12 in 2D), fills the GB their reference stands for; a
# planner run with -gpu_memory_target scales the reference, not this ratio. The residual-encoder presets differ in
# their reference and default target only, not in the network they plan.
PLANNER_SCALES = {  # planner class: (GB, 3D reference, 2D reference)
    "ExperimentPlanner": (8, 560_000_000, 85_000_000),
    "ResEncUNetPlanner": (8, 680_000_000, 135_000_000),
    "nnUNetPlannerResEncM": (8, 680_000_000, 135_000_000),
    "nnUNetPlannerResEncL": (24, 2_100_000_000, 380_000_000),
    "nnUNetPlannerResEncXL": (40, 3_600_000_000, 560_000_000),
}
_REFERENCE_BATCH = {3: 2, 2: 12}
GIB = 2 ** 30  # bytes; GPU memory as torch reports it
FLOAT32_BYTES = 4


def voxels_per_gb(planner: str, dim: int) -> float:
    """nnU-Net's scale: feature-map voxels (times batch) per GB, for ``planner`` (nnU-Net's default for others)."""
    gb, reference_3d, reference_2d = PLANNER_SCALES.get(planner, PLANNER_SCALES["ExperimentPlanner"])
    return (reference_3d if dim == 3 else reference_2d) * _REFERENCE_BATCH[dim] / gb


def estimate_gb(estimate_voxels: float, batch_size: int, dim: int, planner: str = "ExperimentPlanner") -> float:
    """Feature maps of ``batch_size`` samples in GB on ``planner``'s scale (``voxels_per_gb``)."""
    return float(estimate_voxels) * batch_size / voxels_per_gb(planner, dim)


@dataclass(frozen=True)
class NetworkMemory:
    """A network's GPU memory at a patch and batch, in GB on one planner's scale, by part.

    Attributes:
        feature_maps_gb: nnU-Net's estimate (``compute_conv_feature_map_size``) times the batch.
        fft_workspace_gb: the largest FFT workspace's per-sample part times the batch (float32).
        kernel_spectra_gb: that workspace's kernel spectra, once: they do not grow with the batch.
    """

    feature_maps_gb: float
    fft_workspace_gb: float = 0.0
    kernel_spectra_gb: float = 0.0

    @property
    def total_gb(self) -> float:
        return self.feature_maps_gb + self.fft_workspace_gb + self.kernel_spectra_gb

    def parts(self, batch_size: int) -> str:
        if not self.fft_workspace_gb and not self.kernel_spectra_gb:
            return f"feature maps {self.feature_maps_gb:.1f} GB"
        return (f"feature maps {self.feature_maps_gb:.1f} GB + FFT workspace {self.fft_workspace_gb:.2f} GB "
                f"(per sample x {batch_size}) + kernel spectra {self.kernel_spectra_gb:.2f} GB (once)")


def network_memory(network, patch_size: Sequence[int], batch_size: int,
                   planner: str = "ExperimentPlanner") -> NetworkMemory:
    """``network``'s memory at ``patch_size`` and ``batch_size`` on ``planner``'s scale; the FFT workspace of a
    Rep3D network (``Rep3DUNet.fft_workspace``) at 4 bytes an element."""
    dim = len(patch_size)
    feature_maps = estimate_gb(network.compute_conv_feature_map_size(patch_size), batch_size, dim, planner)
    per_sample, once = network.fft_workspace(patch_size) if hasattr(network, "fft_workspace") else (0, 0)
    return NetworkMemory(feature_maps, per_sample * batch_size * FLOAT32_BYTES / GIB, once * FLOAT32_BYTES / GIB)


class _Rep3DPlanning:
    """What turns an nnU-Net planner into a Rep3D one: the VRAM estimate and the written architecture are the Rep3D
    network's; the topology, its residual blocks included, and the search for patch and batch stay the planner's.

    The estimate is ``Rep3DUNet.compute_conv_feature_map_size`` plus the FFT workspace converted to the planner's
    voxel scale: the per-sample part, and the kernel spectra spread over the smallest batch nnU-Net plans (2), so
    that the planner's fit test at batch 2 is exact and larger batches are counted high, never low. Preprocessing is
    nnU-Net's default, so the preprocessed data of nnU-Net's plans is reused.

    Args:
        dataset_name_or_id, preprocessor_name, overwrite_target_spacing, suppress_transpose: as nnU-Net's planners.
        gpu_memory_target_in_gb: None: the nnU-Net planner's default target.
        plans_name: None: the class's ``default_plans_name``.
        settings: the Rep3D settings the estimate assumes (the trainer's method; default: LRBM k=21).
        base_num_features: features of the first stage (nnU-Net: 32), doubling per stage.
        max_num_features: cap on features per stage (nnU-Net: 320 in 3D, 512 in 2D).
    """

    default_plans_name = DEFAULT_PLANS_IDENTIFIER

    def __init__(self, dataset_name_or_id: str | int, gpu_memory_target_in_gb: float | None = None,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str | None = None,
                 overwrite_target_spacing: Sequence[float] | None = None, suppress_transpose: bool = False,
                 settings: Rep3DSettings = Rep3DSettings(), base_num_features: int = 32,
                 max_num_features: int | None = None):
        if base_num_features < 1:
            raise ValueError(f"base_num_features must be positive, got {base_num_features}.")
        memory = {} if gpu_memory_target_in_gb is None else {"gpu_memory_target_in_gb": gpu_memory_target_in_gb}
        super().__init__(dataset_name_or_id, preprocessor_name=preprocessor_name,
                         plans_name=plans_name or self.default_plans_name,
                         overwrite_target_spacing=overwrite_target_spacing, suppress_transpose=suppress_transpose,
                         **memory)
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
        with torch.device("meta"):  # sizes only: nothing allocated at each step of the planner's search
            network = get_network_from_plans(REP3D_NETWORK_CLASS, kwargs, req_import, input_channels,
                                             output_channels, allow_init=False)
        dim = len(patch_size)
        reference = self.UNet_reference_val_3d if dim == 3 else self.UNet_reference_val_2d
        voxels_per_byte = reference * _REFERENCE_BATCH[dim] / self.UNet_reference_val_corresp_GB / GIB
        per_sample, once = network.fft_workspace(patch_size)
        workspace = (per_sample + once / 2) * FLOAT32_BYTES * voxels_per_byte
        return network.compute_conv_feature_map_size(patch_size) + np.int64(math.ceil(workspace))

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


class Rep3DPlanner(_Rep3DPlanning, ExperimentPlanner):
    """nnU-Net's default planner (PlainConvUNet topology) sizing the Rep3D network: ``rep3d-nnunet plan``."""


class Rep3DResEncMPlanner(_Rep3DPlanning, nnUNetPlannerResEncM):
    """nnU-Net's ResEnc M preset (residual encoder, 8 GB) sizing the Rep3D network: ``--planner ResEncM``."""

    default_plans_name = "Rep3DResEncMPlans"


class Rep3DResEncLPlanner(_Rep3DPlanning, nnUNetPlannerResEncL):
    """nnU-Net's ResEnc L preset (residual encoder, 24 GB) sizing the Rep3D network: ``--planner ResEncL``."""

    default_plans_name = "Rep3DResEncLPlans"


class Rep3DResEncXLPlanner(_Rep3DPlanning, nnUNetPlannerResEncXL):
    """nnU-Net's ResEnc XL preset (residual encoder, 40 GB) sizing the Rep3D network: ``--planner ResEncXL``."""

    default_plans_name = "Rep3DResEncXLPlans"


# --planner: the nnU-Net planner a Rep3D plan extends, by the names of nnU-Net's presets
PLANNERS = {"default": Rep3DPlanner, "ResEncM": Rep3DResEncMPlanner, "ResEncL": Rep3DResEncLPlanner,
            "ResEncXL": Rep3DResEncXLPlanner}
# the --planner that re-plans a plan of nnU-Net's planner (by experiment_planner_used)
_PLANNER_OF = {"ResEncUNetPlanner": "ResEncM", "nnUNetPlannerResEncM": "ResEncM", "nnUNetPlannerResEncL": "ResEncL",
               "nnUNetPlannerResEncXL": "ResEncXL"}


def planner_choice(experiment_planner_used: str, network_class_name: str) -> str:
    """The ``--planner`` that keeps a plan's network family: its planner's preset, else ResEncM for any residual
    encoder, else nnU-Net's default."""
    if experiment_planner_used in _PLANNER_OF:
        return _PLANNER_OF[experiment_planner_used]
    return "ResEncM" if network_class_name.rsplit(".", 1)[-1] == "ResidualEncoderUNet" else "default"


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


@dataclass(frozen=True)
class MemoryCheck:
    """The Rep3D network on a plan made for another network, against what that plan was sized for, on the scale of
    the planner that made it.

    Attributes:
        planner: the planner that wrote the plan (``experiment_planner_used``).
        network: the plan's own network (class name).
        patch_size, batch_size: the plan's.
        plan_network: what the plan's own network needs at that patch and batch (nnU-Net's estimate).
        rep3d: what the Rep3D network needs there, by part.
        target_gb: the memory the plan was sized for: what its own network needs at its patch and batch (the
            planner filled its target, whatever GB it was given with ``-gpu_memory_target``, up to one step of its
            patch search). Where the patch covers the median image (``median_image_size_in_voxels``), memory did not
            bound the plan: then the planner's default target where that is more.
        bounded_by_memory: whether memory bounded the plan (the patch is below the median image on some axis, or
            the plan does not say).
        replan: the ``rep3d-nnunet plan`` options that size a Rep3D plan of the same network family at that target.
        plans_name: the plans identifier that command writes.
    """

    planner: str
    network: str
    patch_size: tuple[int, ...]
    batch_size: int
    plan_network: NetworkMemory
    rep3d: NetworkMemory
    target_gb: float
    bounded_by_memory: bool
    replan: str
    plans_name: str

    @property
    def rep3d_gb(self) -> float:
        return self.rep3d.total_gb

    @property
    def ratio(self) -> float:
        return self.rep3d_gb / self.target_gb

    def line(self, dataset: str) -> str:
        basis = (f"what their {self.network} needs there" if self.target_gb <= self.plan_network.total_gb else
                 f"{self.planner}'s default target: their patch covers the median image, their {self.network} "
                 f"needs ~{self.plan_network.total_gb:.1f} GB")
        return (f"Rep3D on these plans: {self.planner} sized their patch {list(self.patch_size)} and batch "
                f"{self.batch_size} for ~{self.target_gb:.1f} GB ({basis}); by the same estimate the Rep3D network "
                f"needs ~{self.rep3d_gb:.1f} GB ({self.ratio:.2f}x: {self.rep3d.parts(self.batch_size)}) and may run "
                f"out of GPU memory. Fix: rep3d-nnunet plan -d {dataset} {self.replan}, then train with "
                f"-p {self.plans_name}.")


def memory_check(plans_manager, configuration_manager, settings: Rep3DSettings, num_input_channels: int,
                 num_output_channels: int) -> MemoryCheck | None:
    """The Rep3D network's memory at the plan's patch and batch against what the plan was sized for
    (``MemoryCheck``); None for plans a Rep3D planner wrote (their patch and batch were chosen for the Rep3D
    network already)."""
    architecture = configuration_manager.configuration["architecture"]
    network_class_name = architecture["network_class_name"]
    if network_class_name.rsplit(".", 1)[-1] == REP3D_NETWORK_CLASS.rsplit(".", 1)[-1]:
        return None
    patch = [int(p) for p in configuration_manager.patch_size]
    batch = int(configuration_manager.batch_size)
    planner = plans_manager.plans.get("experiment_planner_used", "an unknown planner")
    kwargs, req_import = rep3d_architecture(network_class_name, architecture["arch_kwargs"], patch,
                                            configuration_manager.spacing, settings)
    with torch.device("meta"):  # sizes only
        rep3d = get_network_from_plans(REP3D_NETWORK_CLASS, kwargs, req_import, num_input_channels,
                                       num_output_channels, allow_init=False)
        own = get_network_from_plans(network_class_name, architecture["arch_kwargs"],
                                     architecture["_kw_requires_import"], num_input_channels, num_output_channels,
                                     allow_init=False)
    plan_network = network_memory(own, patch, batch, planner)
    median = configuration_manager.configuration.get("median_image_size_in_voxels")
    bounded_by_memory = median is None or any(p < m for p, m in zip(patch, median))
    target = plan_network.total_gb
    if not bounded_by_memory and planner in PLANNER_SCALES:
        target = max(target, PLANNER_SCALES[planner][0])
    choice = planner_choice(planner, network_class_name)
    replan = (f"--planner {choice} " if choice != "default" else "") + f"--gpu-memory-gb {max(math.ceil(target), 1)}"
    return MemoryCheck(planner, network_class_name.rsplit(".", 1)[-1], tuple(patch), batch, plan_network,
                       network_memory(rep3d, patch, batch, planner), target, bounded_by_memory, replan,
                       PLANNERS[choice].default_plans_name)


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def plan_and_preprocess(dataset_id: int, gpu_memory_gb: float | None = None, plans_name: str | None = None,
                        configurations: Sequence[str] | None = None, base_features: int = 32,
                        max_features: int | None = None, num_processes: int = 2, preprocess: bool = True,
                        settings: Rep3DSettings = Rep3DSettings(), preset: str | None = None,
                        planner: str = "default") -> str:
    """Fingerprint (if missing), Rep3D plans, and preprocessing of the configurations whose data is missing.

    Args:
        gpu_memory_gb: the GPU memory target; None: the nnU-Net planner's default (8 GB; ResEncL 24, ResEncXL 40).
        preset: a paper preset (``preprocessing.PAPER_PRESETS``): the paper's spacing, normalization, patch, batch and
            network instead of nnU-Net's choices and the memory-aware Rep3D plan; only 3d_fullres by default.
        planner: a key of ``PLANNERS``: the nnU-Net planner whose topology the Rep3D plan keeps (``ResEncM``, ``L``,
            ``XL``: nnU-Net's residual encoder, its residual blocks kept before the Rep3D blocks).

    Returns:
        The plans identifier to pass as ``nnUNetv2_train ... -p``.
    """

    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, preprocess_dataset

    from .nnunet_paths import nnunet_folder, raw_dataset
    from .preprocessing import Rep3DPaperPreprocessor, paper_preset

    if gpu_memory_gb is not None and gpu_memory_gb <= 0:
        raise ValueError(f"--gpu-memory-gb must be positive, got {gpu_memory_gb}.")
    if planner not in PLANNERS:
        raise ValueError(f"Unknown planner {planner!r}; allowed values are {', '.join(PLANNERS)}.")
    if preset is not None:
        paper_preset(preset)  # an unknown name fails before any work
        if planner != "default":
            raise ValueError(f"--preset fixes patch, batch and network (the paper's); --planner {planner} sizes a "
                             f"plan-topology network instead. Use one of them.")
    dataset_name = raw_dataset(dataset_id).name  # nnUNet_raw set, and the dataset there
    preprocessed = nnunet_folder("nnUNet_preprocessed") / dataset_name
    if not (preprocessed / "dataset_fingerprint.json").is_file():
        extract_fingerprints([dataset_id], num_processes=num_processes, check_dataset_integrity=True)
    if preset is None:
        planner_class = PLANNERS[planner]
        plans_name = plans_name or planner_class.default_plans_name
        configurations = configurations or ("2d", "3d_fullres")
        experiment_planner = planner_class(dataset_id, gpu_memory_gb, plans_name=plans_name, settings=settings,
                                           base_num_features=base_features, max_num_features=max_features)
    else:
        plans_name = plans_name or PAPER_PLANS_IDENTIFIER
        configurations = configurations or ("3d_fullres",)
        experiment_planner = PaperPresetPlanner(dataset_id, preset, plans_name)
    plans = experiment_planner.plan_experiment()
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
    parser.add_argument("--planner", default="default", choices=list(PLANNERS),
                        help="the nnU-Net planner the plan extends: default (PlainConvUNet, nnUNetPlans), or a "
                             "residual-encoder preset (ResEncM/L/XL, nnUNetResEncUNet*Plans), whose residual blocks the "
                             "Rep3D network keeps")
    parser.add_argument("--gpu-memory-gb", type=float, default=None,
                        help="GPU memory target (default: the planner's, 8 GB like nnU-Net; ResEncL 24, ResEncXL 40)")
    parser.add_argument("--plans-name", default=None,
                        help="default: Rep3DPlans (Rep3DResEncMPlans ... with --planner), Rep3DPaperPlans with --preset")
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
                        preset=args.preset, planner=args.planner)
