"""Rep3D trainers for nnU-Net v2, found by nnU-Net through the ``nnUNet_extTrainer`` environment variable.

Every class here is generated from the variant table in ``rep3d_nnunet.variants`` (methods x schedules), e.g.
``nnUNetTrainerRep3D``, ``nnUNetTrainerRep3DFixedPrior_250epochs``, ``nnUNetTrainerUXNetLRBM_quick``.
Run ``rep3d-nnunet trainers`` for the full list.
"""

from rep3d_nnunet.variants import all_trainer_classes

_TRAINERS = all_trainer_classes()
globals().update(_TRAINERS)
__all__ = sorted(_TRAINERS)
