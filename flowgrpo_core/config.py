"""One config for the whole system (model, sampling, training, rewards, prompts, evaluation, tracking).

A config is a preset (``flowgrpo_core.presets``), optionally a YAML file on top, then ``--set a.b=value``
overrides. Unknown keys and invalid values fail at load time with the field's dotted path in the
message, before any model is loaded: a typo must never fall back to a default silently.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DType = Literal["float32", "float16", "bfloat16"]
# the pipeline components that encode prompts, in every supported family
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


class ConfigError(ValueError):
    """An invalid config; the message names the field."""


# fields that only one train.algorithm reads (the roll-out's SDE, the clipped ratio, the Gaussian KL, which
# samples are trained; NFT's guidance, KL, old-policy schedule and solver)
GRPO_ONLY_FIELDS = (
    "sampling.noise_level",
    "sampling.sde_type",
    "sampling.sde_window_size",
    "sampling.sde_window_range",
    "train.clip_range",
    "train.clip_range_low",
    "train.clip_range_high",
    "train.highclip_range",
    "train.beta",
    "train.kl_form",
    "train.zero_advantage",
    "train.ratio_norm",
    "train.ratio_norm_bias",
    "train.grad_reweight",
    "train.batch_reference_steps",
)
NFT_ONLY_FIELDS = (
    "train.nft_beta",
    "train.nft_kl_beta",
    "train.nft_decay_flat_steps",
    "train.nft_decay_rate",
    "train.nft_decay_max",
    "train.nft_solver",
)


class _Strict(BaseModel):
    # allow_inf_nan=False: no float setting means anything at nan or +-inf (a learning rate of inf gives an
    # all-NaN policy, a KL weight of inf skips every loss step, a reward weight of nan drops every reward;
    # "no limit" is a large finite number), so they are refused wherever a float sits, in tuples and dicts too
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Strict):
    # tiny:<sd3|flux|qwenimage>[@seed] (random weights, built locally), a diffusers folder, s3://bucket/prefix, or a hub id
    source: str = "tiny:sd3"
    # hub revision (branch, tag or commit); ignored for other sources
    revision: str | None = None
    # dtype of the frozen transformer weights; LoRA weights and all log-prob arithmetic stay float32
    dtype: DType = "float32"
    # dtype of the text encoders and of the VAE (empty: model.dtype). The reference keeps the transformer and
    # the VAE in float32, runs the transformer under autocast (train.mixed_precision) and the text encoders
    # in the autocast dtype
    text_encoder_dtype: DType | None = None
    vae_dtype: DType | None = None
    # keep the text encoders in CPU memory and encode prompts there (the embeddings move to the transformer's
    # device): frees their accelerator memory for the transformer, at the cost of encoding on the CPU
    text_encoders_on_cpu: bool = False

    def component_dtypes(self) -> dict[str, str]:
        """Per-component dtypes for the loader: ``{"default": dtype, "text_encoder": ..., "vae": ...}``."""
        out = {"default": self.dtype}
        if self.text_encoder_dtype:
            out |= {name: self.text_encoder_dtype for name in TEXT_ENCODERS}
        if self.vae_dtype:
            out["vae"] = self.vae_dtype
        return out


class SamplingConfig(_Strict):
    # image side in pixels; must be a multiple of the model's factor (VAE downsampling x patch size)
    resolution: int = Field(512, gt=0)
    # T: denoising steps of a training roll-out (Denoising Reduction: 10 instead of 40)
    num_steps: int = Field(10, ge=1)
    guidance_scale: float = Field(4.5, ge=0)
    negative_prompt: str = ""
    # T5 tokens of a prompt (the reference: 128)
    max_sequence_length: int = Field(128, ge=1)
    # `a` of the SDE: 0 turns every step into the ODE
    noise_level: float = Field(0.7, ge=0)
    sde_type: Literal["sde", "cps"] = "sde"
    # 0: every step is stochastic and trained (Flow-GRPO); k > 0: Flow-GRPO-Fast, k consecutive SDE steps
    sde_window_size: int = Field(0, ge=0)
    # where a Fast window may lie, as fractions of the schedule: steps [floor(start*T), floor(end*T))
    # (reference: the first half, steps 0 .. T//2)
    sde_window_range: tuple[float, float] = (0.0, 0.5)
    # G: images per prompt; advantages are relative to the group
    group_size: int = Field(24, ge=2)
    # prompts per epoch; images per epoch = group_size * groups_per_epoch
    groups_per_epoch: int = Field(48, ge=1)
    # images per forward pass, in sampling and in training (they must match for the first ratio to be 1)
    batch_size: int = Field(9, ge=1)

    @field_validator("sde_window_range")
    @classmethod
    def _window_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        lo, hi = value
        if not 0 <= lo < hi <= 1:
            raise ValueError("must satisfy 0 <= start < end <= 1")
        return value

    @model_validator(mode="after")
    def _window_fits(self) -> SamplingConfig:
        if self.sde_window_size:
            lo, hi = self.window_bounds()
            if hi - lo < self.sde_window_size:
                raise ValueError(
                    f"sde_window_size={self.sde_window_size} does not fit in steps [{lo}, {hi}) of num_steps={self.num_steps} "
                    f"given sde_window_range={self.sde_window_range}"
                )
        return self

    def window_bounds(self) -> tuple[int, int]:
        """Step indices [lo, hi) a Fast window may occupy, in whole steps as the reference counts them:
        ``floor(start * T) .. floor(end * T)``, so the default first half is ``0 .. T // 2``."""
        lo, hi = self.sde_window_range
        return math.floor(lo * self.num_steps), max(math.floor(hi * self.num_steps), 1)

    @property
    def images_per_epoch(self) -> int:
        return self.group_size * self.groups_per_epoch


