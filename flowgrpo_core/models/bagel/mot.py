"""Bagel's language model: a Qwen2 decoder in a Mixture-of-Transformers layout.

Every decoder layer holds two experts with one shared self-attention: the understanding expert (Qwen2's
``q_proj, k_proj, v_proj, o_proj``, ``mlp``, the layer norms, the per-head ``q_norm`` / ``k_norm``) and the
generation expert, the same modules suffixed ``_moe_gen``. A token goes through one expert, chosen by what
it is: text tokens (and the ``<|vision_start|>`` / ``<|vision_end|>`` markers around an image) through the
understanding expert, latent patches through the generation expert; all tokens then attend to each other in
the shared attention. Module names follow the official checkpoint (``language_model.model.layers.N...``).

Sequences are batched and right-padded rather than packed as in the reference (which concatenates samples and
runs flash-attn's varlen kernel): attention is PyTorch's ``scaled_dot_product_attention`` with a boolean mask,
so the model runs on a CPU. Token routing uses a span: the tokens ``[a, b)`` of every row are generation
tokens, the others understanding tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# (keys, values) of one layer: (B, L, kv_heads, head_dim) each, after qk-norm and rotary embedding
LayerCache = tuple[torch.Tensor, torch.Tensor]
GenSpan = tuple[int, int]
NO_GEN: GenSpan = (0, 0)


class RMSNorm(nn.Module):
    """Qwen2's RMS norm: normalised in float32, scaled in the input's dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class MLP(nn.Module):
    """Qwen2's gated feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def route(
    x: torch.Tensor,
    gen: GenSpan,
    und: Callable[[torch.Tensor], torch.Tensor],
    gen_expert: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Apply ``gen_expert`` to the tokens ``[a, b)`` of every row of ``x`` (B, S, ...) and ``und`` to the rest,
    each expert in one call; the outputs keep the token order."""
    a, b = gen
    if a == b:
        return und(x)
    outside = und(torch.cat([x[:, :a], x[:, b:]], dim=1))
    return torch.cat([outside[:, :a], gen_expert(x[:, a:b]), outside[:, a:]], dim=1)


def rotary(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, S, head_dim) float32 of Qwen2's rotary embedding at integer ``positions`` (B, S)."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim
    )
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, S, heads, D) rotated by the (B, S, D) angles (the half-split convention of Qwen2)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


