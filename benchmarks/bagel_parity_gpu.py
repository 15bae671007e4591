"""Our Bagel against ByteDance's official implementation (a clone of github.com/ByteDance-Seed/Bagel), side by side.

Real weights (the point of this script; not run on the project's CPU machines: it needs the 14B checkpoint, a
CUDA device with ~40 GB free and flash-attn for the official code)::

    python benchmarks/bagel_parity_gpu.py --bagel-repo ~/Bagel --model ~/BAGEL-7B-MoT \
        --prompt "a photo of a cat" --prompt "a red bicycle leaning on a wall" --seeds 0 1

Both run bf16 weights under bf16 autocast, as the official loader runs them; bf16 rounds at different points
in the two (the official attention casts q, k, v to bf16 itself), so expect differences of order 1e-2 in the
velocity (measured on tiny:bagel under CPU bf16 autocast: 1.1e-2 with CFG 4, 3e-3 without), not 1e-7. Per prompt and seed it prints the
relative L2 difference of the first velocity (text CFG with the global renorm; the official one captured from
``Bagel._forward_flow`` during its sample, ours on the same input), of the final ODE latent (noise level 0,
shift 3, ``cfg_interval`` [0, 1], image CFG off, as flow_grpo samples; both from the same initial noise, drawn
by ``torch.randn`` from a CPU generator seeded with the seed), the pixel difference of the decoded images (the
official VAE against ours) and the sampling times with their ratio.

``--tiny`` runs the same comparison on ``tiny:bagel`` on a CPU, in float32: the official code is given a
stand-in for flash-attn's varlen kernel (PyTorch SDPA per sequence) and its hard-coded bf16 casts are made
no-ops, so what remains is the difference of the two implementations. Measured 2026-12-03 on tiny:bagel
(6 steps, 64 px, two prompts x seeds 0 and 3, the official repository at commit 056b5fd of 2025-10-27): first velocity
5.7e-7 to 7.2e-7 and final latent 1.6e-7 to 2.0e-7 relative L2 with text CFG 4; 1.3e-7 to 1.6e-7 and 5.7e-8
to 6.5e-8 without CFG; the same initial noise in every case; the official autoencoder reads our
``ae.safetensors`` strictly and decodes as ours within 2.0e-6. (Times at this size say nothing.)

    python benchmarks/bagel_parity_gpu.py --bagel-repo ~/Bagel --tiny --prompt "a photo of a cat" --seeds 0 3
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import types

import numpy as np
import torch
import torch.nn.functional as F


def varlen_attention(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, causal=False, **_
):
    """flash-attn's ``flash_attn_varlen_func`` for the CPU: SDPA per packed sequence, grouped-query heads,
    causal masks aligned bottom-right as flash-attn aligns them."""
    out = []
    for i in range(len(cu_seqlens_q) - 1):
        qs = q[cu_seqlens_q[i] : cu_seqlens_q[i + 1]].transpose(0, 1)
        ks = k[cu_seqlens_k[i] : cu_seqlens_k[i + 1]].transpose(0, 1)
        vs = v[cu_seqlens_k[i] : cu_seqlens_k[i + 1]].transpose(0, 1)
        groups = qs.shape[0] // ks.shape[0]
        ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
        mask = None
        if causal:
            mask = torch.ones(qs.shape[1], ks.shape[1], dtype=torch.bool).tril(ks.shape[1] - qs.shape[1])
        out.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask).transpose(0, 1))
    return torch.cat(out)


def import_official(repo: str, cpu: bool) -> None:
    """Put the official repository on the path; on a CPU, with the flash-attn stand-in and the shims its
    Qwen2 copy needs under the installed transformers (a default RoPE, a ``pad_token_id``)."""
    sys.path.insert(0, repo)
    if cpu:
        sys.modules["flash_attn"] = types.SimpleNamespace(
            flash_attn_varlen_func=varlen_attention, flash_attn_func=None
        )
    import modeling.qwen2.modeling_qwen2 as qwen2

    if "default" not in qwen2.ROPE_INIT_FUNCTIONS:

        def default_rope(config, device=None, **_):
            theta = getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]
            dim = config.hidden_size // config.num_attention_heads
            return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim), 1.0

        qwen2.ROPE_INIT_FUNCTIONS["default"] = default_rope


def official(folder: str, ours, device: str, dtype: torch.dtype):
    """The official model and inferencer on ``folder``, as its app.py loads them (the ViT skipped, as
    flow_grpo's trainer does for text-to-image); its VAE only for the real checkpoint."""
    from accelerate import init_empty_weights
    from data.data_utils import add_special_tokens
    from inferencer import InterleaveInferencer
    from modeling.autoencoder import load_ae
    from modeling.bagel import Bagel, BagelConfig, Qwen2Config, Qwen2ForCausalLM
    from modeling.qwen2 import Qwen2Tokenizer
    from safetensors.torch import load_file

    llm_config = Qwen2Config.from_json_file(os.path.join(folder, "llm_config.json"))
    llm_config.qk_norm = True
    llm_config.tie_word_embeddings = False
    llm_config.layer_module = "Qwen2MoTDecoderLayer"
    if not hasattr(llm_config, "pad_token_id"):
        llm_config.pad_token_id = None
    transformer = ours.transformer.config
    if device == "cpu":  # the tiny model: its VAE is ours; the official model needs only its shape
        vae = None
        vae_config = types.SimpleNamespace(
            downsample=ours.pipeline.vae_scale_factor, z_channels=transformer.latent_channels
        )
    else:
        vae, vae_config = load_ae(local_path=os.path.join(folder, "ae.safetensors"))
        vae = vae.to(device, dtype).eval()
    config = BagelConfig(
        visual_gen=True,
        visual_und=False,
        llm_config=llm_config,
        vit_config=None,
        vae_config=vae_config,
        vit_max_num_patch_per_side=70,
        connector_act="gelu_pytorch_tanh",
        latent_patch_size=transformer.latent_patch_size,
        max_latent_size=transformer.max_latent_size,
    )
    checkpoint = os.path.join(folder, "ema.safetensors")
    if device == "cpu":
        # tiny: built for real (its checkpoint has no lm_head to fill an empty one), and the tokenizer ours
        # (the official slow tokenizer wants vocab.json + merges.txt; the tiny folder has tokenizer.json)
        model = Bagel(Qwen2ForCausalLM(llm_config), None, config)
        model.load_state_dict(load_file(checkpoint), strict=False)
        tokenizer = ours.pipeline.tokenizer
    else:
        from accelerate import load_checkpoint_and_dispatch

        with init_empty_weights():
            model = Bagel(Qwen2ForCausalLM(llm_config), None, config)
        model = load_checkpoint_and_dispatch(
            model, checkpoint=checkpoint, device_map={"": device}, dtype=dtype, force_hooks=True
        )
        tokenizer = Qwen2Tokenizer.from_pretrained(folder)
    model = model.eval()
    tokenizer, new_token_ids, _ = add_special_tokens(tokenizer)
    inferencer = InterleaveInferencer(model, vae, tokenizer, None, None, new_token_ids)
    return model, inferencer


def vae_parity(folder: str, ours) -> float:
    """The official autoencoder (FLUX's code in the official repository) reads our ``ae.safetensors`` strictly;
    relative L2 difference of its decode and ours on random latents."""
    from modeling.autoencoder import AutoEncoder, AutoEncoderParams
    from safetensors.torch import load_file

    config = ours.pipeline.vae.config
    widths = list(config.block_out_channels)
    params = AutoEncoderParams(
        resolution=256,
        in_channels=config.in_channels,
        downsample=ours.pipeline.vae_scale_factor,
        ch=widths[0],
        out_ch=config.out_channels,
        ch_mult=[w // widths[0] for w in widths],
        num_res_blocks=config.layers_per_block,
        z_channels=config.latent_channels,
        scale_factor=config.scaling_factor,
        shift_factor=config.shift_factor,
    )
    theirs = AutoEncoder(params).eval()
    theirs.load_state_dict(load_file(os.path.join(folder, "ae.safetensors")), strict=True)
    z = torch.randn(2, config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return relative(ours._vae_decode(z), theirs.decode(z))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return ((a - b).norm() / b.norm()).item()


def compare(theirs, inferencer, ours, prompt: str, seed: int, args, autocast: torch.dtype | None) -> str:
    from flowgrpo_core.sampling import SamplingSpec, rollout, sde_window_mask

    device = ours.device.type
    seen: dict[str, torch.Tensor] = {}
    forward = theirs._forward_flow

    def recording(*a, **k):
        v = forward(*a, **k)
        seen.setdefault("x", k["x_t"].detach().clone())
        seen.setdefault("t", k["timestep"][:1].clone())
        seen.setdefault("v", v.detach().clone())
        return v

    theirs._forward_flow = recording
    decode = inferencer.decode_image
    latents = {}

    def keep_latent(latent, shape):
        latents["official"] = latent
        return decode(latent, shape) if inferencer.vae_model is not None else None

    inferencer.decode_image = keep_latent
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
    torch.manual_seed(seed)  # the official sampler draws its noise from the global CPU generator
    start = time.perf_counter()
    with (
        torch.no_grad(),
        torch.autocast(device, dtype=autocast or torch.float32, enabled=autocast is not None),
    ):
        image = inferencer(text=prompt, **hyper)["image"]
    if device == "cuda":
        torch.cuda.synchronize()
    official_s = time.perf_counter() - start
    del theirs._forward_flow  # the class's method again
    inferencer.decode_image = decode

    spec = SamplingSpec(args.resolution, args.steps, args.guidance, max_sequence_length=4096)
    cond = ours.encode_prompts([prompt], "", args.guidance, spec.max_sequence_length)
    with (
        torch.no_grad(),
        torch.autocast(device, dtype=autocast or torch.float32, enabled=autocast is not None),
    ):
        x, t = seen["x"].to(ours.device)[None], seen["t"].to(ours.device).float()
        velocity = ours.predict_velocity(x, t, cond, args.guidance, args.resolution, args.resolution)
    start = time.perf_counter()
    out = rollout(
        ours, [prompt], [seed], spec, sde_window_mask(1, args.steps, 1, 0) & False, autocast_dtype=autocast
    )
    if device == "cuda":
        torch.cuda.synchronize()
    ours_s = time.perf_counter() - start
    same_noise = torch.equal(out.latents[0, 0].cpu(), seen["x"].float().cpu())
    row = (
        f"{prompt[:32]!r} | {seed} | {same_noise} | {relative(velocity[0], seen['v']):.1e} | "
        f"{relative(out.latents[0, -1], latents['official']):.1e}"
    )
    if image is not None:
        official_image = torch.from_numpy(np.asarray(image)).float().permute(2, 0, 1)
        # the official image is truncated to uint8 (``to(torch.uint8)``), so ours is too
        mine = (out.images[0].cpu() * 255).to(torch.uint8).float()
        diff = (mine - official_image).abs()
        row += f" | {diff.max().item():.0f} / {diff.mean().item():.2f}"
    return row + f" | {ours_s:.2f} s / {official_s:.2f} s = {ours_s / official_s:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bagel-repo", required=True, help="a clone of github.com/ByteDance-Seed/Bagel")
    parser.add_argument("--model", help="the BAGEL-7B-MoT checkpoint folder (real weights, GPU)")
    parser.add_argument("--tiny", action="store_true", help="tiny:bagel on a CPU in float32 instead")
    parser.add_argument("--prompt", action="append", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=None, help="our T (the official num_timesteps is T + 1)")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=4.0)
    args = parser.parse_args()
    if args.tiny == bool(args.model):
        parser.error("give either --model (real weights, GPU) or --tiny")
    if args.model and not torch.cuda.is_available():
        raise SystemExit("bagel_parity_gpu.py --model needs a CUDA device")
    args.steps = args.steps or (6 if args.tiny else 14)
    args.resolution = args.resolution or (64 if args.tiny else 512)
    prompts = args.prompt or ["a photo of a cat"]

    from flowgrpo_core.models import load_model

    import_official(args.bagel_repo, cpu=args.tiny)
    if args.tiny:
        # the official attention casts to bf16 whatever the model's dtype; in float32 those casts are no-ops,
        # so the comparison shows the implementations' difference, not bf16 rounding
        torch.bfloat16 = torch.float32
        ours, autocast, dtype = load_model("tiny:bagel"), None, torch.float32
        folder = tempfile.mkdtemp(prefix="tiny-bagel-")
        ours.pipeline.save_pretrained(folder)
    else:
        ours, autocast, dtype = (
            load_model(args.model, dtype="bfloat16", device="cuda"),
            torch.bfloat16,
            torch.bfloat16,
        )
        folder = args.model
    theirs, inferencer = official(folder, ours, "cpu" if args.tiny else "cuda", dtype)
    header = "prompt | seed | same initial noise | first velocity rel. L2 | final latent rel. L2"
    header += "" if args.tiny else " | image max / mean abs diff (0-255)"
    print(header + " | time ours / official")
    for prompt in prompts:
        for seed in args.seeds:
            print(compare(theirs, inferencer, ours, prompt, seed, args, autocast))
    if args.tiny:  # with real weights the rows above compare decoded images already
        print(
            f"VAE: the official autoencoder reads ae.safetensors strictly; decode rel. L2 {vae_parity(folder, ours):.1e}"
        )


if __name__ == "__main__":
    main()