class TrainConfig(_Strict):
    # the RL objective: 'grpo' (Flow-GRPO: SDE roll-outs, clipped likelihood ratios of their steps) or 'nft'
    # (DiffusionNFT: ODE roll-outs of a soft-updated old policy, a reward-weighted flow-matching loss on their
    # clean samples; docs/algorithm.md sect. 11). Fields only one of them reads are refused with the other
    algorithm: Literal["grpo", "nft"] = "grpo"
    epochs: int = Field(100, ge=0)
    seed: int = 42
    learning_rate: float = Field(3e-4, gt=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(1e-4, ge=0)
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    # gradient accumulation is derived so that each epoch makes this many optimiser steps (reference: 2)
    optimizer_steps_per_epoch: int = Field(2, ge=1)
    num_inner_epochs: int = Field(1, ge=1)
    # eps of the PPO clip on the importance ratio (log-probs are element means, hence the tiny value)
    clip_range: float = Field(1e-4, gt=0)
    # an asymmetric band: the ratio is clipped to [1 - clip_range_low, 1 + clip_range_high] (upstream's
    # clip_range_lt / clip_range_gt, which only its BAGEL trainer reads); unset: clip_range on that side
    clip_range_low: float | None = Field(None, gt=0)
    clip_range_high: float | None = Field(None, gt=0)
    # upstream's GRPO-Guard configs set `highclip_range` (equal to their clip_range), but no upstream script reads
    # it; offered as the upper width under that name (what clip_range_high does), off by default and in the presets
    highclip_range: float | None = Field(None, gt=0)
    adv_clip_max: float = Field(5.0, gt=0)
    # KL coefficient towards the base model (0 = no reference forward)
    beta: float = Field(0.04, ge=0)
    # 'reference': flow_grpo's scale, ||mean - mean_ref||^2 / (2 std_t^2), what the published betas were tuned
    # with; 'exact': the KL of the two step Gaussians (std_t^2 * (-dt) in the denominator, 1/(-dt) times larger)
    kl_form: Literal["exact", "reference"] = "reference"
    # share of the T steps trained in full Flow-GRPO (a Fast run trains its window)
    timestep_fraction: float = Field(0.99, gt=0, le=1)
    # normalise advantages by the std of the whole epoch instead of each group's
    global_std: bool = True
    # 0: per-prompt statistics are cleared every epoch (reference); n: keep each prompt's last n rewards
    stat_buffer_size: int = Field(0, ge=0)
    # samples whose advantage is 0 teach nothing but still count in the loss's mean. 'refill' (the reference's
    # SD3 scripts): drop them, then put back random ones until each rank's count is a multiple of its sampling
    # batches; 'drop': drop them all; 'keep' (the reference's FLUX scripts): train on every sample
    zero_advantage: Literal["refill", "drop", "keep"] = "refill"
    # shuffle the samples before splitting them into optimiser steps (the reference's full Flow-GRPO scripts);
    # off: in sampling order, as its Fast scripts do
    shuffle_samples: bool = True
    # LoRA on the attention projections; False = full fine-tuning (a frozen copy serves as reference)
    lora: bool = True
    lora_rank: int = Field(32, ge=1)
    lora_alpha: float = Field(64.0, gt=0)
    lora_init: Literal["gaussian", "default"] = "gaussian"
    # modules that get LoRA (peft target_modules); empty = the family's attention projections
    lora_target_modules: list[str] = Field(default_factory=list)
    ema: bool = True
    ema_decay: float = Field(0.9, ge=0, lt=1)
    ema_update_interval: int = Field(8, ge=1)
    # GRPO-Guard: per-step ratio normalisation and 1/(-dt) gradient reweighting (docs/algorithm.md sect. 6)
    ratio_norm: bool = False
    # RatioNorm's mean-shift term: 'batch' = one value per micro-batch, as the official GRPO-Guard script
    # computes it; 'sample' = each sample's own shift
    ratio_norm_bias: Literal["batch", "sample"] = "batch"
    grad_reweight: bool = False
    # the reference model's forwards for the KL: one per micro-batch over all its trained steps (faster; the same
    # bits on a CPU, rounding may differ on a GPU; K times the batch's activations), or one per step (upstream)
    batch_reference_steps: bool = True
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    # 0: plain torch optimiser (gradients all-reduced across ranks); 1, 2 or 3: DeepSpeed ZeRO stage 1/2/3 with
    # the same AdamW as a client optimiser, partitioning across ranks the optimiser state (1), also the
    # gradients (2), also the transformer's weights, frozen base and trainable alike (3)
    deepspeed_stage: int = Field(0, ge=0, le=3)
    # DeepSpeed's CPU offload: the optimiser state and its step on the CPU (stage 2 or 3), and the partitioned
    # weights in CPU memory between their uses (stage 3)
    offload_optimizer: bool = False
    offload_params: bool = False
    # save a resumable checkpoint every n epochs (and at the end); 0 = only at the end
    checkpoint_every: int = Field(1, ge=0)
    keep_checkpoints: int = Field(2, ge=1)
    device: str = "auto"
    # ---- DiffusionNFT (train.algorithm: nft); defaults: the authors' config/base.py and config/nft.py ----
    # beta, the guidance strength: the implicit policies are v_old +- beta (v_theta - v_old)
    nft_beta: float = Field(1.0, gt=0)
    # weight of NFT's KL to the base model, the element mean of (v_theta - v_ref)^2 (0: no reference forward)
    nft_kl_beta: float = Field(1e-4, ge=0)
    # the old (sampling) policy's soft update after every epoch, old <- d old + (1 - d) theta, with d = 0 for
    # the first nft_decay_flat_steps optimiser steps, then min(nft_decay_rate x (steps - flat), nft_decay_max);
    # the authors' decay_type 1 (GenEval, PickScore): 0, 0.001, 0.5; decay_type 2 (OCR): 75, 0.0075, 0.999
    nft_decay_flat_steps: int = Field(0, ge=0)
    nft_decay_rate: float = Field(1e-3, ge=0)
    nft_decay_max: float = Field(0.5, ge=0, le=1)
    # the noise-free solver of NFT's roll-outs: 'dpm2' (DPM-Solver++ 2M, the authors' choice) or 'euler'
    nft_solver: Literal["dpm2", "euler"] = "dpm2"
    # stop training when the reward-hacking monitor raises an alarm (needs eval.every_epochs and eval.metrics);
    # the exported policy is then the last one evaluated before the alarm
    stop_on_hacking: bool = False
    # export the policy of the evaluated epoch where this eval.metrics metric was best (its accuracy over tasks
    # for GenEval-type metrics, else its mean; needs eval.every_epochs); empty: the policy of the last epoch
    keep_best: str | None = None

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> TrainConfig:
        if self.offload_optimizer and self.deepspeed_stage < 2:
            raise ValueError(
                f"offload_optimizer: needs deepspeed_stage 2 or 3 (got {self.deepspeed_stage}); "
                "`flowgrpo plan` says which setting fits"
            )
        if self.offload_params and self.deepspeed_stage != 3:
            raise ValueError(
                f"offload_params: only ZeRO-3 partitions the weights it would offload; set deepspeed_stage: 3 "
                f"(got {self.deepspeed_stage})"
            )
        return self

    @model_validator(mode="after")
    def _one_upper_width(self) -> TrainConfig:
        high, alias = self.clip_range_high, self.highclip_range
        if high is not None and alias is not None and high != alias:
            raise ValueError(
                f"highclip_range: {alias:g} and clip_range_high: {high:g} both set the upper clip width; set one"
            )
        return self

    @property
    def uses_reference(self) -> bool:
        """Whether the objective has a KL term to the base model (which then needs a reference forward)."""
        return (self.beta if self.algorithm == "grpo" else self.nft_kl_beta) > 0

    def clip_bounds(self) -> tuple[float, float]:
        """``(low, high)``: the ratio is clipped to ``[1 - low, 1 + high]``; ``(clip_range, clip_range)`` unless
        an asymmetric width is set."""
        low = self.clip_range if self.clip_range_low is None else self.clip_range_low
        high = next(
            (w for w in (self.clip_range_high, self.highclip_range) if w is not None), self.clip_range
        )
        return low, high


class PromptsConfig(_Strict):
    # builtin:<name>, or a .txt (one prompt per line) / .jsonl ({"prompt", "metadata"}) / .parquet file
    train: str = "builtin:animals"
    eval: str = "builtin:animals"
    # draw each epoch's training prompts evenly over their metadata 'tag' (GenEval's tasks) instead of uniformly
    balance_tags: bool = False


class EvalConfig(_Strict):
    num_steps: int = Field(40, ge=1)
    guidance_scale: float = Field(4.5, ge=0)
    num_prompts: int = Field(32, ge=1)
    images_per_prompt: int = Field(1, ge=1)
    # more images for the prompts of tasks with few prompts, so every task has at least this many (GenEval's
    # overall accuracy is a mean over tasks; a task with one prompt would make it noisy)
    min_images_per_tag: int = Field(0, ge=0)
    batch_size: int = Field(8, ge=1)
    seed: int = 0
    # rewards evaluated on base and policy images besides the training reward; during training, the gold
    # metrics that the training reward (the proxy) is watched against
    metrics: list[str] = Field(default_factory=list)
    # every N epochs, evaluate the policy on held-out prompts as this stage does (and once before training):
    # the proxy and every gold metric with their standard errors, logged with step = epochs trained; 0 = never
    every_epochs: int = Field(0, ge=0)
    # those evaluations use the first N prompts of prompts.eval (empty: eval.num_prompts), with this section's
    # images per prompt, steps, guidance and seed
    during_training_prompts: int | None = Field(None, ge=1)
    # the reward-hacking monitor: an alarm when, from the evaluation `hacking_window` evaluations back to the
    # latest, the proxy rose while a gold metric fell by more than `hacking_standard_errors` standard errors
    hacking_window: int = Field(2, ge=1)
    hacking_standard_errors: float = Field(2.0, gt=0)

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, value: list[str]) -> list[str]:
        from flowgrpo_core.rewards import REWARD_NAMES

        for name in value:
            if name not in REWARD_NAMES:
                raise ValueError(f"unknown reward {name!r}; known: {', '.join(sorted(REWARD_NAMES))}")
        return value