class MoTAttention(nn.Module):
    """Shared self-attention with per-expert projections and qk-norms."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, eps: float) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        for suffix in ("", "_moe_gen"):
            setattr(self, f"q_proj{suffix}", nn.Linear(hidden, heads * self.head_dim, bias=True))
            setattr(self, f"k_proj{suffix}", nn.Linear(hidden, kv_heads * self.head_dim, bias=True))
            setattr(self, f"v_proj{suffix}", nn.Linear(hidden, kv_heads * self.head_dim, bias=True))
            setattr(self, f"o_proj{suffix}", nn.Linear(heads * self.head_dim, hidden, bias=False))
            setattr(self, f"q_norm{suffix}", RMSNorm(self.head_dim, eps))
            setattr(self, f"k_norm{suffix}", RMSNorm(self.head_dim, eps))

    def _projections(self, suffix: str) -> Callable[[torch.Tensor], torch.Tensor]:
        q, k, v = (getattr(self, f"{n}_proj{suffix}") for n in "qkv")
        q_norm, k_norm = getattr(self, f"q_norm{suffix}"), getattr(self, f"k_norm{suffix}")
        d = self.head_dim

        def project(x: torch.Tensor) -> torch.Tensor:
            b, s = x.shape[:2]
            query = q_norm(q(x).view(b, s, self.heads, d))
            key = k_norm(k(x).view(b, s, self.kv_heads, d))
            value = v(x).view(b, s, self.kv_heads, d)
            # one tensor so that route() splits and joins the three together
            return torch.cat([query, key, value.to(key.dtype)], dim=2)

        return project

    def forward(
        self,
        x: torch.Tensor,
        gen: GenSpan,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        past: LayerCache | None = None,
    ) -> tuple[torch.Tensor, LayerCache]:
        """
        Args:
            x: (B, S, hidden) normalised hidden states of the query tokens.
            gen: the span of generation tokens.
            rope: cos, sin (B, S, head_dim) at the query tokens' positions.
            mask: (B, 1, S, P + S) bool, True where a query token may attend to a key (P cached keys first).
            past: the cached keys and values of P earlier tokens (the text prefill), or None.
        Returns:
            (B, S, hidden) attention output, and the (keys, values) of the query tokens.
        """
        qkv = route(x, gen, self._projections(""), self._projections("_moe_gen"))
        query, key, value = qkv.split([self.heads, self.kv_heads, self.kv_heads], dim=2)
        cos, sin = rope
        # the reference rotates in float32 and attends in the values' dtype
        query = apply_rotary(query, cos, sin).to(value.dtype)
        key = apply_rotary(key, cos, sin).to(value.dtype)
        keys, values = key, value
        if past is not None:
            keys, values = torch.cat([past[0], key], dim=1), torch.cat([past[1], value], dim=1)
        out = F.scaled_dot_product_attention(
            query.transpose(1, 2),
            keys.transpose(1, 2),
            values.transpose(1, 2),
            attn_mask=mask,
            enable_gqa=self.heads != self.kv_heads,
        )
        out = out.transpose(1, 2).flatten(2)
        return route(out, gen, self.o_proj, self.o_proj_moe_gen), (key, value)


class MoTDecoderLayer(nn.Module):
    def __init__(self, hidden: int, intermediate: int, heads: int, kv_heads: int, eps: float) -> None:
        super().__init__()
        self.self_attn = MoTAttention(hidden, heads, kv_heads, eps)
        self.mlp = MLP(hidden, intermediate)
        self.mlp_moe_gen = MLP(hidden, intermediate)
        self.input_layernorm = RMSNorm(hidden, eps)
        self.input_layernorm_moe_gen = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm_moe_gen = RMSNorm(hidden, eps)

    def forward(
        self,
        x: torch.Tensor,
        gen: GenSpan,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        past: LayerCache | None = None,
    ) -> tuple[torch.Tensor, LayerCache]:
        """Pre-norm attention and feed-forward, each through the token's expert; shapes as in
        :meth:`MoTAttention.forward`."""
        normed = route(x, gen, self.input_layernorm, self.input_layernorm_moe_gen)
        attended, cache = self.self_attn(normed, gen, rope, mask, past)
        x = x + attended
        mlp_und = lambda h: self.mlp(self.post_attention_layernorm(h))  # noqa: E731
        mlp_gen = lambda h: self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(h))  # noqa: E731
        return x + route(x, gen, mlp_und, mlp_gen), cache


class MoTModel(nn.Module):
    """Token embedding, the decoder layers and the final norms (``norm`` and ``norm_moe_gen``)."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        hidden, eps = config["hidden_size"], config["rms_norm_eps"]
        self.rope_theta = float(config.get("rope_theta", 10000.0))
        self.head_dim = hidden // config["num_attention_heads"]
        self.embed_tokens = nn.Embedding(config["vocab_size"], hidden)
        self.layers = nn.ModuleList(
            MoTDecoderLayer(
                hidden,
                config["intermediate_size"],
                config["num_attention_heads"],
                config["num_key_value_heads"],
                eps,
            )
            for _ in range(config["num_hidden_layers"])
        )
        self.norm = RMSNorm(hidden, eps)
        self.norm_moe_gen = RMSNorm(hidden, eps)
        self.gradient_checkpointing = False  # switched by ModelMixin.enable_gradient_checkpointing

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        gen: GenSpan = NO_GEN,
        past: list[LayerCache] | None = None,
    ) -> tuple[torch.Tensor, list[LayerCache]]:
        """Run embedded tokens ``x`` (B, S, hidden) at ``positions`` (B, S) through every layer; ``mask`` and
        ``past`` as in :meth:`MoTAttention.forward` (``past``: one cache per layer). Returns the normalised
        hidden states (B, S, hidden) and the query tokens' (keys, values) per layer."""
        rope = rotary(positions, self.head_dim, self.rope_theta)
        caches = []
        for i, layer in enumerate(self.layers):
            layer_past = past[i] if past is not None else None
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x, cache = self._gradient_checkpointing_func(layer, x, gen, rope, mask, layer_past)
            else:
                x, cache = layer(x, gen, rope, mask, layer_past)
            caches.append(cache)
        return route(x, gen, self.norm, self.norm_moe_gen), caches


class MoTLanguageModel(nn.Module):
    """The ``language_model`` of the checkpoint. Its ``lm_head`` (next-token logits) is not built: text-to-image
    never predicts text, and the loader skips those weights."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.model = MoTModel(config)
