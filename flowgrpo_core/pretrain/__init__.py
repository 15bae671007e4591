"""Pre-training of the shapes-world base model (issue 7): a tiny SD3 (MMDiT, CLIP + CLIP + T5, KL VAE)
taught by rectified flow to draw the shapes world's GenEval prompts, on a CPU, from a seed.

- ``config``: what a run does (``PretrainConfig``, ``ShapesModelSpec``) and the ``pretrain-shapes`` command.
- ``shapes_model``: the model: sizes, tokenizers that know the world's words, the random-weight builder.
- ``flow_matching``: the data (captions and rendered scenes) and the two training phases (VAE, transformer).
- ``run``: the whole run, evaluation included, and the saved diffusers folder.
"""
