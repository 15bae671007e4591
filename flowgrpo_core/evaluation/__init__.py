"""Evaluation: GenEval rules and detectors, the shapes world, prompt sets, base-vs-policy comparison.

- ``geneval``: GenEval's rules over detections, per-image verdicts and the per-tag report.
- ``detectors``: Mask2Former / OWLv2 detectors and the CLIP colour classifier (transformers).
- ``shapes``: the shapes world (renderer from metadata + a detector by colour segmentation).
- ``prompt_sets``: the builtin prompt sets (GenEval, OCR, shapes, general) and their Parquet format.
- ``compare``: base vs policy on held-out prompts.

Nothing is imported here, so ``import flowgrpo_core.evaluation.geneval`` stays free of torch.
"""
