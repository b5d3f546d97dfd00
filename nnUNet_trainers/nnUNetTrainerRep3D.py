"""Rep3D trainers for nnU-Net v2, found by nnU-Net through the ``nnUNet_extTrainer`` environment variable.

Every trainer here comes from the variant table in ``rep3d_nnunet.variants`` (methods x schedules), e.g.
``nnUNetTrainerRep3D``, ``nnUNetTrainerRep3DFixedPrior_250epochs``, ``nnUNetTrainerUXNetLRBM_quick``; run
``rep3d-nnunet trainers`` for the full list. A class is made when it is first asked for (nnU-Net's lookup asks
``hasattr(module, name)``), so a process creates only the trainers it uses, and the same class every time.
"""

from rep3d_nnunet.variants import make_trainer_class, trainer_names

__all__ = trainer_names()


def __getattr__(name: str) -> type:
    try:
        trainer = make_trainer_class(name)
    except ValueError:
        raise AttributeError(f"module {__name__!r} has no trainer {name!r}") from None
    trainer.__module__ = __name__  # pickles and nnU-Net's checkpoints find it here
    globals()[name] = trainer
    return trainer


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
