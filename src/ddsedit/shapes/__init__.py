"""A tiny text-to-image world of coloured shapes, and the eval of edits on the model trained on it.

`world` renders seeded images and captions; `metrics` measures colour, shape and background in an
image; `evaluate` runs and scores edits on the bundled shapes model (``ddsedit eval-shapes``);
`stats` gives the bootstrap intervals and `compare` pairs two eval reports case by case. The model's
training lives outside the package, in ``shapes_training/`` at the root of a checkout.
"""
