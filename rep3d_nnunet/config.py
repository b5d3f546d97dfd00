"""Rep3D settings and their translation from an nnU-Net plan: the one place where plans meet Rep3D.

The plan decides the topology (stages, features, strides, norm, patch size); a trainer variant decides the method
(``Rep3DSettings``: block type, modulation, kernel, generator). ``rep3d_architecture`` combines both into the
keyword arguments of ``rep3d_nnunet.architecture.Rep3DUNet``, in the JSON form nnU-Net keeps in plans files.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .backend_choice import BACKENDS
from .blocks import KERNEL_INITS
from .kernel_geometry import check_kernel_size, stage_kernel_sizes
from .modulation import check_generator, check_modulation_mode

REP3D_NETWORK_CLASS = "rep3d_nnunet.architecture.Rep3DUNet"
BLOCK_TYPES = ("rep3d", "uxnet")
TOPOLOGIES = ("plan", "paper")
STAGE_CONVS = ("one", "plan")
# nnU-Net architectures whose arch_kwargs carry a U-Net topology we can reuse.
_TOPOLOGY_SOURCES = ("PlainConvUNet", "ResidualEncoderUNet", "Rep3DUNet")
_TOPOLOGY_KEYS = (
    "n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides", "n_conv_per_stage_decoder",
    "conv_bias", "norm_op", "norm_op_kwargs", "dropout_op", "dropout_op_kwargs", "nonlin", "nonlin_kwargs",
)
_IMPORTED_KEYS = ("conv_op", "norm_op", "dropout_op", "nonlin")


@dataclass(frozen=True)
class Rep3DSettings:
    """What a trainer variant decides about the Rep3D network (the plan decides the rest).

    Attributes:
        block: ``rep3d`` (modulated depthwise conv -> norm -> GELU) or ``uxnet`` (3D UX-Net block).
        modulation: ``lrbm``, ``fixed``, ``none`` or ``csla``.
        kernel_size: requested large kernel per axis; capped per stage by the feature map (see
            ``kernel_geometry.stage_kernel_sizes``).
        blocks_per_stage: Rep3D/UX-Net blocks after each stage's strided conv.
        first_block_stage: the first encoder stage with Rep3D blocks (0: every stage). Stage 0 holds most of the
            voxels and its large-kernel convolutions dominate a step's cost (docs/performance.md); stages before this
            one keep only the plan's convolutions.
        generator_depth, generator_kernel: LRBM generator (paper defaults 2 and 7).
        small_kernel, csla_scales: CSLA small branch size and branch scales (aL, aS).
        spacing_aware_prior: measure the prior's distances in physical units of each stage's voxel spacing.
        conv_backend: ``auto``, ``direct`` or ``fft`` for the large depthwise convolutions.
        topology: ``plan`` (stages, features and strides from the nnU-Net plan) or ``paper`` (the paper's encoder,
            Table 5 / appendix A.4, see ``paper_topology``; needs a 3D patch divisible by 32).
        stage_convs: ``one`` (each encoder stage starts with one strided conv, then the large-kernel blocks) or
            ``plan`` (the plan's own convolutions per stage, PlainConvUNet's ``n_conv_per_stage``, then the blocks).
        block_layer_scale: None (the authors' plain blocks) or the initial scale of residual Rep3D blocks.
        block_pointwise: a 1x1 convolution mixing the channels after each Rep3D block's nonlinearity.
        kernel_init: ``default`` or ``modulated`` (see ``blocks.ModulatedDepthwiseConv``).
    """

    block: str = "rep3d"
    modulation: str = "lrbm"
    kernel_size: int = 21
    blocks_per_stage: int = 1
    first_block_stage: int = 1
    generator_depth: int = 2
    generator_kernel: int = 7
    small_kernel: int = 3
    csla_scales: tuple[float, float] = (1.0, 1.0)
    spacing_aware_prior: bool = False
    conv_backend: str = "auto"
    topology: str = "plan"
    # The default network (docs/hippocampus.md, "Choosing the default"): the plan's own convolutions per stage, then
    # residual depthwise-separable Rep3D blocks starting as the identity. The paper's plain blocks after one strided
    # conv (stage_convs="one", block_layer_scale=None, block_pointwise=False) fell behind nnU-Net's network on
    # real anatomy after the first few hundred iterations.
    stage_convs: str = "plan"
    block_layer_scale: float | None = 0.0
    block_pointwise: bool = True
    kernel_init: str = "default"

    def __post_init__(self):
        if self.block not in BLOCK_TYPES:
            raise ValueError(f"Unknown block type {self.block!r}; allowed values are {', '.join(BLOCK_TYPES)}.")
        check_modulation_mode(self.modulation)
        check_kernel_size(self.kernel_size, 1)
        check_kernel_size(self.small_kernel, 1)
        check_generator(self.generator_depth, self.generator_kernel)
        if self.blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be at least 1, got {self.blocks_per_stage}.")
        if self.first_block_stage < 0:
            raise ValueError(f"first_block_stage must be at least 0, got {self.first_block_stage}.")
        if self.conv_backend not in BACKENDS:
            raise ValueError(f"Unknown conv backend {self.conv_backend!r}; allowed values are {', '.join(BACKENDS)}.")
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"Unknown topology {self.topology!r}; allowed values are {', '.join(TOPOLOGIES)}.")
        if self.stage_convs not in STAGE_CONVS:
            raise ValueError(f"Unknown stage_convs {self.stage_convs!r}; allowed values are {', '.join(STAGE_CONVS)}.")
        if self.kernel_init not in KERNEL_INITS:
            raise ValueError(f"Unknown kernel_init {self.kernel_init!r}; allowed values are {', '.join(KERNEL_INITS)}.")

    def replace(self, **changes) -> "Rep3DSettings":
        return dataclasses.replace(self, **changes)


# The paper's encoder (Table 5, appendix A.4) as an nnU-Net topology. nnU-Net's decoder needs a full-resolution
# first stage, so the paper's 7^3 stride-2 stem becomes stage 1's strided conv after a plain full-resolution stage
# (the UX-Net/SwinUNETR "encoder1" block the paper's decoder takes its last skip from); the 768-channel hidden stage
# is the bottleneck. Four stages of two Rep3D blocks at 48/96/192/384 channels, as in the paper.
PAPER_FEATURES = (48, 48, 96, 192, 384, 768)
PAPER_BLOCKS_PER_STAGE = (0, 2, 2, 2, 2, 0)
PAPER_CONVS_PER_STAGE = (2, 1, 1, 1, 1, 2)  # two-conv blocks at full resolution and in the bottleneck, as the paper
PAPER_STEM_KERNEL = 7


def paper_topology(patch_size: Sequence[int]) -> dict:
    """arch_kwargs entries of the paper's encoder for a 3D patch (stride 2 five times: every axis divisible by 32).

    Raises:
        ValueError: the patch is not 3D or not divisible by 32 on every axis.
    """
    total_stride = 2 ** (len(PAPER_FEATURES) - 1)
    if len(patch_size) != 3 or any(p % total_stride for p in patch_size):
        raise ValueError(
            f"The paper's network needs a 3D patch divisible by {total_stride} on every axis (the paper uses 96^3); "
            f"got {list(patch_size)}. Fix: plan with the paper preset (rep3d-nnunet plan -d ID --preset NAME), "
            f"which writes 96^3 patches, or use a plan-topology trainer such as nnUNetTrainerRep3D."
        )
    n = len(PAPER_FEATURES)
    kernels = [[3, 3, 3], [PAPER_STEM_KERNEL] * 3] + [[3, 3, 3]] * (n - 2)
    return {
        "n_stages": n, "features_per_stage": list(PAPER_FEATURES), "kernel_sizes": kernels,
        "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1), "n_conv_per_stage_decoder": [2] * (n - 1),
        "n_conv_per_stage": list(PAPER_CONVS_PER_STAGE), "n_blocks_per_stage": list(PAPER_BLOCKS_PER_STAGE),
    }


# The paper's network as settings: its encoder topology and plain blocks (depthwise conv -> norm -> GELU, no residual),
# whatever the defaults of the plan-topology network are.
PAPER_SETTINGS = Rep3DSettings(topology="paper", stage_convs="one", block_layer_scale=None, block_pointwise=False,
                               blocks_per_stage=2, first_block_stage=0)


def _class_name(dotted: str) -> str:
    return dotted.rsplit(".", 1)[-1]


def _plan_residual_blocks(network_class_name: str, arch_kwargs: dict) -> list[int] | None:
    """Residual blocks per encoder stage of a residual-encoder plan: nnU-Net's ResEnc plans, and Rep3D plans written
    from one (``rep3d-nnunet plan --planner ResEnc*``, an export's plans); None for plain-convolution plans."""
    source = _class_name(network_class_name)
    blocks = arch_kwargs.get("n_blocks_per_stage") if source == "ResidualEncoderUNet" else \
        arch_kwargs.get("n_residual_blocks_per_stage") if source == "Rep3DUNet" else None
    return None if blocks is None else list(blocks)


def _plan_convs(network_class_name: str, arch_kwargs: dict):
    """Plain convolutions per encoder stage of a plan without residual blocks (nnU-Net's default 2, Rep3DUNet's 1)."""
    return arch_kwargs.get("n_conv_per_stage", 1 if _class_name(network_class_name) == "Rep3DUNet" else 2)


def describe_translation(network_class_name: str, arch_kwargs: dict, settings: Rep3DSettings) -> str:
    """One line: what of the plan's network the Rep3D network keeps and what it replaces or adds."""
    source = _class_name(network_class_name)
    if settings.topology == "paper":
        return (f"The paper's Rep3D encoder (4 stages of {settings.blocks_per_stage} Rep3D blocks, 48-384 channels, "
                f"deep supervision at its own strides) on the plan's patch and batch; the plan's {source} topology "
                f"is not used.")
    residual = _plan_residual_blocks(network_class_name, arch_kwargs)
    if residual is not None:
        plan_stage = f"stem and residual blocks per stage ({', '.join(map(str, residual))})"
    else:
        convs = _plan_convs(network_class_name, arch_kwargs)
        plan_stage = f"convolutions per stage ({', '.join(map(str, convs if isinstance(convs, list) else [convs]))})"
    kind = "UX-Net" if settings.block == "uxnet" else (
        "residual Rep3D" if settings.block_layer_scale is not None else "Rep3D")
    n, first = settings.blocks_per_stage, settings.first_block_stage
    added = (f"{n} {kind} block{'s' * (n != 1)} per stage ({settings.kernel_size}^3 {settings.modulation} "
             f"kernels, capped by each stage's feature map)")
    where = "each stage's" if first == 0 else \
        f"each stage's from stage {first} on (none at stage{' 0' if first == 1 else f's 0-{first - 1}'})"
    if source == "Rep3DUNet":
        source = "Rep3DUNet (rep3d-nnunet plan, or an export's plans; this trainer's Rep3D settings)"
    kept = f"Rep3D on the plan's {source}: kept its stages, features, strides, kernel sizes, norm, decoder, patch and batch"
    if settings.stage_convs == "plan":
        return f"{kept} and its {plan_stage}; added after {where}: {added}."
    return (f"{kept}; replaced its {plan_stage} by one strided convolution per stage, followed in {where} by "
            f"{added}.")


def rep3d_architecture(network_class_name: str, arch_kwargs: dict, patch_size: Sequence[int],
                       spacing: Sequence[float], settings: Rep3DSettings) -> tuple[dict, list[str]]:
    """Rep3DUNet keyword arguments (JSON form) and the keys nnU-Net must import, from a plan's configuration.

    Args:
        network_class_name: the plan's ``architecture.network_class_name``.
        arch_kwargs: the plan's ``architecture.arch_kwargs`` (topology source).
        patch_size: the configuration's patch size (caps the large kernels).
        spacing: the configuration's voxel spacing (for a spacing-aware prior).
        settings: the trainer's Rep3D settings; they override any Rep3D settings stored in a Rep3DUNet plan.

    Raises:
        ValueError: the plan's architecture has no U-Net topology we can derive Rep3D from, or the patch does not fit.
    """
    if _class_name(network_class_name) not in _TOPOLOGY_SOURCES:
        raise ValueError(
            f"Cannot derive a Rep3D network from the plan's architecture {network_class_name!r}. Supported sources: "
            f"{', '.join(_TOPOLOGY_SOURCES)} (nnUNetPlans, nnUNetResEnc*Plans or a Rep3D plan)."
        )
    missing = [k for k in ("n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides") if k not in arch_kwargs]
    if missing:
        raise ValueError(f"The plan's arch_kwargs lack {missing}; re-run nnUNetv2_plan_and_preprocess.")
    kwargs = {k: arch_kwargs[k] for k in _TOPOLOGY_KEYS if k in arch_kwargs}
    if settings.topology == "paper":
        kwargs.update(paper_topology(patch_size))
    else:
        if settings.first_block_stage >= kwargs["n_stages"]:
            raise ValueError(
                f"first_block_stage {settings.first_block_stage} leaves no stage of this plan's {kwargs['n_stages']} "
                f"with Rep3D blocks; use a first_block_stage below {kwargs['n_stages']}.")
        # an int where every stage has blocks: the plans and exports written before first_block_stage stay identical
        kwargs["n_blocks_per_stage"] = settings.blocks_per_stage if settings.first_block_stage == 0 else \
            [0 if s < settings.first_block_stage else settings.blocks_per_stage for s in range(kwargs["n_stages"])]
        residual = _plan_residual_blocks(network_class_name, arch_kwargs)
        if settings.stage_convs == "plan" and residual is not None:
            kwargs["n_residual_blocks_per_stage"] = residual
        elif settings.stage_convs == "plan":
            kwargs["n_conv_per_stage"] = _plan_convs(network_class_name, arch_kwargs)
    n_stages = kwargs["n_stages"]
    kwargs.setdefault("n_conv_per_stage_decoder", [2] * (n_stages - 1))
    strides = [list(s) for s in kwargs["strides"]]
    kwargs["large_kernel_sizes"] = stage_kernel_sizes(patch_size, strides, kwargs["kernel_sizes"], settings.kernel_size)
    kwargs["block"] = settings.block
    kwargs["modulation"] = settings.modulation
    kwargs["generator_depth"] = settings.generator_depth
    kwargs["generator_kernel"] = settings.generator_kernel
    kwargs["small_kernel"] = settings.small_kernel
    kwargs["csla_scales"] = list(settings.csla_scales)
    kwargs["conv_backend"] = settings.conv_backend
    kwargs["block_layer_scale"] = settings.block_layer_scale
    kwargs["block_pointwise"] = settings.block_pointwise
    kwargs["kernel_init"] = settings.kernel_init
    if settings.spacing_aware_prior:
        cumulative = np.cumprod(np.array(strides), axis=0)
        kwargs["stage_spacings"] = [[float(sp * c) for sp, c in zip(spacing, stage)] for stage in cumulative]
    else:
        kwargs["stage_spacings"] = None
    req_import = [k for k in _IMPORTED_KEYS if kwargs.get(k) is not None]
    return kwargs, req_import
