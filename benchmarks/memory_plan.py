"""The memory plan's activation terms against measured peaks on the CPU: tiny SD3 / FLUX / Qwen-Image and a
mid-size random SD3, at two resolutions, with and without activation checkpointing.

What is measured: torch's own tensor tracker (``torch.distributed._tools.mem_tracker.MemTracker``) counts
the bytes of every live tensor storage, by category, at its peak, as the CUDA caching allocator's
``max_memory_allocated`` would (without the allocator's rounding and fragmentation, which the plan's
headroom covers). The process's RSS would mostly measure Python, the libraries and glibc's caching at these
sizes. Each row compares the bytes on top of the weights, gradients and buffers:

- training: one micro-batch's forward with a graph and its backward (the LoRA's gradients excluded);
- sampling: one forward without a graph;
- VAE: decoding the batch's latents.

    python benchmarks/memory_plan.py            # prints measured / estimated per row and the factors
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from flowgrpo_core import memory_plan
from flowgrpo_core.models import adapter_for
from flowgrpo_core.models.sizes import shape_of


@dataclass(frozen=True)
class Case:
    name: str
    family: str
    resolution: int
    checkpointing: bool
    mid_size: bool = False
    batch: int = 2
    guidance: float = 4.5
    max_sequence_length: int = 32
    lora_rank: int = 8


CASES = (
    Case("tiny sd3 64px", "sd3", 64, False),
    Case("tiny sd3 128px", "sd3", 128, False),
    Case("tiny sd3 128px ckpt", "sd3", 128, True),
    Case("tiny flux 128px", "flux", 128, False, guidance=3.5),
    Case("tiny qwenimage 128px", "qwenimage", 128, False, guidance=4.0),
    Case("tiny bagel 128px", "bagel", 128, False, guidance=4.0),
    Case("mid sd3 128px", "sd3", 128, False, mid_size=True),
    Case("mid sd3 256px", "sd3", 256, False, mid_size=True),
    Case("mid sd3 256px ckpt", "sd3", 256, True, mid_size=True),
)


def build(case: Case):
    """The case's pipeline: a tiny builder's, or a mid-size SD3 (8 blocks of width 512, 74M parameters in its transformer)."""
    from flowgrpo_core.models import tiny

    if case.mid_size:
        spec = tiny.TinySD3Spec(
            num_layers=8, num_attention_heads=8, attention_head_dim=64, clip_hidden=64, t5_d_model=256
        )
        return tiny.build_tiny_sd3(0, spec)
    return tiny.TINY_BUILDERS[case.family](0)


def _peak_above_weights(modules, fn) -> float:
    """Peak bytes of live tensors while ``fn`` runs, beyond the parameters and buffers of ``modules`` and the
    gradients of their trained parameters (the whole gradients are subtracted: a slight under-count when the
    peak comes before backward has made all of them)."""
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.distributed._tools.mem_tracker import _MemRefType as Kind

    class Tracker(MemTracker):
        # torch 2.13's tracker hooks every parameter's gradient, and a frozen one refuses a hook
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            return super()._track_module_params_and_buffers(module, install_grad_hooks=False)

    tracker = Tracker()
    tracker.track_external(*modules)
    with tracker:
        fn()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    grads = sum(p.numel() * p.element_size() for m in modules for p in m.parameters() if p.requires_grad)
    for m in modules:
        m.zero_grad(set_to_none=True)
    return peak["Total"] - peak[Kind.PARAM] - peak[Kind.BUFFER] - grads


def measure(case: Case) -> dict[str, float]:
    """Measured and estimated bytes of the case's three working sets."""
    torch.manual_seed(0)
    pipe = build(case)
    adapter = adapter_for(pipe, f"tiny:{case.family}")
    adapter.add_lora(case.lora_rank, 2.0 * case.lora_rank)
    transformer = adapter.transformer
    for p in transformer.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if case.checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.eval()
    prompts = ["a photo of a cat", "two red cubes on a table"][: case.batch] * (case.batch // 2 or 1)
    cond = adapter.encode_prompts(prompts, "", case.guidance, case.max_sequence_length)
    noise = adapter.initial_noise(
        [torch.Generator().manual_seed(i) for i in range(case.batch)], case.resolution, case.resolution
    )
    sigma = torch.full((case.batch,), 0.7)
    res = case.resolution

    def train() -> None:
        velocity = adapter.predict_velocity(noise, sigma, cond, case.guidance, res, res)
        velocity.float().square().mean().backward()

    def sample() -> None:
        with torch.no_grad():
            adapter.predict_velocity(noise, sigma, cond, case.guidance, res, res)

    def decode() -> None:
        adapter.decode(noise, res, res)

    components = {n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    shape = shape_of(components, case.lora_rank, max_sequence_length=case.max_sequence_length)
    run = memory_plan.RunSettings(
        world_size=1,
        gpu_memory_gib=80,
        resolution=res,
        batch_size=case.batch,
        images_per_epoch=case.batch,
        guidance_scale=case.guidance,
        lora=True,
        beta=0.0,
        ema=False,
        stage=0,
        offload_optimizer=False,
        offload_params=False,
        gradient_checkpointing=case.checkpointing,
        text_encoders_on_cpu=False,
        mixed_precision="no",
        weight_bytes=4,
        text_encoder_bytes=4,
        vae_bytes=4,
    )
    plan = memory_plan.estimate(shape, run)
    started = time.perf_counter()
    measured = {
        "training": _peak_above_weights([transformer], train),
        "sampling": _peak_above_weights([transformer], sample),
        "vae": _peak_above_weights([pipe.vae], decode),
    }
    return {
        **{f"measured/{k}": v for k, v in measured.items()},
        "estimated/training": plan.training["activations (training micro-batch)"],
        "estimated/sampling": plan.sampling["activations (sampling batch)"],
        "estimated/vae": plan.sampling["VAE decoding"],
        "params": float(shape.transformer_params),
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", nargs="*", help="case names (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'case':24s} {'params':>8s}  {'training MiB':>22s}  {'sampling MiB':>22s}  {'VAE MiB':>22s}")
    for case in CASES:
        if args.cases and case.name not in args.cases:
            continue
        r = measure(case)
        cells = []
        for part in ("training", "sampling", "vae"):
            m, e = r[f"measured/{part}"], r[f"estimated/{part}"]
            cells.append(f"{m / 2**20:7.2f} / {e / 2**20:7.2f} ({e / m:4.2f})")
        print(f"{case.name:24s} {r['params'] / 1e6:7.2f}M  " + "  ".join(cells))
    print("cells: measured / estimated (estimated / measured)")


if __name__ == "__main__":
    main()
