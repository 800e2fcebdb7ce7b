"""Names that several modules check against, defined once and without importing torch.

Reading a manifest or checking a flag must not import torch, so the editing code
(:mod:`ddsedit.optimize`, :mod:`ddsedit.scores`) imports these rather than defining them.
"""

from __future__ import annotations

METHODS = ("sds", "dds", "masked-dds")
METHODS_WITH_REF = ("dds", "masked-dds")  # the methods that compare against a description of the source
MASKED_METHOD = "masked-dds"
PREDICTION_TYPES = ("epsilon", "v_prediction")
DEFAULT_PREDICTION_TYPE = "epsilon"  # what a scheduler config without ``prediction_type`` means (diffusers' default)
