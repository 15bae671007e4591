"""Our Bagel against ByteDance's official implementation, on a GPU with the real checkpoint (not runnable on the
project's CPU machines: it needs the 14B weights, a CUDA device with ~40 GB free and the official repository,
whose attention requires flash-attn).

For each prompt and seed it prints, side by side:

- the velocity of the first step (text CFG 4, the reference's global renorm): the official one is captured from
  ``Bagel._forward_flow`` during the official sample, ours computed on the same input; relative L2 difference;
- the ODE sample (noise level 0, T steps = the official ``num_timesteps`` T + 1, shift 3, ``cfg_interval``
  [0, 1], image CFG off, as flow_grpo samples), from the same initial noise (both draw it with
  ``torch.randn`` from a CPU generator seeded with the seed): max and mean absolute pixel difference (0-255)
  and PSNR of our image against the official one;
- the time of each sample and their ratio.

Both run in bfloat16 weights under bf16 autocast, as the official loader and flow_grpo run them. Differences of
bf16 rounding are expected (the official path attends with flash-attn over packed sequences, ours with SDPA);
a structural error shows as a velocity difference of order 1, not 1e-2.

    python benchmarks/bagel_parity_gpu.py --bagel-repo ~/Bagel --model ~/BAGEL-7B-MoT \
        --prompt "a photo of a cat" --prompt "a red bicycle leaning on a wall" --seeds 0 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch


def official(repo: str, folder: str):
    """The official model, VAE and inferencer, loaded as its app.py does (the ViT skipped, as flow_grpo's
    trainer does for text-to-image), on one GPU in bf16."""
    sys.path.insert(0, repo)
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch
    from data.data_utils import add_special_tokens
    from data.transforms import ImageTransform
    from inferencer import InterleaveInferencer
    from modeling.autoencoder import load_ae
    from modeling.bagel import Bagel, BagelConfig, Qwen2Config, Qwen2ForCausalLM
    from modeling.qwen2 import Qwen2Tokenizer

    llm_config = Qwen2Config.from_json_file(os.path.join(folder, "llm_config.json"))
    llm_config.qk_norm = True
    llm_config.tie_word_embeddings = False
    llm_config.layer_module = "Qwen2MoTDecoderLayer"
    vae, vae_config = load_ae(local_path=os.path.join(folder, "ae.safetensors"))
    config = BagelConfig(
        visual_gen=True,
        visual_und=False,
        llm_config=llm_config,
        vit_config=None,
        vae_config=vae_config,
        vit_max_num_patch_per_side=70,
        connector_act="gelu_pytorch_tanh",
        latent_patch_size=2,
        max_latent_size=64,
    )
    with init_empty_weights():
        model = Bagel(Qwen2ForCausalLM(llm_config), None, config)
    tokenizer, new_token_ids, _ = add_special_tokens(Qwen2Tokenizer.from_pretrained(folder))
    model = load_checkpoint_and_dispatch(
        model,
        checkpoint=os.path.join(folder, "ema.safetensors"),
        device_map={"": "cuda:0"},
        dtype=torch.bfloat16,
        force_hooks=True,
    ).eval()
    vae = vae.to("cuda:0", torch.bfloat16).eval()
    inferencer = InterleaveInferencer(
        model=model,
        vae_model=vae,
        tokenizer=tokenizer,
        vae_transform=ImageTransform(1024, 512, 16),
        vit_transform=ImageTransform(980, 224, 14),
        new_token_ids=new_token_ids,
    )
    return model, inferencer


def capture_first_velocity(model):
    """Wrap ``model._forward_flow`` to keep its first call's input and output."""
    seen: dict[str, torch.Tensor] = {}
    forward = model._forward_flow

    def recording(*args, **kwargs):
        v = forward(*args, **kwargs)
        if "v" not in seen:
            seen.update(
                x=kwargs["x_t"].detach().clone(), t=kwargs["timestep"][:1].clone(), v=v.detach().clone()
            )
        return v

    model._forward_flow = recording
    return seen


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a - b) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bagel-repo", required=True, help="a clone of github.com/ByteDance-Seed/Bagel")
    parser.add_argument("--model", required=True, help="the BAGEL-7B-MoT checkpoint folder")
    parser.add_argument("--prompt", action="append", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=14, help="our T (the official num_timesteps is T + 1)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--guidance", type=float, default=4.0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bagel_parity_gpu.py needs a CUDA device")
    prompts = args.prompt or ["a photo of a cat"]

    from flowgrpo_core.models import load_model
    from flowgrpo_core.sampling import SamplingSpec, rollout, sde_window_mask

    theirs, inferencer = official(args.bagel_repo, args.model)
    ours = load_model(args.model, dtype="bfloat16", device="cuda")
    hyper = dict(
        cfg_text_scale=args.guidance,
        cfg_img_scale=1.0,
        cfg_interval=[0.0, 1.0],
        timestep_shift=3.0,
        num_timesteps=args.steps + 1,
        cfg_renorm_min=0.0,
        cfg_renorm_type="global",
        image_shapes=(args.resolution, args.resolution),
    )
    spec = SamplingSpec(args.resolution, args.steps, args.guidance, max_sequence_length=4096)
    print(
        "prompt | seed | first velocity rel. L2 diff | image max / mean abs diff (0-255) | PSNR dB | time ours / official"
    )
    for prompt in prompts:
        for seed in args.seeds:
            seen = capture_first_velocity(theirs)
            torch.manual_seed(seed)  # the official sampler draws its noise from the global CPU generator
            torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                image = inferencer(text=prompt, **hyper)["image"]
            torch.cuda.synchronize()
            official_s = time.perf_counter() - start
            del theirs._forward_flow  # the class's method again
            official_image = torch.from_numpy(np.asarray(image)).float().permute(2, 0, 1) / 255

            cond = ours.encode_prompts([prompt], "", args.guidance, spec.max_sequence_length)
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                x = seen["x"].to(ours.device)[None]
                t = seen["t"].to(ours.device).float()
                v = ours.predict_velocity(x, t, cond, args.guidance, args.resolution, args.resolution)
            v_diff = ((v[0].float() - seen["v"].float()).norm() / seen["v"].float().norm()).item()
            start = time.perf_counter()
            mask = sde_window_mask(1, args.steps, 1, 0) & False
            out = rollout(ours, [prompt], [seed], spec, mask, autocast_dtype=torch.bfloat16)
            torch.cuda.synchronize()
            ours_s = time.perf_counter() - start
            # the official image is truncated to uint8 (``to(torch.uint8)``), so ours is too
            mine = (out.images[0].cpu() * 255).to(torch.uint8).float() / 255
            diff = (mine - official_image).abs() * 255
            print(
                f"{prompt[:40]!r} | {seed} | {v_diff:.2e} | {diff.max().item():.0f} / {diff.mean().item():.2f} | "
                f"{psnr(mine, official_image):.1f} | {ours_s:.1f} s / {official_s:.1f} s = {ours_s / official_s:.2f}x"
            )


if __name__ == "__main__":
    main()
