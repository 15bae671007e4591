"""A trained policy's weights on disk: written by :func:`export_weights` (``FlowGRPOTrainer.save_policy``), put
back onto their base model by :func:`attach_policy`. LoRA weights are diffusers' LoRA file; full weights a
``transformer/`` folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flowgrpo_core.models.base import FlowAdapter

LORA_FILE = "pytorch_lora_weights.safetensors"
# what a run that evaluated during training adds: its records and which epoch was exported
# (``watch.ProxyGoldWatch.summary``), and their plot
HELDOUT_FILE = "heldout.json"
PROXY_GOLD_PLOT = "proxy_vs_gold.png"


def export_weights(adapter: FlowAdapter, directory: str | Path) -> None:
    """The adapter's trained weights into ``directory``: its LoRA in diffusers format, else the transformer."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if adapter.lora_adapter_name is not None:
        adapter.save_lora(directory)
    else:
        adapter.transformer.save_pretrained(directory / "transformer")


def policy_weights_dir(policy_dir: str | Path, ema: bool = True) -> Path:
    """The EMA weights when asked for and present (evaluation default, docs/algorithm.md sect. 8), else the final ones."""
    policy_dir = Path(policy_dir)
    if ema and (policy_dir / "ema").is_dir():
        return policy_dir / "ema"
    return policy_dir


def attach_policy(adapter: FlowAdapter, policy_dir: str | Path, ema: bool = True) -> Path:
    """Put the policy's weights on ``adapter`` so that ``adapter.reference_model()`` still gives the base.

    LoRA loads as adapter 'grpo' (disabling it gives the base); full weights replace the transformer after a
    frozen copy of the base is kept. Returns the folder the weights came from.
    """
    folder = policy_weights_dir(policy_dir, ema)
    if (folder / LORA_FILE).is_file():
        adapter.pipeline.load_lora_weights(str(folder), weight_name=LORA_FILE, adapter_name="grpo")
        adapter.lora_adapter_name = "grpo"
    elif (folder / "transformer").is_dir():
        adapter.keep_reference_copy()
        base = adapter.pipeline.transformer
        tuned = type(base).from_pretrained(folder / "transformer", dtype=base.dtype).to(base.device).eval()
        adapter.pipeline.register_modules(transformer=tuned)
    else:
        raise FileNotFoundError(f"{folder} holds no policy: expected {LORA_FILE} or a transformer/ folder")
    return folder


def read_heldout(policy_dir: str | Path) -> dict[str, Any] | None:
    """The policy's :data:`HELDOUT_FILE` (evaluations during training, the exported epoch), or None."""
    path = Path(policy_dir) / HELDOUT_FILE
    return json.loads(path.read_text()) if path.is_file() else None
