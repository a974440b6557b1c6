"""Celo2 under the import path of the authors' release, for code written against it::

    from recipes.celo2 import scale_by_celo2, load_checkpoint

The transformation lives in recipes.optim.celo2 and the theta format in recipes.optim.theta;
this module only re-exports what users import, so that line keeps working.
"""
from recipes.optim.celo2 import Celo2State, Celo2TensorState, scale_by_celo2
from recipes.optim.theta import (THETA_NAMES, ThetaFormatError, init_theta, load_checkpoint,
                                 normalized_momentum_theta, save_checkpoint, theta_from_source, validate_theta)

__all__ = ["Celo2State", "Celo2TensorState", "THETA_NAMES", "ThetaFormatError", "init_theta", "load_checkpoint",
           "normalized_momentum_theta", "save_checkpoint", "scale_by_celo2", "theta_from_source", "validate_theta"]
