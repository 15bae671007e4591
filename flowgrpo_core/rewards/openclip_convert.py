"""open_clip checkpoints (e.g. HPSv2's ViT-H-14) as transformers ``CLIPModel`` state dicts.

open_clip and transformers implement the same CLIP; only the parameter layout differs:
- attention: open_clip's ``nn.MultiheadAttention`` keeps q, k, v stacked in ``in_proj_weight`` (3D, D);
  transformers has separate ``q_proj``, ``k_proj``, ``v_proj``;
- projections: open_clip multiplies ``x @ proj`` with proj (width, embed_dim); transformers' Linear stores
  the transpose (embed_dim, width);
- names: ``ln_1``/``ln_2``/``c_fc``/``c_proj`` -> ``layer_norm1``/``layer_norm2``/``fc1``/``fc2``, etc.
Pooling matches: open_clip takes the text token at ``argmax(ids)`` (the end-of-text token has the
largest id) and the image class token after ``ln_post``, as transformers does. This covers the standard
ViT towers (no attentional pooler, no global average pooling).
"""

from __future__ import annotations

import re

import torch

_TOWERS = (
    ("visual.transformer.resblocks.", "vision_model.encoder.layers."),
    ("transformer.resblocks.", "text_model.encoder.layers."),
)
_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
_PLAIN = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
_TRANSPOSED = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}
# buffers and heads a CLIP tower does not have (HPS checkpoints may carry the causal mask)
_IGNORED = re.compile(r"^(attn_mask|visual\.attn_mask|logit_bias)$")


def openclip_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename and reshape an open_clip CLIP state dict for ``transformers.CLIPModel.load_state_dict``.

    A ``module.`` prefix (DistributedDataParallel checkpoints) is dropped. Unknown keys raise, so a
    checkpoint of a different architecture fails here instead of loading half its weights.
    """
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        key = key.removeprefix("module.")
        if _IGNORED.match(key):
            continue
        if key in _PLAIN:
            out[_PLAIN[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
        elif not _convert_block(key, value, out):
            unknown.append(key)
    if unknown:
        raise ValueError(f"not an open_clip ViT CLIP checkpoint: unexpected keys {unknown[:8]}")
    return out


def _convert_block(key: str, value: torch.Tensor, out: dict[str, torch.Tensor]) -> bool:
    for source, target in _TOWERS:
        if not key.startswith(source):
            continue
        index, _, rest = key[len(source) :].partition(".")
        prefix = f"{target}{index}."
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[1]  # weight | bias
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{prefix}self_attn.{name}.{kind}"] = part.contiguous()
            return True
        module, _, param = rest.rpartition(".")
        if module in _BLOCK:
            out[f"{prefix}{_BLOCK[module]}.{param}"] = value
            return True
        return False
    return False
