"""The MLflow pyfunc of a registered policy (logged as models-from-code: this file, not a pickle).

Its artifact ``policy`` is the folder written by ``FlowGRPOTrainer.save_policy`` plus ``base.json``
(source and revision of the base model). Loading rebuilds the base from that reference and puts the
adapter on it. Multi-GB bases are never copied into the registry.

``predict`` takes prompts (a DataFrame with a ``prompt`` column and an optional ``seed`` column, a list of
prompts or one prompt) and the params of the signature (``seed``, ``num_steps``, ``guidance_scale``,
``resolution``), and returns a DataFrame with one row per prompt: ``prompt``, ``seed`` and ``image``, the
image as base64-encoded PNG text, so that ``mlflow models predict`` and ``mlflow models serve`` can write
it as JSON (the signature in ``registry.policy_signature``).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from mlflow.pyfunc import PythonModel


class FlowGRPOPolicy(PythonModel):
    def load_context(self, context) -> None:
        from flowgrpo_core.config import load_config
        from flowgrpo_core.models import load_model
        from flowgrpo_core.policy import attach_policy
        from flowgrpo_core.trainer import resolve_device

        folder = Path(context.artifacts["policy"])
        base = json.loads((folder / "base.json").read_text())
        self.config = load_config(None, folder / "config.yaml")
        device = resolve_device("auto")
        self.adapter = load_model(
            base["source"], base.get("revision"), self.config.model.component_dtypes(), str(device)
        )
        attach_policy(self.adapter, folder, ema=True)

    def predict(self, context, model_input, params: dict | None = None):
        """``model_input``: a DataFrame with a ``prompt`` column (and optional ``seed``), a list of prompts
        or one prompt. ``params`` may set ``seed`` (of the first image; image i gets seed + i unless the input
        has seeds), ``num_steps``, ``guidance_scale``, ``resolution``; unset ones are the policy's evaluation
        settings. Returns a DataFrame: ``prompt``, ``seed``, ``image`` (base64 PNG)."""
        import pandas as pd

        from flowgrpo_core.evaluation.compare import generate
        from flowgrpo_core.serving.protocol import encode_image

        params = {k: v for k, v in (params or {}).items() if v is not None}
        prompts, seeds = _prompts_and_seeds(model_input, int(params.get("seed", 0)))
        e, s = self.config.eval, self.config.sampling
        images = generate(
            self.adapter,
            prompts,
            seeds,
            resolution=int(params.get("resolution", s.resolution)),
            num_steps=int(params.get("num_steps", e.num_steps)),
            guidance_scale=float(params.get("guidance_scale", e.guidance_scale)),
            batch_size=e.batch_size,
            negative_prompt=s.negative_prompt,
            max_sequence_length=s.max_sequence_length,
            sde_type=s.sde_type,
        )
        return pd.DataFrame({"prompt": prompts, "seed": seeds, "image": [encode_image(im) for im in images]})


def _prompts_and_seeds(model_input, seed: int) -> tuple[list[str], list[int]]:
    import pandas as pd

    if isinstance(model_input, dict):  # {"prompt": [...], "seed": [...]}
        model_input = pd.DataFrame(model_input)
    if isinstance(model_input, str):
        prompts = [model_input]
    elif isinstance(model_input, pd.DataFrame):
        if "prompt" not in model_input.columns:
            raise ValueError(f"the input DataFrame needs a 'prompt' column, got {list(model_input.columns)}")
        # MLflow's schema check turns {"prompt": [a, b]} into one row holding the list: one row per prompt
        listed = [
            c for c in ("prompt", "seed") if c in model_input.columns and _is_list(model_input[c].iloc[0])
        ]
        if listed:
            model_input = model_input.explode(listed, ignore_index=True)
        prompts = [str(p) for p in model_input["prompt"]]
        if "seed" in model_input.columns and not model_input["seed"].isna().any():
            return _checked(prompts), [int(x) for x in model_input["seed"]]
    else:
        prompts = [str(p) for p in model_input]
    return _checked(prompts), [seed + i for i in range(len(prompts))]


def _is_list(value) -> bool:
    return isinstance(value, list | tuple) or getattr(value, "ndim", 0) == 1


def _checked(prompts: list[str]) -> list[str]:
    if not prompts or not all(p.strip() for p in prompts):
        raise ValueError("predict needs at least one non-empty prompt")
    return prompts


mlflow.models.set_model(FlowGRPOPolicy())
