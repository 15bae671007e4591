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

__all__ = [
    "calibrate_rewards",
    "download_model",
    "evaluate",
    "launch_reward_servers",
    "register_model",
    "stop_reward_servers",
    "train_grpo",
]
