"""Our roll-out (SDE steps + log-probs + stored latents) vs the family's diffusers pipeline ``__call__``.

SD3 against ``StableDiffusion3Pipeline.__call__`` (CFG), Qwen-Image against ``QwenImagePipeline.__call__``
(true CFG with the negative prompt " ", as upstream trains it). Same model, prompts, noise, steps and CFG,
measured side by side and interleaved in one run so that machine noise hits both equally. Prints the median
time of each and their ratio (targets: <= 1.03x on the tiny models, <= 1.01x on SD3's 73.7M one, <= 1.03x on
Qwen-Image's mid-size one).

    python benchmarks/sampler_overhead.py [--repeats 7] [--families sd3 qwenimage] [--sizes tiny mid]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from flowgrpo_core.models import adapter_for
from flowgrpo_core.models.tiny import TinyQwenImageSpec, TinySD3Spec, build_tiny_qwenimage, build_tiny_sd3
from flowgrpo_core.sampling import SamplingSpec, rollout, sde_window_mask


@dataclass(frozen=True)
class Case:
    build: Callable[[], Any]  # the pipeline
    res: int
    batch: int


CASES = {
    "sd3": {
        "tiny": Case(lambda: build_tiny_sd3(seed=0), 64, 4),
        # ~50M-parameter MMDiT, 512-channel VAE top block: seconds per call on a CPU
        "mid": Case(
            lambda: build_tiny_sd3(
                seed=0,
                spec=TinySD3Spec(
                    num_layers=8,
                    num_attention_heads=8,
                    attention_head_dim=64,
                    vae_blocks=(32, 64, 128, 128),
                    t5_d_model=256,
                    clip_hidden=128,
                ),
            ),
            256,
            2,
        ),
    },
    "qwenimage": {
        "tiny": Case(lambda: build_tiny_qwenimage(seed=0), 64, 4),
        # a 6-block MMDiT of width 512 with Qwen-Image's 16 latent channels, a 2-layer text encoder of width 256
        "mid": Case(
            lambda: build_tiny_qwenimage(
                seed=0,
                spec=TinyQwenImageSpec(
                    num_layers=6,
                    num_attention_heads=8,
                    attention_head_dim=64,
                    axes_dims_rope=(8, 28, 28),
                    text_hidden=256,
                    text_heads=4,
                    latent_channels=16,
                    vae_base_dim=32,
                ),
            ),
            256,
            2,
        ),
    },
}
# what the pipeline call needs to do what our roll-out does, per family
NEGATIVE = {"sd3": "", "qwenimage": " "}


def _pipeline_kwargs(family: str, guidance: float, batch: int) -> dict[str, Any]:
    if family == "qwenimage":  # true CFG needs an explicit negative prompt
        return {"true_cfg_scale": guidance, "negative_prompt": [NEGATIVE[family]] * batch}
    return {"guidance_scale": guidance}


def bench(family: str, size: str, repeats: int, steps: int, guidance: float) -> dict[str, float]:
    case = CASES[family][size]
    res, batch = case.res, case.batch
    pipe = case.build()
    adapter = adapter_for(pipe)
    prompts = [f"a photo of a {w}" for w in ("cat", "dog", "fox", "owl")][:batch]
    params = sum(p.numel() for p in pipe.transformer.parameters()) / 1e6
    spec = SamplingSpec(
        res, steps, guidance, noise_level=0.7, negative_prompt=NEGATIVE[family], max_sequence_length=32
    )

    def ours() -> None:
        rollout(adapter, prompts, list(range(batch)), spec, sde_window_mask(batch, steps, 0, 0))

    def diffusers() -> None:
        generators = [torch.Generator().manual_seed(i) for i in range(batch)]
        pipe(
            prompts,
            height=res,
            width=res,
            num_inference_steps=steps,
            max_sequence_length=32,
            generator=generators,
            output_type="pt",
            **_pipeline_kwargs(family, guidance, batch),
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
        "--families", nargs="+", default=list(CASES), choices=list(CASES), help="model families to run"
    )
    parser.add_argument(
        "--sizes", nargs="+", default=["tiny", "mid"], choices=["tiny", "mid"], help="model sizes to run"
    )
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps, CFG {args.guidance}"
    )
    print(
        f"{'family':10} {'size':6} {'transformer':>12} {'res':>5} {'batch':>5} {'ours (s)':>10} {'diffusers (s)':>14} {'ratio':>7}"
    )
    for family in args.families:
        for size in args.sizes:
            r = bench(family, size, args.repeats, args.steps, args.guidance)
            print(
                f"{family:10} {size:6} {r['params_m']:>10.2f}M {r['res']:>5} {r['batch']:>5} {r['ours']:>10.4f} {r['diffusers']:>14.4f} {r['ratio']:>6.3f}x"
            )


if __name__ == "__main__":
    main()