class CalibrationConfig(_Strict):
    epochs: int = Field(2, ge=1)
    # a reward whose share of zero-variance groups reaches this teaches nothing
    max_zero_variance_share: float = Field(0.9, gt=0, le=1)


class ServingConfig(_Strict):
    # 'process': each reward runs as its own HTTP server: a child process locally, and a Kubernetes
    # Deployment + Service in a pipeline compiled for a cluster (a child process would die with its step's
    # pod); 'kubernetes': always a Deployment + Service (the trainer must run in the cluster to reach it);
    # 'inline': computed in the trainer's process
    mode: Literal["process", "inline", "kubernetes"] = "process"
    # interface local reward servers bind; 127.0.0.1 unless other machines must reach them
    host: str = "127.0.0.1"
    startup_timeout_s: float = Field(600.0, gt=0)
    # extra `flowgrpo serve-reward` arguments per reward, e.g. {pickscore: [--dtype, float16]}
    server_args: dict[str, list[str]] = Field(default_factory=dict)
    # on Kubernetes: namespace of the reward Deployments (empty: the namespace the pipeline step runs in)
    namespace: str = ""
    # on Kubernetes: reward images are <image_registry>/flowgrpo-<family>:<image_tag> (recipes in images/;
    # empty tag: the project's version); `images` replaces the image of a family, e.g. {reward-clip: my/img:1}
    image_registry: str = "ghcr.io/flowgrpo"
    image_tag: str = ""
    images: dict[str, str] = Field(default_factory=dict)
    # on Kubernetes: GPUs of each reward server that runs a neural network (0: they run on CPUs)
    gpus_per_server: int = Field(1, ge=0)

    @field_validator("server_args")
    @classmethod
    def _known_servers(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        from flowgrpo_core.rewards import REWARD_NAMES

        for name in value:
            if name not in REWARD_NAMES:
                raise ValueError(f"unknown reward {name!r}; known: {', '.join(sorted(REWARD_NAMES))}")
        return value

    @field_validator("images")
    @classmethod
    def _known_images(cls, value: dict[str, str]) -> dict[str, str]:
        from flowgrpo_core.cluster.images import RECIPES, TRAINER

        for family in value:
            if family not in RECIPES or family == TRAINER:
                known = ", ".join(r for r in RECIPES if r != TRAINER)
                raise ValueError(f"unknown reward image family {family!r}; known: {known}")
        return value


class TrackingConfig(_Strict):
    # (the tracking URI and the experiment are pipeline parameters: `flowgrpo run --tracking-uri --experiment`)
    run_name: str | None = None
    # registered model; default: flowgrpo-<family>
    registered_model: str | None = None
    # the gate that moves the 'champion' alias: the metric must beat the champion's (or, with no champion,
    # the base model's) by more than the margin
    gate_metric: str = "eval/policy/reward_mean"
    gate_margin: float = 0.0
    # k > 0: the gain must also exceed k standard errors of the difference, from the evaluation's
    # '<gate_metric>_se' (GenEval-style accuracies log one), so a model is not promoted on noise
    gate_standard_errors: float = Field(0.0, ge=0)


class FlowGRPOConfig(_Strict):
    preset: str = "custom"
    model: ModelConfig = Field(default_factory=ModelConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    # {reward name: weight}; the trained reward is the weighted sum
    rewards: dict[str, float] = Field(default_factory=lambda: {"jpeg_compressibility": 1.0})
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("rewards")
    @classmethod
    def _known_rewards(cls, value: dict[str, float]) -> dict[str, float]:
        from flowgrpo_core.rewards import REWARD_NAMES

        if not value:
            raise ValueError("at least one reward is needed")
        for name in value:
            if name not in REWARD_NAMES:
                raise ValueError(f"unknown reward {name!r}; known: {', '.join(sorted(REWARD_NAMES))}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> FlowGRPOConfig:
        from flowgrpo_core.models.loading import resolution_factor

        factor = resolution_factor(self.model.source)
        if self.sampling.resolution % factor:
            raise ConfigError(
                f"sampling.resolution: {self.sampling.resolution} is not divisible by the model's factor {factor} "
                f"(VAE downsampling x patch size of {self.model.source})"
            )
        if self.sampling.images_per_epoch % self.sampling.batch_size:
            raise ConfigError(
                f"sampling.batch_size: {self.sampling.batch_size} must divide group_size x groups_per_epoch = "
                f"{self.sampling.images_per_epoch}"
            )
        if self.train.ratio_norm and self.sampling.sde_type != "sde":
            raise ConfigError("train.ratio_norm: GRPO-Guard's RatioNorm is defined for sde_type 'sde' only")
        self._check_watch()
        self._check_algorithm()
        tr = self.tracking
        if tr.gate_standard_errors and not tr.gate_metric.endswith("/accuracy/overall"):
            raise ConfigError(
                f"tracking.gate_standard_errors: needs a gate metric with a standard error, an "
                f"'eval/policy/<metric>/accuracy/overall' accuracy; got tracking.gate_metric={tr.gate_metric!r}"
            )
        return self

    def _check_algorithm(self) -> None:
        """A field that only the other algorithm reads would be silently ignored: refuse it, naming the field,
        when it differs from its baseline. The baseline is the preset's value when the preset is of the other
        algorithm (``--preset tiny --set train.algorithm=nft`` keeps tiny's unused GRPO settings), else the
        field's default."""
        from flowgrpo_core.presets import PRESETS

        ours = self.train.algorithm
        if ours == "nft" and self.train.deepspeed_stage == 3:
            # the old policy is swapped into whole parameters, which ZeRO-3 keeps as per-rank slices
            raise ConfigError(
                "train.deepspeed_stage: 3 is not supported with train.algorithm=nft (its old policy is copied into "
                "whole weights, which ZeRO-3 partitions); use deepspeed_stage 0-2"
            )
        ignored = NFT_ONLY_FIELDS if ours == "grpo" else GRPO_ONLY_FIELDS
        preset = PRESETS.get(self.preset, (None, {}))[1]
        baseline = preset if preset.get("train", {}).get("algorithm", "grpo") != ours else {}
        data = self.model_dump(mode="json")
        for name in ignored:
            section, field = name.split(".")
            default = type(self).model_fields[section].default_factory().model_dump(mode="json")[field]
            expected = baseline.get(section, {}).get(field, default)
            value = data[section][field]
            if value != (list(expected) if isinstance(expected, tuple) else expected):
                raise ConfigError(
                    f"{name}: {value!r} is read only by train.algorithm={'nft' if ours == 'grpo' else 'grpo'}; "
                    f"with train.algorithm={ours} it would be ignored (leave it at {expected!r})"
                )

    def _check_watch(self) -> None:
        """Evaluation during training, the hacking monitor and keep-best refer to each other: refuse what
        could never take effect, naming the field."""
        e, t = self.eval, self.train
        if e.every_epochs > t.epochs:
            raise ConfigError(
                f"eval.every_epochs: {e.every_epochs} is larger than the run (train.epochs={t.epochs}): the policy "
                "would never be evaluated during training"
            )
        for field, wanted in (
            ("train.keep_best", t.keep_best is not None),
            ("train.stop_on_hacking", t.stop_on_hacking),
        ):
            if wanted and not e.every_epochs:
                raise ConfigError(f"{field}: needs evaluations during training, eval.every_epochs > 0")
        if t.keep_best is not None and t.keep_best not in e.metrics:
            raise ConfigError(
                f"train.keep_best: {t.keep_best!r} is not evaluated; it must be one of eval.metrics {e.metrics}"
            )
        if t.stop_on_hacking and not e.metrics:
            raise ConfigError("train.stop_on_hacking: needs a gold metric to watch, in eval.metrics")
        if t.stop_on_hacking and t.epochs // e.every_epochs < e.hacking_window:
            raise ConfigError(
                f"train.stop_on_hacking: {t.epochs // e.every_epochs} evaluations after the base's are fewer than "
                f"eval.hacking_window={e.hacking_window}: the monitor could never raise an alarm"
            )

    # ---- derived quantities (the batch arithmetic the trainer prints) ----

    @property
    def batches_per_epoch(self) -> int:
        return self.sampling.images_per_epoch // self.sampling.batch_size

    @property
    def trained_steps_per_sample(self) -> int:
        """Full Flow-GRPO trains the first ``int(T * timestep_fraction)`` steps; Fast trains its whole window;
        NFT trains ``int(T * timestep_fraction)`` noise levels of the schedule, drawn per sample."""
        if self.sampling.sde_window_size and self.train.algorithm == "grpo":
            return self.sampling.sde_window_size
        return max(1, int(self.sampling.num_steps * self.train.timestep_fraction))

    def describe(self) -> str:
        s, t = self.sampling, self.train
        return (
            f"{s.groups_per_epoch} prompts x {s.group_size} images = {s.images_per_epoch} images/epoch in "
            f"{self.batches_per_epoch} batches of {s.batch_size}; {self.trained_steps_per_sample} of {s.num_steps} steps "
            f"trained per image; {t.optimizer_steps_per_epoch} optimiser step(s)/epoch; "
            f"{self._rollout_description()}"
        )

    def _rollout_description(self) -> str:
        s, t = self.sampling, self.train
        if t.algorithm == "nft":
            return f"DiffusionNFT: {t.nft_solver} ODE roll-outs of the old policy, beta {t.nft_beta:g}"
        return f"Flow-GRPO-Fast window {s.sde_window_size}" if s.sde_window_size else "SDE on every step"

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, for MLflow params."""
        return flatten(self.model_dump(mode="json"))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def override(self, *texts: str) -> FlowGRPOConfig:
        """A validated copy with ``section.field=value`` overrides applied."""
        data = self.model_dump(mode="json")
        for text in texts:
            keys, value = parse_override(text)
            _set_path(data, keys, value)
        return validate(data, f"preset {self.preset!r} with overrides")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key != "rewards":
            out.update(flatten(value, path + "."))
        elif isinstance(value, dict):
            for name, weight in value.items():
                out[f"{path}.{name}"] = weight
        else:
            out[path] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'train.beta=0'`` -> ``(['train', 'beta'], 0)``; the value is read as YAML (numbers, bools, lists)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"malformed override {text!r}: expected section.field=value, e.g. train.beta=0")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({error})") from error
    return key.split("."), value


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part!r} is not a section")
        node = child
    node[path[-1]] = value


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if key == "rewards":  # a reward mix replaces, never merges: {ocr: 1} must not keep the preset's jpeg
            out[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def validate(data: dict[str, Any], origin: str = "config") -> FlowGRPOConfig:
    try:
        return FlowGRPOConfig.model_validate(data)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            where = ".".join(str(p) for p in item["loc"]) or "(root)"
            message = item["msg"].removeprefix("Value error, ")
            if item["type"] == "extra_forbidden":
                message = "unknown key (check the spelling; see `flowgrpo presets`)"
            problems.append(f"{where}: {message}" if item["loc"] else message)
        raise ConfigError(f"invalid {origin}:\n  " + "\n  ".join(problems)) from None
    except ConfigError as error:
        raise ConfigError(f"invalid {origin}: {error}") from None


def load_config(
    preset: str | None = "tiny", file: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> FlowGRPOConfig:
    """preset -> YAML file -> ``key=value`` overrides -> validated config."""
    data: dict[str, Any] = _preset_data(preset) if preset else {}
    origin = f"preset {preset!r}" if preset else "config"
    if file is not None:
        path = Path(file)
        try:
            loaded = yaml.safe_load(read_config_text(path)) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from error
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
        data = _deep_merge(data, loaded)
        origin = f"{origin} + {path}"
    for text in overrides:
        keys, value = parse_override(text)
        _set_path(data, keys, value)
    if overrides:
        origin = f"{origin} with overrides"
    return validate(data, origin)


# a config file is a few KiB; anything far larger is a wrong file, and the pure-Python YAML parser would take
# minutes over it
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_LINE_BYTES = 64 << 10


def read_config_text(path: Path) -> str:
    """The text of a YAML config file, refused quickly, naming the file (and line), when it is missing, not
    a regular file, over ``MAX_CONFIG_BYTES`` or ``MAX_CONFIG_LINE_BYTES`` a line, or not UTF-8."""
    where = f"config file {str(path)!r}"
    if path.is_dir():
        raise ConfigError(f"{where} is a directory, expected a file")
    if not path.exists():
        raise ConfigError(f"{where} does not exist")
    if not path.is_file():  # a FIFO or a device would block or never end
        raise ConfigError(f"{where} is not a regular file")
    try:
        with path.open("rb") as stream:
            data = stream.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise ConfigError(f"{where} cannot be read: {error.strerror or error}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where} is larger than {MAX_CONFIG_BYTES} bytes; a config is a few KiB")
    for number, line in enumerate(data.split(b"\n"), start=1):
        if len(line) > MAX_CONFIG_LINE_BYTES:
            raise ConfigError(f"{where}, line {number}: longer than {MAX_CONFIG_LINE_BYTES} bytes")
    data = data.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark some editors write
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ConfigError(
            f"{where}, line {line}: not UTF-8 text (byte 0x{data[error.start]:02x}); save the file as UTF-8"
        ) from None


def _preset_data(name: str) -> dict[str, Any]:
    """A deep copy of the preset's overrides, tagged with its name."""
    from flowgrpo_core.presets import PRESETS

    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    data = copy.deepcopy(PRESETS[name][1])
    data["preset"] = name
    return data
