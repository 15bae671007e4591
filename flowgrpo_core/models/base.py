"""The one interface through which the sampler and the trainer see a flow-matching text-to-image model.

An adapter wraps a diffusers pipeline and exposes four things: encode prompts, draw initial noise,
predict the (guided) velocity at a noise level, and decode latents to images. Sampling and training both
call :meth:`FlowAdapter.predict_velocity`, so the log-probs recorded during roll-outs and the ones
recomputed during training come from the same computation (docs/algorithm.md sect. 4: any difference in the
forward path makes the first importance ratio drift from 1).

Latents live in the adapter's own layout (SD3: (B, C, h, w); FLUX, Qwen-Image: packed (B, h*w/4, 4C)); the
sampler never looks inside them.
"""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

# the pipeline components that encode prompts, in every supported family
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


class ModelSourceError(ValueError):
    """A model source that cannot be resolved or loaded; the message names the source."""


@dataclass
class Conditioning:
    """Text conditioning of B prompts: named tensors whose first dimension is the batch.

    The keys are the adapter's business (SD3: ``embeds, pooled, neg_embeds, neg_pooled``; Qwen-Image:
    ``embeds, mask, neg_embeds, neg_mask``). The second dimension of a tensor of rank >= 2 is its token axis.
    """

    tensors: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def select(self, index: torch.Tensor | slice | Sequence[int]) -> Conditioning:
        return Conditioning({k: v[index] for k, v in self.tensors.items()})

    def to(self, device: torch.device | str) -> Conditioning:
        return Conditioning({k: v.to(device) for k, v in self.tensors.items()})

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        """The batches one after the other. Token axes of different lengths (prompts encoded in different
        batches of a variable-length text encoder) are zero-padded to the longest: embeddings with zeros,
        masks with 0 (padding), as the pipelines pad a batch. Fixed-length families never differ: plain cat."""
        out = {}
        for key in items[0].tensors:
            parts = [c.tensors[key] for c in items]
            if parts[0].ndim >= 2:
                length = max(p.shape[1] for p in parts)
                parts = [pad_tokens(p, length) for p in parts]
            out[key] = torch.cat(parts)
        return Conditioning(out)


def pad_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    """(B, L, ...) -> (B, length, ...) with zeros after the L tokens (``x`` itself when L == length)."""
    missing = length - x.shape[1]
    if missing == 0:
        return x
    return torch.cat([x, x.new_zeros(x.shape[0], missing, *x.shape[2:])], dim=1)


def valid_length(mask: torch.Tensor) -> int:
    """1 + the last token column valid in some row of ``mask`` (B, L) bool (L when none is): the length a batch
    of right-padded sequences can be trimmed to, whatever longer batches it was padded with."""
    used = mask.any(dim=0).nonzero()
    return int(used[-1]) + 1 if len(used) else mask.shape[1]


def per_image_noise(
    generators: Sequence[torch.Generator], shape: Sequence[int], device: torch.device
) -> torch.Tensor:
    """(B, *shape) float32 standard normal noise, each image's drawn from its own generator."""
    return torch.stack([torch.randn(tuple(shape), generator=g, device=g.device) for g in generators]).to(
        device
    )


# The joint-attention projections of MMDiT blocks (image stream, then text stream) that receive LoRA
# (docs/algorithm.md sect. 4); SD3 and FLUX name them alike. Qualified by ``attn.`` as the reference names
# them: SD3.5-Medium's second image attention (``attn2``) gets no LoRA.
JOINT_ATTENTION_PROJECTIONS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)
# The feed-forward layers of MMDiT blocks (image stream, then text stream); the reference's FLUX LoRA adds them.
JOINT_FEED_FORWARDS = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")


