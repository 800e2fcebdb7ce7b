"""Names that several modules check against, defined once and without importing torch.

Reading a manifest or checking a flag must not import torch, so the editing code
(:mod:`ddsedit.optimize`, :mod:`ddsedit.scores`) imports these rather than defining them. The methods
themselves are declared in :mod:`ddsedit.methods`.
"""

from __future__ import annotations

MASKED_METHOD = "masked-dds"  # the method the automatic-mask run and `ddsedit mask` name
PREDICTION_TYPES = ("epsilon", "v_prediction")
DEFAULT_PREDICTION_TYPE = "epsilon"  # what a scheduler config without ``prediction_type`` means (diffusers' default)
