"""Thin nnUNetTrainer variants for Rep3D; point ``nnUNet_extTrainer`` at this folder (``rep3d-nnunet env``)."""
