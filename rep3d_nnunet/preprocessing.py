"""The paper's preprocessing (appendix A.2) as nnU-Net classes: intensity window, then per-volume percentile min-max.

Per benchmark (``PAPER_PRESETS``, keyed like the dataset converters): clip to a fixed intensity window (CT soft tissue
-175..250 HU; MSD Hepatic Vessel 0..230; AMOS MRI 0..1000), then ``(X - X_1) / (X_99 - X_1)`` with X_p the p-th
percentile of the clipped volume; resample to 1.5 x 1.5 x 2.0 mm (x, y, z; AMOS MRI 1.0 mm isotropic); 96^3 patches.

nnU-Net resolves normalization and preprocessor classes by name inside its own package only. So preprocessing runs
through ``rep3d-nnunet plan --preset NAME`` (which calls ``Rep3DPaperPreprocessor.run`` directly), and inference on
new images through ``rep3d-nnunet predict``, which is nnU-Net's predictor with a configuration manager that also
knows this module's preprocessor (``Rep3DConfigurationManager``). Training, cross-validation,
``nnUNetv2_find_best_configuration`` and ``nnUNetv2_ensemble`` read preprocessed data or predictions and need nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from nnunetv2.preprocessing.normalization.default_normalization_schemes import ImageNormalization
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

PAPER_NORMALIZATION = "PaperWindowNormalization"
PAPER_PREPROCESSOR = "Rep3DPaperPreprocessor"
# Key in a configuration of the plans that holds the [low, high] intensity window of the paper's normalization.
WINDOW_KEY = "rep3d_intensity_window"


@dataclass(frozen=True)
class PaperPreset:
    """One benchmark's preprocessing in the paper (appendix A.2).

    Attributes:
        window: intensity clipping range [low, high].
        spacing_xyz: target voxel spacing in mm, (x, y, z) as the paper writes it.
        patch_size: training patch, 96^3 for every benchmark.
        batch_size: 2 (one volume, two crops).
    """

    window: tuple[float, float]
    spacing_xyz: tuple[float, float, float]
    patch_size: tuple[int, int, int] = (96, 96, 96)
    batch_size: int = 2

    @property
    def spacing_zyx(self) -> list[float]:
        """The target spacing in nnU-Net's array order (z, y, x)."""
        return [float(s) for s in reversed(self.spacing_xyz)]


_CT_SOFT_TISSUE = (-175.0, 250.0)
_PAPER_SPACING = (1.5, 1.5, 2.0)
PAPER_PRESETS: dict[str, PaperPreset] = {
    "amos_ct": PaperPreset(_CT_SOFT_TISSUE, _PAPER_SPACING),
    "amos_mri": PaperPreset((0.0, 1000.0), (1.0, 1.0, 1.0)),
    "kits21": PaperPreset(_CT_SOFT_TISSUE, _PAPER_SPACING),
    "msd_pancreas": PaperPreset(_CT_SOFT_TISSUE, _PAPER_SPACING),
    "msd_hepatic_vessel": PaperPreset((0.0, 230.0), _PAPER_SPACING),
}


def paper_preset(name: str) -> PaperPreset:
    """The preset of a benchmark. Raises ValueError naming the presets if ``name`` is not one."""
    if name not in PAPER_PRESETS:
        raise ValueError(f"Unknown paper preset {name!r}; allowed values are {', '.join(PAPER_PRESETS)}.")
    return PAPER_PRESETS[name]


class PaperWindowNormalization(ImageNormalization):
    """Clip to ``window``, then (X - X_1) / (X_99 - X_1) with the clipped volume's 1st and 99th percentiles.

    Shapes:
        run(image [*spatial]) -> [*spatial] float32
    """

    leaves_pixels_outside_mask_at_zero_if_use_mask_for_norm_is_true = False

    def __init__(self, window: tuple[float, float], use_mask_for_norm: bool | None = None,
                 intensityproperties: dict | None = None, target_dtype=np.float32):
        super().__init__(use_mask_for_norm, intensityproperties or {}, target_dtype)
        low, high = (float(w) for w in window)
        if not low < high:
            raise ValueError(f"Intensity window must be [low, high] with low < high, got {list(window)}.")
        self.window = (low, high)

    def run(self, image: np.ndarray, seg: np.ndarray | None = None) -> np.ndarray:
        image = np.clip(image.astype(self.target_dtype, copy=False), *self.window)
        low, high = np.percentile(image, [1.0, 99.0])
        # A constant volume (high == low) maps to zeros rather than dividing by zero.
        return ((image - low) / max(float(high - low), 1e-8)).astype(self.target_dtype, copy=False)


class Rep3DPaperPreprocessor(DefaultPreprocessor):
    """nnU-Net's preprocessor with the paper's normalization, the window read from the configuration."""

    def _normalize(self, data: np.ndarray, seg: np.ndarray, configuration_manager: ConfigurationManager,
                   foreground_intensity_properties_per_channel: dict) -> np.ndarray:
        window = configuration_manager.configuration.get(WINDOW_KEY)
        if window is None:
            raise ValueError(f"The configuration has no {WINDOW_KEY!r}: these plans were not written by "
                             f"'rep3d-nnunet plan --preset NAME'. Re-plan with it.")
        for c in range(data.shape[0]):
            data[c] = PaperWindowNormalization(window).run(data[c])
        return data


_PREPROCESSORS = {PAPER_PREPROCESSOR: Rep3DPaperPreprocessor}


class Rep3DConfigurationManager(ConfigurationManager):
    """nnU-Net's configuration manager that also resolves this package's preprocessors by name.

    nnU-Net's own looks preprocessors up inside ``nnunetv2.preprocessing`` only; its predictor asks the configuration
    manager for the class, so swapping the manager is all ``rep3d-nnunet predict`` needs.
    """

    @property
    @lru_cache(maxsize=1)
    def preprocessor_class(self):
        if self.preprocessor_name in _PREPROCESSORS:
            return _PREPROCESSORS[self.preprocessor_name]
        return super().preprocessor_class