class FlowAdapter(ABC):
    """A flow-matching text-to-image model: ``v = model(x_sigma, sigma, text)``, ``x_sigma = (1-sigma) x0 + sigma noise``."""

    family: str = ""
    #: the modules that receive LoRA when a config names none (the reference's choice for the family)
    lora_target_modules: tuple[str, ...] = ()
    #: LoRA target names are written in SD3/FLUX's MMDiT vocabulary (``ff.net.2``, ``ff_context.net.2``); a
    #: family that names the same layers otherwise maps them here, so a preset's targets fit every family (to
    #: several names, or to none where the family has no such layer to train)
    lora_target_aliases: ClassVar[dict[str, str | tuple[str, ...]]] = {}
    #: guidance above 1 runs the negative prompt through the same forward, doubling its batch (true CFG)
    true_cfg: ClassVar[bool] = True

    def __init__(self, pipeline, source: str = "", revision: str | None = None) -> None:
        self.pipeline = pipeline
        self.source = source
        self.revision = revision
        self.lora_adapter_name: str | None = None
        self._reference_copy: nn.Module | None = None
        self._active: nn.Module | None = None  # set while the reference copy stands in
        # What training forwards go through when a wrapper owns the module (a DeepSpeed engine, whose forward
        # does per-micro-step bookkeeping its backward relies on); set by the trainer.
        self.training_wrapper: nn.Module | None = None
        # the transformer's weights are partitioned across ranks (DeepSpeed ZeRO-3); set by the trainer
        self.partitioned = False
        # the text encoders stay in CPU memory and encode there, whatever device the rest is moved to
        self.text_encoders_on_cpu = False
        # (negative prompt, max tokens, device) -> its encoding; the text encoders are never trained
        self._negative_cache: dict[tuple, tuple[torch.Tensor, ...]] = {}
        self._lora_layer_cache: list[nn.Module] | None = None  # filled on first use, after add_lora
        self._sigma_cache: dict[tuple[int, int, int], torch.Tensor] = {}

    # ---- what each family defines ----

    @abstractmethod
    def encode_prompts(
        self, prompts: Sequence[str], negative_prompt: str, guidance_scale: float, max_sequence_length: int
    ) -> Conditioning:
        """Text embeddings for B prompts (and the negative prompt when CFG is used)."""

    @abstractmethod
    def initial_noise(self, generators: Sequence[torch.Generator], height: int, width: int) -> torch.Tensor:
        """(B, *latent_shape) float32 standard normal noise, one generator per sample."""

    @abstractmethod
    def predict_velocity(
        self,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        cond: Conditioning,
        guidance_scale: float,
        height: int,
        width: int,
    ) -> torch.Tensor:
        """Guided velocity.

        Args:
            latents: (B, *latent_shape) x at ``sigma``.
            sigma: (B,) per-sample noise levels in [0, 1].
            cond: conditioning of the same B samples.
        Returns:
            (B, *latent_shape) in the model's dtype (or float32, where the guidance is combined in float32).
        """

    @abstractmethod
    def _vae_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Latents in the adapter layout -> the VAE's layout ((B, C, h, w); Qwen-Image: (B, C, 1, h, w))."""

    @abstractmethod
    def _schedule(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        """(num_steps + 1,) float32 decreasing noise levels from 1 to 0, as the family's pipeline uses them."""

    def sigmas(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        """(num_steps + 1,) float32 noise levels of a roll-out (the family's schedule, computed once per size)."""
        key = (num_steps, height, width)
        if key not in self._sigma_cache:
            self._sigma_cache[key] = self._schedule(num_steps, height, width)
        return self._sigma_cache[key].clone()

    @property
    @abstractmethod
    def resolution_factor(self) -> int:
        """Image sides must be multiples of this (VAE downsampling x patch size)."""

    # ---- shared ----

    @property
    def transformer(self) -> nn.Module:
        return self._active if self._active is not None else self.pipeline.transformer

    @property
    def denoiser(self) -> nn.Module:
        """The module to call: the training wrapper for forwards that build a graph, else the transformer."""
        if self._active is None and self.training_wrapper is not None and torch.is_grad_enabled():
            return self.training_wrapper
        return self.transformer

    def inference(self) -> contextlib.AbstractContextManager:
        """The context of forwards that need no graph: ``torch.inference_mode``, or ``torch.no_grad`` when the
        weights are partitioned. ZeRO-3 gathers a layer's weights into fresh tensors and leaves placeholders
        when it frees them; made under inference mode, those could never again enter a training graph."""
        return torch.no_grad() if self.partitioned else torch.inference_mode()

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def text_device(self) -> torch.device:
        """Where prompts are encoded: the CPU with :attr:`text_encoders_on_cpu`, else the transformer's device.
        The families move the embeddings to the transformer's device."""
        return torch.device("cpu") if self.text_encoders_on_cpu else self.device

    def to(self, device: torch.device | str) -> FlowAdapter:
        if not self.text_encoders_on_cpu:
            self.pipeline.to(device)
            return self
        # component by component: the encoders never pass through the accelerator's memory
        for name, module in self.pipeline.components.items():
            if isinstance(module, nn.Module):
                module.to("cpu" if name in TEXT_ENCODERS else device)
        return self

    def check_resolution(self, height: int, width: int) -> None:
        factor = self.resolution_factor
        if height % factor or width % factor:
            raise ValueError(
                f"resolution {height}x{width} is not divisible by the {self.family} model's factor {factor}"
            )

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, *latent_shape) -> (B, 3, H, W) float32 images in [0, 1]."""
        vae = self.pipeline.vae
        images = self._vae_decode(self._vae_latents(latents, height, width).to(vae.dtype))
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def _vae_decode(self, x: torch.Tensor) -> torch.Tensor:
        """VAE latents (as :meth:`_vae_latents` lays them out) -> (B, 3, H, W) images in [-1, 1]; a KL VAE's
        latents are scaled by ``scaling_factor`` and shifted by ``shift_factor``."""
        vae = self.pipeline.vae
        x = x / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return vae.decode(x, return_dict=False)[0]

    # ---- LoRA and the reference model ----

    @classmethod
    def peft_targets(cls, target_modules: Sequence[str] | None = None) -> list[str]:
        """The peft suffixes ``target_modules`` (default: the family's) select, aliases translated, each once
        (shared by :meth:`add_lora` and the memory plan, so that the plan counts what peft attaches)."""
        targets: list[str] = []
        for name in target_modules or cls.lora_target_modules:
            alias = cls.lora_target_aliases.get(name, name)
            targets += [alias] if isinstance(alias, str) else alias
        return list(dict.fromkeys(targets))

    def add_lora(
        self, rank: int, alpha: float, init: str = "gaussian", target_modules: Sequence[str] | None = None
    ) -> None:
        """Freeze the transformer and attach a trainable LoRA adapter named 'grpo' to ``target_modules``
        (peft suffixes, translated by :attr:`lora_target_aliases`; default: the family's)."""
        from peft import LoraConfig

        self.transformer.requires_grad_(False)
        targets = self.peft_targets(target_modules)
        if not targets:
            raise ValueError(f"LoRA targets {list(target_modules or [])} select no {self.family} module")
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            init_lora_weights=init,
            target_modules=targets,
        )
        self.transformer.add_adapter(config, adapter_name="grpo")
        self.lora_adapter_name = "grpo"
        self._lora_layer_cache = None

    @classmethod
    def fully_trained(cls, name: str) -> bool:
        """Whether full fine-tuning trains the transformer's parameter ``name`` (all of them by default)."""
        return True

    def unfreeze(self) -> None:
        """Full fine-tuning: make the weights the family trains trainable (:meth:`fully_trained`)."""
        for name, param in self.transformer.named_parameters():
            param.requires_grad_(self.fully_trained(name))

    def keep_reference_copy(self) -> None:
        """For full fine-tuning with a KL term: freeze a copy of the base transformer before training."""
        import copy

        self._reference_copy = copy.deepcopy(self.pipeline.transformer).requires_grad_(False).eval()

    @contextlib.contextmanager
    def reference_model(self) -> Iterator[None]:
        """The base model for the KL term: with LoRA, the same weights with the adapter switched off (no
        second copy in memory); with full fine-tuning, the frozen copy."""
        if self.lora_adapter_name is not None:
            # Flip peft's switch directly: its disable/enable_adapters() also toggles requires_grad on the LoRA
            # weights, which re-creates their gradient accumulators and detaches the hooks DeepSpeed's ZeRO-2
            # reduces gradients with (and costs a set_adapter per training step).
            layers = self._lora_layers()
            for layer in layers:
                layer._disable_adapters = True
            try:
                yield
            finally:
                for layer in layers:
                    layer._disable_adapters = False
        elif self._reference_copy is not None:
            self._active = self._reference_copy
            try:
                yield
            finally:
                self._active = None
        else:
            raise RuntimeError("no reference model: add LoRA or call keep_reference_copy() before training")

    def _lora_layers(self) -> list[nn.Module]:
        """peft's LoRA layers of the transformer, found once (walking the module tree costs more than a
        tiny model's forward)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        if self._lora_layer_cache is None:
            self._lora_layer_cache = [m for m in self.transformer.modules() if isinstance(m, BaseTunerLayer)]
        return self._lora_layer_cache

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """LoRA weights in the diffusers/peft key format (``...to_q.lora_A.weight``)."""
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.transformer, adapter_name=self.lora_adapter_name or "grpo")

    def save_lora(self, directory: str | os.PathLike) -> None:
        """Write ``pytorch_lora_weights.safetensors`` loadable by the pipeline's ``load_lora_weights``.

        The adapter config (rank, alpha, targets) travels in the file's metadata: without it a loader
        assumes alpha = rank and applies the LoRA at the wrong scale.
        """
        name = self.lora_adapter_name or "grpo"
        type(self.pipeline).save_lora_weights(
            str(directory),
            transformer_lora_layers=self.lora_state_dict(),
            transformer_lora_adapter_metadata=self.transformer.peft_config[name].to_dict(),
        )
