"""Will a run fit its GPUs? Accelerator memory per GPU, estimated before anything loads (``flowgrpo plan``).

Pure arithmetic over a model's shape (:class:`ModelShape`: parameter counts and sizes read from the model's
architecture by ``models.sizes``) and a run's settings (:class:`RunSettings`). With N ranks, P_b the frozen
base's parameters, P_t the trained ones (the LoRA, or what full fine-tuning trains: the whole transformer,
Bagel's generation expert), per GPU:

    frozen weights     P_b x b_w               / N under ZeRO-3; 0 with offload_params
    trainable weights  P_t x 4 (float32)       / N under ZeRO-3; 0 with offload_params
    gradients          P_t x 4                 / N from ZeRO-2;  0 with offload_optimizer
    optimiser states   P_t x 8 (AdamW m, v)    / N from ZeRO-1;  0 with offload_optimizer
                       (+ P_t x 4 float32 master weights when DeepSpeed runs in bf16/fp16: it casts the
                       module to 16 bits, the trainable weights then take 2 bytes, and so do the frozen ones)
    EMA                P_t x 4, whole on every rank
    reference copy     full fine-tuning with a KL: a frozen whole copy of the base
    text encoders      their parameters x their dtype's bytes (0 with model.text_encoders_on_cpu)
    VAE                its parameters x its dtype's bytes
    ZeRO-3 gathering   the two largest blocks' weights whole (the one running and the one prefetched)

plus the larger of the two phases' working memory:

    sampling           B_f x S x W x ``SAMPLE_FACTOR`` x b_a (one forward without a graph), and the VAE
                       decoding B x H x W x C_vae x ``VAE_FACTOR`` x b_vae
    training           B_f x S x W x (L x ``TRAIN_FACTOR`` + ``BACKWARD_FACTOR``) x b_a without activation
                       checkpointing; B_f x S x W x (L + ``TRAIN_FACTOR`` + ``BACKWARD_FACTOR``) x b_a with it
                       (each block's input kept, one block recomputed at a time)

B_f is the batch a forward sees (the sampling batch, twice with true CFG), S the tokens of one sample (image
plus text), W the token width, L the blocks, b_* bytes per element. The factors are how many W-wide values
per token a block keeps for backward / holds at once without a graph / the gradient flowing back holds,
and the values per output pixel and full-resolution channel the VAE decoder holds at once. They depend on
the family's block design and were calibrated against measured peaks on the CPU (``benchmarks/memory_plan.py``,
README "Memory plan"; ``tests/test_memory_plan.py`` re-measures them). Allocator fragmentation and the CUDA
context are not modelled: ``HEADROOM`` of the GPU is kept free.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

GiB = float(1 << 30)
# Calibrated 2026-12-03 with benchmarks/memory_plan.py (float32 on the CPU; torch's fused attention kernels,
# on the CPU as on GPUs, keep no tokens x tokens matrix). W-wide values per token and block kept for backward (norms, q/k/v,
# the attention's output, the MLP's 4W hidden before and after its activation, residuals, for the image and
# the text stream): SD3 11.5-12.1 (tiny and a 74M-parameter SD3 at 64-256 px); FLUX 18.4 and Qwen-Image 24.7
# (tiny models only: their single-stream blocks and rotary embeddings keep more); Bagel 18.8 (tiny, calibrated
# 2026-12-03 like the others: its MoT layers run the image tokens through the generation expert only, and its
# prompts are trimmed to the batch's longest, so the factor also absorbs the text tokens the plan counts up to
# max_sequence_length but a short prompt does not bring: with long prompts it errs on the safe side)
TRAIN_FACTOR = {"sd3": 12.0, "flux": 18.0, "qwenimage": 25.0, "bagel": 19.0}
# the gradient flowing back through a block while it runs backward
BACKWARD_FACTOR = 3.0
# W-wide values per token live at the peak of a forward without a graph: SD3 8.8-9.6 (74M) and 11.5 (tiny),
# FLUX 15.3, Qwen-Image 18.6, Bagel 14.2 (tiny)
SAMPLE_FACTOR = {"sd3": 10.0, "flux": 15.0, "qwenimage": 18.0, "bagel": 14.0}
# values per output pixel and full-resolution channel at the VAE decoder's peak: the KL VAE of SD3 and FLUX
# 5.7-6.0; Qwen-Image's causal 3-D VAE (its decoder caches the previous frame's features) 12.8. Bagel's is
# FLUX.1's autoencoder, so FLUX's factor (the tiny Bagel's VAE, one width at every level, peaks at 4.7)
VAE_FACTOR = {"sd3": 6.0, "flux": 6.0, "qwenimage": 13.0, "bagel": 6.0}
# share of a GPU not planned for: the CUDA context, NCCL buffers, the caching allocator's fragmentation
HEADROOM = 0.10
_ADAM_STATE_BYTES = 8
_FP32 = 4


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model, read from its architecture (never from a table of sizes)."""

    family: str
    transformer_params: int
    block_params: int  # the largest transformer block's
    blocks: int  # transformer blocks (MMDiT double and single blocks alike)
    width: int  # width of the token stream (heads x head dim)
    lora_params: int  # of the run's LoRA targets and rank (0 for full fine-tuning)
    text_encoder_params: int
    vae_params: int
    vae_channels: int  # channels of the VAE decoder at full resolution
    pixels_per_token: int  # image pixels per token along a side (VAE downsampling x patch)
    text_tokens: int  # tokens the prompt adds to the joint sequence
    true_cfg: bool  # guidance runs the negative prompt through the same forward (FLUX embeds it instead)
    # what full fine-tuning trains, when not the whole transformer (Bagel: its generation expert)
    full_fine_tuning_params: int | None = None

    @property
    def fully_trained_params(self) -> int:
        if self.full_fine_tuning_params is None:
            return self.transformer_params
        return self.full_fine_tuning_params

    def image_tokens(self, resolution: int) -> int:
        return (resolution // self.pixels_per_token) ** 2


@dataclass(frozen=True)
class RunSettings:
    """The config fields the plan reads, and the cluster."""

    world_size: int
    gpu_memory_gib: float
    resolution: int
    batch_size: int  # the sampling batch, also the training micro-batch
    images_per_epoch: int
    guidance_scale: float
    lora: bool
    beta: float  # KL weight: full fine-tuning keeps a reference copy when > 0
    ema: bool
    stage: int  # DeepSpeed ZeRO stage, 0: plain torch
    offload_optimizer: bool
    offload_params: bool
    gradient_checkpointing: bool
    text_encoders_on_cpu: bool
    mixed_precision: str  # no | fp16 | bf16
    weight_bytes: int  # model.dtype
    text_encoder_bytes: int
    vae_bytes: int

    @property
    def activation_bytes(self) -> int:
        return 2 if self.mixed_precision in ("fp16", "bf16") else 4


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU: what stays allocated through the run, and each phase's working memory on top."""

    resident: dict[str, float]
    sampling: dict[str, float]
    training: dict[str, float]
    # activations of the training micro-batch with and without checkpointing, whichever the run uses
    training_activations: dict[bool, float]
    capacity: float  # the GPU's bytes less the headroom

    @property
    def resident_total(self) -> float:
        return sum(self.resident.values())

    @property
    def sampling_peak(self) -> float:
        return self.resident_total + sum(self.sampling.values())

    @property
    def training_peak(self) -> float:
        return self.resident_total + sum(self.training.values())

    @property
    def peak(self) -> float:
        return max(self.sampling_peak, self.training_peak)

    @property
    def fits(self) -> bool:
        return self.peak <= self.capacity


class ImpossibleRun(ValueError):
    """Settings no amount of memory can run; the message says which and why."""


def check_possible(run: RunSettings) -> None:
    """Refuse what the trainer would refuse too: every rank needs whole sampling batches, the same number."""
    if run.world_size < 1:
        raise ImpossibleRun(f"{run.world_size} processes: need at least one GPU")
    if run.images_per_epoch % run.batch_size:
        raise ImpossibleRun(
            f"sampling.batch_size: {run.batch_size} does not divide the {run.images_per_epoch} images per epoch"
        )
    batches = run.images_per_epoch // run.batch_size
    if run.world_size > batches:
        raise ImpossibleRun(
            f"{run.world_size} processes but only {batches} sampling batches ({run.images_per_epoch} images in "
            f"batches of {run.batch_size}) per epoch: a process would have nothing to sample; use at most "
            f"{batches} GPUs, or more images per epoch (sampling.group_size x sampling.groups_per_epoch)"
        )
    if batches % run.world_size:
        raise ImpossibleRun(
            f"{batches} sampling batches per epoch cannot be shared by {run.world_size} processes: make group_size "
            "x groups_per_epoch / batch_size a multiple of the number of GPUs"
        )


def forward_values(model: ModelShape, run: RunSettings) -> int:
    """B_f x S x W: the batch a forward sees (doubled by true CFG) x tokens per sample x token width."""
    batch = run.batch_size * (2 if model.true_cfg and run.guidance_scale > 1 else 1)
    return batch * (model.image_tokens(run.resolution) + model.text_tokens) * model.width


def training_activations(model: ModelShape, run: RunSettings, checkpointing: bool) -> float:
    """Bytes kept for backward by one training micro-batch's forward."""
    per_layer = forward_values(model, run) * run.activation_bytes
    kept = TRAIN_FACTOR[model.family]
    if checkpointing:
        return per_layer * (model.blocks + kept + BACKWARD_FACTOR)
    return per_layer * (model.blocks * kept + BACKWARD_FACTOR)


def estimate(model: ModelShape, run: RunSettings) -> MemoryEstimate:
    """Per-GPU bytes of ``model`` trained with ``run`` (see the module docstring for each term)."""
    check_possible(run)
    n = run.world_size
    trained = model.fully_trained_params if not run.lora else model.lora_params
    frozen = model.transformer_params if run.lora else model.transformer_params - model.fully_trained_params
    deepspeed_16bit = run.stage > 0 and run.mixed_precision in ("fp16", "bf16")
    weight_bytes = 2 if deepspeed_16bit else run.weight_bytes
    trained_bytes = 2 if deepspeed_16bit else _FP32
    zero3 = run.stage == 3
    resident: dict[str, float] = {}
    resident["frozen weights"] = 0.0 if run.offload_params else frozen * weight_bytes / (n if zero3 else 1)
    resident["trainable weights"] = (
        0.0 if run.offload_params else trained * trained_bytes / (n if zero3 else 1)
    )
    resident["gradients"] = 0.0 if run.offload_optimizer else trained * _FP32 / (n if run.stage >= 2 else 1)
    optimiser = trained * (_ADAM_STATE_BYTES + (_FP32 if deepspeed_16bit else 0))
    resident["optimiser states"] = 0.0 if run.offload_optimizer else optimiser / (n if run.stage >= 1 else 1)
    resident["EMA"] = trained * _FP32 if run.ema else 0.0
    resident["reference copy"] = (
        model.transformer_params * run.weight_bytes if (not run.lora and run.beta > 0) else 0.0
    )
    if zero3:
        resident["ZeRO-3 gathered layers"] = 2 * model.block_params * weight_bytes
    resident["text encoders"] = (
        0.0 if run.text_encoders_on_cpu else model.text_encoder_params * run.text_encoder_bytes
    )
    resident["VAE"] = model.vae_params * run.vae_bytes
    forward = forward_values(model, run) * run.activation_bytes
    sampling = {
        "activations (sampling batch)": forward * SAMPLE_FACTOR[model.family],
        "VAE decoding": run.batch_size
        * run.resolution**2
        * model.vae_channels
        * VAE_FACTOR[model.family]
        * run.vae_bytes,
    }
    both = {c: training_activations(model, run, c) for c in (False, True)}
    training = {"activations (training micro-batch)": both[run.gradient_checkpointing]}
    return MemoryEstimate(resident, sampling, training, both, run.gpu_memory_gib * GiB * (1 - HEADROOM))


# what the plan tries, cheapest first, each on top of the ones before: (description, change to the settings)
_LADDER: tuple[tuple[str, dict], ...] = (
    ("train.deepspeed_stage=2", {"stage": 2}),
    ("train.gradient_checkpointing=true", {"gradient_checkpointing": True}),
    ("model.text_encoders_on_cpu=true", {"text_encoders_on_cpu": True}),
    ("train.deepspeed_stage=3", {"stage": 3}),
    ("train.offload_optimizer=true", {"offload_optimizer": True}),
    ("train.offload_params=true", {"offload_params": True}),
)


def make_fit(model: ModelShape, run: RunSettings) -> tuple[list[str], RunSettings, MemoryEstimate] | None:
    """The first settings along the ladder (ZeRO-2, checkpointing, text encoders on the CPU, ZeRO-3, optimiser
    offload, weight offload, each skipped where it changes no term, then halving the batch) that fit, as ``--set`` overrides with the settings and
    their estimate; ``[]`` when the run fits as it is, None when nothing does."""
    current = estimate(model, run)
    if current.fits:
        return [], run, current
    changes: list[str] = []
    for text, change in _LADDER:
        if all(getattr(run, k) == v or (k == "stage" and run.stage >= v) for k, v in change.items()):
            continue
        candidate = estimate(model, replace(run, **change))
        if (
            candidate == current
        ):  # saves nothing here (e.g. text encoders on the CPU for Bagel, which has none)
            continue
        run, current = replace(run, **change), candidate
        changes.append(text)
        if current.fits:
            return changes, run, current
    batch = run.batch_size
    while batch > 1:
        batch = _next_smaller_batch(run, batch)
        if batch is None:
            break
        smaller = replace(run, batch_size=batch)
        current = estimate(model, smaller)
        if current.fits:
            return [*changes, f"sampling.batch_size={batch}"], smaller, current
    return None


def _next_smaller_batch(run: RunSettings, below: int) -> int | None:
    """The largest batch under ``below`` that divides the epoch's images into a multiple of the ranks."""
    for b in range(below - 1, 0, -1):
        if run.images_per_epoch % b == 0 and (run.images_per_epoch // b) % run.world_size == 0:
            return b
    return None


def gib(value: float) -> str:
    """Bytes as GiB for a table: 3 significant figures, '-' for nothing."""
    if value == 0:
        return "-"
    g = value / GiB
    return f"{g:.3g}" if g >= 0.01 else f"{g:.1e}"
