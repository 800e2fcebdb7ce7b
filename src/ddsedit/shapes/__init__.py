"""A tiny text-to-image world of coloured shapes, and the small SD-format model trained on it.

`world` renders seeded images and captions; `train` trains the VAE, text encoder and UNet from
scratch and writes a diffusers folder; `sanity` samples the model and checks colours and shapes.
"""
