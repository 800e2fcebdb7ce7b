"""Names that several modules check against, defined once and without importing torch.

Reading a manifest or checking a flag must not import torch, so the editing code
(:mod:`ddsedit.optimize`, :mod:`ddsedit.scores`) imports these rather than defining them.
"""

from __future__ import annotations

METHODS = ("sds", "dds", "masked-dds", "cds", "pds", "ids")
# The methods that compare against a description of the source (the DDS family).
METHODS_WITH_REF = ("dds", "masked-dds", "cds", "pds", "ids")
MASKED_METHOD = "masked-dds"  # needs a mask
MASK_OPTIONAL_METHODS = ("cds", "pds", "ids")  # take --mask when given, edit everywhere without one
CONTRASTIVE_METHODS = ("cds", "ids")  # have the CUT term (ids: off unless --cut-weight > 0)
PREDICTION_TYPES = ("epsilon", "v_prediction")
DEFAULT_PREDICTION_TYPE = "epsilon"  # what a scheduler config without ``prediction_type`` means (diffusers' default)
