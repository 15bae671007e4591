"""The official Bagel checkpoint folder (``ByteDance-Seed/BAGEL-7B-MoT``), read and written as it is:

- ``llm_config.json``: the Qwen2 config of the language model (the official loader then sets ``qk_norm``,
  untied embeddings and the MoT layer; so do we);
- ``config.json`` and ``vit_config.json``: written for completeness, not read. The official loader reads
  neither (it passes ``latent_patch_size=2, max_latent_size=64`` in code); we read both off the tensors
  (``vae2llm``'s input width, the rows of ``latent_pos_embed``), as the VAE's architecture is;
- ``ema.safetensors``: every weight of the model, in the names of :class:`BagelTransformer` (the ViT, its
  connector and ``lm_head`` are left on disk);
- ``ae.safetensors``: the FLUX autoencoder (:mod:`.vae`);
- the Qwen2 tokenizer (``tokenizer.json`` or ``vocab.json`` + ``merges.txt``, with ``tokenizer_config.json``).

:func:`check_folder` reads only configs and safetensors headers, so a folder with a missing file, a missing or
unexpected tensor or a tensor of the wrong shape fails before any weight is read, naming it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from flowgrpo_core.models.bagel.model import UNDERSTANDING_ONLY_PREFIXES, BagelTransformer
from flowgrpo_core.models.bagel.vae import AE_FILE, build_vae, from_original, to_original, vae_config
from flowgrpo_core.models.base import ModelSourceError

LLM_CONFIG = "llm_config.json"
BAGEL_CONFIG = "config.json"  # written, not read
VIT_CONFIG = "vit_config.json"
EMA_FILE = "ema.safetensors"
REQUIRED_FILES = (LLM_CONFIG, EMA_FILE, AE_FILE)
TOKENIZER_VOCABULARIES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
# the fields of llm_config.json a model needs
LLM_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "rms_norm_eps",
)
# the official loader's overrides of llm_config.json: qk-norm on, untied embeddings, MoT layers
OFFICIAL_LLM_OVERRIDES = {
    "qk_norm": True,
    "tie_word_embeddings": False,
    "layer_module": "Qwen2MoTDecoderLayer",
}
# the tokens a text-to-image call uses, added to the tokenizer when missing as the official loader does
SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")
# how many names an error lists before "and N more"
_SHOWN = 8


@dataclass(frozen=True)
class BagelLayout:
    """What a checked folder holds: the transformer's and the VAE's configs."""

    folder: Path
    transformer_config: dict
    vae_config: dict
    vit_config: dict  # kept to be written again, never used


def _json(folder: Path, name: str) -> dict:
    try:
        value = json.loads((folder / name).read_text())
    except (OSError, ValueError) as error:
        raise ModelSourceError(f"{folder / name}: cannot read: {error}") from error
    if not isinstance(value, dict):
        raise ModelSourceError(f"{folder / name}: expected a JSON object")
    return value


def header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors raises its own error types for a damaged header
        raise ModelSourceError(f"{path}: not a readable safetensors file: {error}") from error


def _names(keys) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def compare_shapes(
    path: Path, found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], ignored=()
) -> None:
    """Refuse a file whose tensors differ from ``expected``: missing, unexpected (outside the ``ignored``
    prefixes) or of another shape, naming them."""
    missing = expected.keys() - found.keys()
    unexpected = {k for k in found.keys() - expected.keys() if not k.startswith(tuple(ignored))}
    wrong = {k: (found[k], expected[k]) for k in expected.keys() & found.keys() if found[k] != expected[k]}
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors: {_names(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors: {_names(unexpected)}")
    if wrong:
        shown = sorted(wrong)[:_SHOWN]
        problems.append(
            "tensors of the wrong shape: "
            + ", ".join(f"{k} {list(wrong[k][0])} (expected {list(wrong[k][1])})" for k in shown)
        )
    if problems:
        raise ModelSourceError(f"{path}: " + "; ".join(problems))


def transformer_config(folder: Path, ema: dict[str, tuple[int, ...]], latent_channels: int) -> dict:
    """``BagelTransformer``'s config: ``llm_config.json`` with the official loader's overrides, the patch size
    and the position table's side read off ``ema.safetensors``' shapes (``ema``)."""
    llm = _json(folder, LLM_CONFIG)
    absent = [f for f in LLM_FIELDS if f not in llm]
    if absent:
        raise ModelSourceError(f"{folder / LLM_CONFIG}: missing fields {absent}")
    if llm["hidden_size"] % llm["num_attention_heads"]:
        raise ModelSourceError(f"{folder / LLM_CONFIG}: hidden_size is not a multiple of num_attention_heads")
    llm = llm | OFFICIAL_LLM_OVERRIDES
    path = folder / EMA_FILE
    for key in ("vae2llm.weight", "latent_pos_embed.pos_embed"):
        if key not in ema:
            raise ModelSourceError(f"{path}: tensor {key} is missing")
    patch = math.isqrt(ema["vae2llm.weight"][1] // latent_channels)
    side = math.isqrt(ema["latent_pos_embed.pos_embed"][0])
    if patch * patch * latent_channels != ema["vae2llm.weight"][1]:
        raise ModelSourceError(
            f"{path}: vae2llm.weight {list(ema['vae2llm.weight'])} takes no square patch of "
            f"{latent_channels}-channel latents"
        )
    if side * side != ema["latent_pos_embed.pos_embed"][0]:
        raise ModelSourceError(f"{path}: latent_pos_embed.pos_embed has no square number of rows")
    return {
        "llm_config": llm,
        "latent_channels": latent_channels,
        "latent_patch_size": patch,
        "max_latent_size": side,
    }


def _meta_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def check_folder(folder: Path, source: str = "") -> BagelLayout:
    """Everything that can be checked without reading weights; see the module docstring."""
    folder = Path(folder)
    label = source or str(folder)
    absent = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if absent:
        raise ModelSourceError(f"{label}: Bagel checkpoint folder {folder} lacks {', '.join(absent)}")
    if not any(all((folder / f).is_file() for f in files) for files in TOKENIZER_VOCABULARIES):
        expected = " or ".join(" + ".join(files) for files in TOKENIZER_VOCABULARIES)
        raise ModelSourceError(f"{label}: Bagel checkpoint folder {folder} has no tokenizer ({expected})")
    ae_shapes = header_shapes(folder / AE_FILE)
    vae = vae_config(ae_shapes)
    with torch.device("meta"):
        expected_ae = to_original(build_vae(vae).state_dict(), len(vae["block_out_channels"]))
    compare_shapes(folder / AE_FILE, ae_shapes, {k: tuple(v.shape) for k, v in expected_ae.items()})
    ema_shapes = header_shapes(folder / EMA_FILE)
    config = transformer_config(folder, ema_shapes, vae["latent_channels"])
    with torch.device("meta"):
        expected = _meta_shapes(BagelTransformer(**config))
    compare_shapes(folder / EMA_FILE, ema_shapes, expected, UNDERSTANDING_ONLY_PREFIXES)
    vit = _json(folder, VIT_CONFIG) if (folder / VIT_CONFIG).is_file() else {}
    return BagelLayout(folder, config, vae, vit)


def resolution_factor(folder: Path) -> int:
    """Image sides must be multiples of this: the VAE's downsampling (from ``ae.safetensors``' header) times
    the patch size."""
    vae = vae_config(header_shapes(folder / AE_FILE))
    config = transformer_config(folder, header_shapes(folder / EMA_FILE), vae["latent_channels"])
    return 2 ** (len(vae["block_out_channels"]) - 1) * config["latent_patch_size"]


def _read(path: Path, keys, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k).to(dtype) for k in keys}


def read_transformer(layout: BagelLayout, dtype: torch.dtype) -> BagelTransformer:
    """The transformer with the weights of ``ema.safetensors`` (only those it uses are read)."""
    with torch.device("meta"):
        model = BagelTransformer(**layout.transformer_config)
    weights = _read(layout.folder / EMA_FILE, model.state_dict().keys(), dtype)
    model.load_state_dict(weights, strict=True, assign=True)
    model.latent_pos_embed.pos_embed.requires_grad_(False)  # a fixed table, never trained
    return model.eval()


def read_vae(layout: BagelLayout, dtype: torch.dtype):
    path = layout.folder / AE_FILE
    from safetensors.torch import load_file

    weights = from_original(load_file(str(path)), layout.vae_config)
    with torch.device("meta"):
        vae = build_vae(layout.vae_config)
    vae.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=True, assign=True)
    return vae.eval()


def read_tokenizer(folder: Path):
    """The folder's tokenizer with Bagel's special tokens (added when missing, as the official loader does)."""
    from transformers import Qwen2Tokenizer

    # the class the official loader names (AutoTokenizer could be misled by the folder's config.json)
    tokenizer = Qwen2Tokenizer.from_pretrained(str(folder))
    missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing)
    return tokenizer


def write_folder(
    folder: Path, transformer: BagelTransformer, vae, tokenizer, vit_config: dict | None
) -> None:
    """Save the three parts in the official layout."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = transformer.config
    llm = {k: v for k, v in config.llm_config.items() if k not in ("qk_norm", "layer_module")}
    (folder / LLM_CONFIG).write_text(json.dumps(llm, indent=2))
    bagel = {"latent_patch_size": config.latent_patch_size, "max_latent_size": config.max_latent_size}
    (folder / BAGEL_CONFIG).write_text(json.dumps({"visual_gen": True, "visual_und": True} | bagel, indent=2))
    (folder / VIT_CONFIG).write_text(json.dumps(vit_config or {}, indent=2))
    weights = {k: v.detach().contiguous() for k, v in transformer.state_dict().items()}
    save_file(weights, str(folder / EMA_FILE))
    levels = len(vae.config.block_out_channels)
    ae = to_original({k: v.detach() for k, v in vae.state_dict().items()}, levels)
    save_file({k: v.contiguous() for k, v in ae.items()}, str(folder / AE_FILE))
    tokenizer.save_pretrained(str(folder))
