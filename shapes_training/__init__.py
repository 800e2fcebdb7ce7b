"""How the bundled shapes models are made: their training and the research tools around them.

Not part of the installed package (the wheel ships the model's weights, the shapes world, metrics and
eval under ``ddsedit.shapes``); run from the root of a checkout, with ddsedit installed::

    python -m shapes_training.train --out runs/shapes     # train (phases: VAE, text encoder, UNet), export
    python -m shapes_training.train_flow --out runs/shapes-flow  # shapes-flow: SD3 layout, rectified flow
    python -m shapes_training.decoder MODEL --out DIR     # harden a model's VAE decoder
    python -m shapes_training.sanity MODEL                # the model's own samples, scored
    python -m shapes_training.drift                       # DDS's expected gradient at the right answer
    python -m shapes_training.tune --grid '{"lr": [0.1]}' # edit settings scored by the shapes eval
    python -m shapes_training.readout --model MODEL       # its clean-image predictions at a noisy source, scored

`config` holds the presets, `bookkeeping` what both trainers share (checkpoints, logging, time budgets),
`models` builds the untrained components, `latents` the encoded image pool and `export` writes the diffusers
folder. For shapes-flow, `flow_text` makes SD3's two CLIP encoders and its prompt encoding, `folded_attention`
trains with the absent T5's zero rows folded into one, and `compact` keeps the resumable checkpoint small.
These modules import ``ddsedit``; ``ddsedit`` never imports them.
"""
