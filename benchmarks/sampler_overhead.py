"""Our roll-out (SDE steps + log-probs + stored latents) vs ``StableDiffusion3Pipeline.__call__``.

Same model, prompts, noise, steps and CFG, measured side by side and interleaved in one run so that
machine noise hits both equally. Prints the median time of each and their ratio (targets: <= 1.03x on the
tiny model, <= 1.01x on the 73.7M one).

    python benchmarks/sampler_overhead.py [--repeats 7] [--sizes tiny mid]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from flowgrpo_core.models import adapter_for
from flowgrpo_core.models.tiny import TinySD3Spec, build_tiny_sd3
from flowgrpo_core.sampling import SamplingSpec, rollout, sde_window_mask

SIZES = {
    # (spec, resolution, batch)
    "tiny": (TinySD3Spec(), 64, 4),
    # ~50M-parameter MMDiT, 512-channel VAE top block: seconds per call on a CPU
    "mid": (
        TinySD3Spec(
            num_layers=8,
            num_attention_heads=8,
            attention_head_dim=64,
            vae_blocks=(32, 64, 128, 128),
            t5_d_model=256,
            clip_hidden=128,
        ),
        256,
        2,
    ),
}


def bench(size: str, repeats: int, steps: int, guidance: float) -> dict[str, float]:
    spec, res, batch = SIZES[size]
    pipe = build_tiny_sd3(seed=0, spec=spec)
    adapter = adapter_for(pipe)
    prompts = [f"a photo of a {w}" for w in ("cat", "dog", "fox", "owl")][:batch]
    params = sum(p.numel() for p in pipe.transformer.parameters()) / 1e6

    def ours() -> None:
        spec = SamplingSpec(res, steps, guidance, noise_level=0.7, max_sequence_length=32)
        rollout(adapter, prompts, list(range(batch)), spec, sde_window_mask(batch, steps, 0, 0))

    def diffusers() -> None:
        generators = [torch.Generator().manual_seed(i) for i in range(batch)]
        pipe(
            prompts,
            height=res,
            width=res,
            num_inference_steps=steps,
            guidance_scale=guidance,
            max_sequence_length=32,
            generator=generators,
            output_type="pt",
        )

    pipe.set_progress_bar_config(disable=True)
    ours(), diffusers()  # warm-up
    times: dict[str, list[float]] = {"ours": [], "diffusers": []}
    for _ in range(repeats):
        for name, fn in (("ours", ours), ("diffusers", diffusers)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    ours_s, theirs_s = statistics.median(times["ours"]), statistics.median(times["diffusers"])
    return {
        "params_m": params,
        "res": res,
        "batch": batch,
        "ours": ours_s,
        "diffusers": theirs_s,
        "ratio": ours_s / theirs_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per sampler (median reported)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps (default 10, the training T)")
    parser.add_argument("--guidance", type=float, default=4.5, help="CFG scale (default 4.5)")
    parser.add_argument(
        "--sizes", nargs="+", default=list(SIZES), choices=list(SIZES), help="model sizes to run"
    )
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps, CFG {args.guidance}"
    )
    print(
        f"{'size':6} {'transformer':>12} {'res':>5} {'batch':>5} {'ours (s)':>10} {'diffusers (s)':>14} {'ratio':>7}"
    )
    for size in args.sizes:
        r = bench(size, args.repeats, args.steps, args.guidance)
        print(
            f"{size:6} {r['params_m']:>10.2f}M {r['res']:>5} {r['batch']:>5} {r['ours']:>10.4f} {r['diffusers']:>14.4f} {r['ratio']:>6.3f}x"
        )


if __name__ == "__main__":
    main()
