"""Evaluation: GenEval rules and detectors, the shapes world, base-vs-policy comparison.

- ``geneval``: GenEval's rules over detections, per-image verdicts and the per-tag report.
- ``detectors``: Mask2Former / OWLv2 detectors and the CLIP colour classifier (transformers).
- ``shapes``: the shapes world (renderer from metadata + a detector by colour segmentation).
- ``compare``: base vs policy on held-out prompts.

The package sits below ``rewards/`` (the GenEval reward is built on its rules) and above ``prompts/``.
Nothing is imported here, so ``import flowgrpo_core.evaluation.geneval`` stays free of torch.
"""
