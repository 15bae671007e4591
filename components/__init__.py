"""KFP components, one per stage: thin shims that turn artifacts into paths and call flowgrpo_core.stages.

Rules that keep them runnable under kfp.local.SubprocessRunner and on a cluster: imports inside the
function body, ``base_image`` always the project's image, no ``from __future__ import annotations``.
Every component takes the same pipeline parameters (preset, overrides, model source/revision, tracking
URI, experiment, work folder, KFP run id) and rebuilds the resolved config from them.
"""

from components.calibrate_rewards import calibrate_rewards
from components.download_model import download_model
from components.evaluate import evaluate
from components.launch_reward_servers import launch_reward_servers, stop_reward_servers
from components.register_model import register_model
from components.train_grpo import train_grpo
from flowgrpo_core.stages.common import PARAMETER_DESCRIPTIONS

# the inputs that pass artifacts and values between steps, as the compiled YAML describes them
ARTIFACT_DESCRIPTIONS = {
    "model": "the base model: a diffusers folder with manifest.json (download_model)",
    "family": "the base model's family: sd3, flux or qwenimage (download_model)",
    "endpoints": "the reward servers, {name: {url, weight}} JSON (launch_reward_servers)",
    "calibration": "the reward calibration; training refuses to start unless it passed (calibrate_rewards)",
    "policy": "the trained policy: LoRA or full weights, EMA, resolved config, metric history (train_grpo)",
    "evaluation": "base vs policy metrics, JSON (evaluate)",
}


def _describe(component) -> None:
    """Descriptions of a component's inputs for the compiled YAML, from the one table of each kind (KFP
    reads them from ``component_spec``, which it turns into the YAML at compile time)."""
    for name, spec in component.component_spec.inputs.items():
        spec.description = spec.description or PARAMETER_DESCRIPTIONS.get(name) or ARTIFACT_DESCRIPTIONS[name]


STAGES = (
    download_model,
    launch_reward_servers,
    calibrate_rewards,
    train_grpo,
    evaluate,
    register_model,
    stop_reward_servers,
)
for _component in STAGES:
    _describe(_component)

__all__ = [
    "calibrate_rewards",
    "download_model",
    "evaluate",
    "launch_reward_servers",
    "register_model",
    "stop_reward_servers",
    "train_grpo",
]
