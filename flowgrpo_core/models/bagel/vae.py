"""Bagel's VAE: FLUX.1's autoencoder, stored as ``ae.safetensors`` in Black Forest Labs' parameter names
(``encoder.down.0.block.0.conv1.weight``), run as diffusers' ``AutoencoderKL``.

Reading uses diffusers' own converter of that layout (``convert_ldm_vae_checkpoint``), the one its
``from_single_file`` applies to FLUX's ``ae.safetensors``; writing (the tiny model) is its inverse, below.
The architecture is read off the tensor shapes (the official loader hard-codes FLUX's); the latent scale and
shift are FLUX's constants, which the official loader hard-codes as well.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from flowgrpo_core.models.base import ModelSourceError

AE_FILE = "ae.safetensors"
# FLUX.1's latent normalisation (``scale_factor`` / ``shift_factor`` of the official ``load_ae``)
FLUX_SCALING_FACTOR = 0.3611
FLUX_SHIFT_FACTOR = 0.1159
NORM_GROUPS = 32  # the autoencoder's GroupNorm, fixed in its code


def vae_config(shapes: Mapping[str, tuple[int, ...]]) -> dict:
    """The ``AutoencoderKL`` config of an ``ae.safetensors`` from its tensor shapes: widths per level, resnets
    per level and latent channels."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise ModelSourceError(f"{AE_FILE}: tensor {key} is missing (not a FLUX autoencoder)")
        return shapes[key]

    levels = 1 + max((int(m[1]) for k in shapes if (m := re.match(r"encoder\.down\.(\d+)\.", k))), default=-1)
    if levels == 0:
        raise ModelSourceError(f"{AE_FILE}: no encoder.down.* tensors (not a FLUX autoencoder)")
    resnets = 1 + max(int(m[1]) for k in shapes if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)))
    widths = [shape(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in range(levels)]
    return autoencoder_config(
        widths,
        resnets,
        shape("decoder.conv_in.weight")[1],
        shape("encoder.conv_in.weight")[1],
        shape("decoder.conv_out.weight")[0],
    )


def autoencoder_config(
    widths: list[int], resnets: int, latent_channels: int, in_channels: int = 3, out_channels: int = 3
) -> dict:
    """``AutoencoderKL``'s config of a FLUX-style autoencoder: ``widths`` per level (FLUX: 128, 256, 512,
    512), ``resnets`` per level (FLUX: 2), FLUX's GroupNorm and latent scale and shift, no quant convs."""
    levels = len(widths)
    return {
        "in_channels": in_channels,
        "out_channels": out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": list(widths),
        "layers_per_block": resnets,
        "latent_channels": latent_channels,
        "norm_num_groups": NORM_GROUPS,
        "scaling_factor": FLUX_SCALING_FACTOR,
        "shift_factor": FLUX_SHIFT_FACTOR,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    }


def from_original(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """Black Forest Labs' names -> ``AutoencoderKL``'s (diffusers' converter)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    return convert_ldm_vae_checkpoint(dict(state_dict), dict(config))


# (diffusers pattern, original replacement) applied in order; ``{up}`` is filled per decoder level because
# the original numbers the decoder's levels from the lowest resolution, diffusers from the highest
_RENAMES = (
    (r"\.down_blocks\.(\d+)\.resnets\.", r".down.\1.block."),
    (r"\.down_blocks\.(\d+)\.downsamplers\.0\.", r".down.\1.downsample."),
    (r"\.upsamplers\.0\.", ".upsample."),
    (r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m[1]) + 1}."),
    (r"\.mid_block\.attentions\.0\.group_norm\.", ".mid.attn_1.norm."),
    (r"\.mid_block\.attentions\.0\.to_(q|k|v)\.", r".mid.attn_1.\1."),
    (r"\.mid_block\.attentions\.0\.to_out\.0\.", ".mid.attn_1.proj_out."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"\.conv_norm_out\.", ".norm_out."),
)


def to_original(state_dict: Mapping[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """``AutoencoderKL``'s names -> Black Forest Labs' (the inverse of :func:`from_original`); the attention
    projections become 1x1 convolutions again."""
    out = {}
    for key, value in state_dict.items():
        name = re.sub(r"\.up_blocks\.(\d+)\.resnets\.", lambda m: f".up.{levels - 1 - int(m[1])}.block.", key)
        name = re.sub(r"\.up_blocks\.(\d+)\.", lambda m: f".up.{levels - 1 - int(m[1])}.", name)
        for pattern, replacement in _RENAMES:
            name = re.sub(pattern, replacement, name)
        if re.search(r"\.attn_1\.(q|k|v|proj_out)\.weight$", name):
            value = value[:, :, None, None]
        out[name] = value
    return out


def build_vae(config: Mapping):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**config)
