"""CLIP-family rewards (clipscore, pickscore, aesthetic, hpsv2) and ImageReward on tiny random models of the
real architectures, built from configs with fixed seeds; loading from folders, files and S3 (moto)."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from reward_fixtures import (
    aesthetic_head_file,
    moto_s3,
    random_image,
    save_clip_processor,
    serving,
    tiny_clip_config,
    tiny_clip_folder,
    tiny_imagereward_folder,
)
from torch import nn

from flowgrpo_core.rewards import build_reward
from flowgrpo_core.rewards.clip_rewards import Aesthetic, ClipScore, HPSv2, PickScore
from flowgrpo_core.rewards.imagereward import ImageReward
from flowgrpo_core.rewards.openclip_convert import openclip_to_transformers
from flowgrpo_core.serving.client import RemoteReward
from flowgrpo_core.sources import WeightsSourceError

PROMPTS = ["a red cat", "a blue dog", "a photo of the sea", "a red cat"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    return {
        "clip0": tiny_clip_folder(root / "clip0", seed=0),
        "clip0_again": tiny_clip_folder(root / "clip0_again", seed=0),
        "clip1": tiny_clip_folder(root / "clip1", seed=1),
        "head": aesthetic_head_file(root / "aesthetic.pth", embed_dim=16, seed=0),
        "root": root,
    }


@pytest.fixture(scope="module")
def images():
    return [random_image(seed) for seed in range(4)]


def _factories(models, folder):
    return {
        "clipscore": lambda: ClipScore(model=str(folder), device="cpu"),
        "pickscore": lambda: PickScore(model=str(folder), device="cpu"),
        "aesthetic": lambda: Aesthetic(model=str(folder), head=str(models["head"]), device="cpu"),
    }


@pytest.mark.parametrize("name", ["clipscore", "pickscore", "aesthetic"])
def test_deterministic_for_a_seed_and_different_for_other_images_and_seeds(models, images, name):
    scores = _factories(models, models["clip0"])[name]()(images, PROMPTS).scores
    again = _factories(models, models["clip0_again"])[name]()(images, PROMPTS).scores
    other_seed = _factories(models, models["clip1"])[name]()(images, PROMPTS).scores
    assert np.all(np.isfinite(scores)) and scores.shape == (4,)
    np.testing.assert_array_equal(scores, again)  # same seed, rebuilt from scratch: bit-identical
    assert len(set(np.round(scores[:3], 7))) == 3, "different images must get different scores"
    assert not np.allclose(scores, other_seed)


def test_text_rewards_depend_on_the_prompt(models, images):
    reward = ClipScore(model=str(models["clip0"]), device="cpu")
    same_image = [images[0]] * 3
    scores = reward(same_image, ["a red cat", "a blue dog", "zzz"]).scores
    assert len(set(np.round(scores, 7))) == 3


def test_clipscore_is_the_cosine_and_pickscore_its_scaled_logit(models, images):
    clip = ClipScore(model=str(models["clip0"]), device="cpu")
    pick = PickScore(model=str(models["clip0"]), device="cpu")
    cosine = clip(images, PROMPTS).scores
    assert np.all(np.abs(cosine) <= 1.0)
    out = pick(images, PROMPTS)
    scale = pick.model.logit_scale.exp().item()
    np.testing.assert_allclose(out.details["pickscore_raw"], scale * cosine, rtol=1e-5)
    np.testing.assert_allclose(out.scores, scale * cosine / 26.0, rtol=1e-5)


def test_served_scores_equal_in_process_scores(models, images):
    reward = PickScore(model=str(models["clip0"]), device="cpu")
    expected = reward(images, PROMPTS)
    with serving(reward, max_batch=8) as server:
        remote = RemoteReward("pickscore", server.url)(images, PROMPTS)
        health = RemoteReward("pickscore", server.url).client.health()
    # lossless PNG + JSON float64 round trip: bit-identical to the in-process call on the same batch
    np.testing.assert_array_equal(remote.scores, expected.scores)
    assert remote.details["pickscore_raw"] == expected.details["pickscore_raw"]
    assert (
        health["name"] == "pickscore"
        and health["device"] == "cpu"
        and health["model"]["model"] == str(models["clip0"])
    )
    with serving(reward, max_batch=3) as server:  # the server splits 4 images into model calls of 3 + 1
        chunked = RemoteReward("pickscore", server.url)(images, PROMPTS)
        assert server.batcher.stats.as_dict()["largest_batch"] == 3
    np.testing.assert_allclose(chunked.scores, expected.scores, rtol=1e-5)  # batch-size rounding only


def test_build_reward_by_name_with_options(models, images):
    reward = build_reward("aesthetic", model=str(models["clip0"]), head=str(models["head"]), device="cpu")
    assert isinstance(reward, Aesthetic) and reward(images[:2], PROMPTS[:2]).scores.shape == (2,)


def test_aesthetic_head_from_safetensors_and_dimension_check(models, images, tmp_path):
    from safetensors.torch import save_file

    state = torch.load(models["head"], weights_only=True)
    save_file(state, tmp_path / "head.safetensors")
    from_pth = Aesthetic(model=str(models["clip0"]), head=str(models["head"]), device="cpu")(
        images, PROMPTS
    ).scores
    from_st = Aesthetic(model=str(models["clip0"]), head=str(tmp_path / "head.safetensors"), device="cpu")(
        images, PROMPTS
    ).scores
    np.testing.assert_array_equal(from_pth, from_st)
    wrong = aesthetic_head_file(tmp_path / "wide.pth", embed_dim=768)
    with pytest.raises(WeightsSourceError, match="768-d embeddings"):
        Aesthetic(model=str(models["clip0"]), head=str(wrong), device="cpu")


def test_weights_that_are_not_plain_tensors_are_refused(models, tmp_path):
    """torch.load(weights_only=True): a pickle carrying an arbitrary object is never executed."""
    path = tmp_path / "evil.pth"
    torch.save({"layers.0.weight": OrderedDict(), "payload": _Payload()}, path)
    with pytest.raises(WeightsSourceError, match="weights_only=True"):
        Aesthetic(model=str(models["clip0"]), head=str(path), device="cpu")


class _Payload:
    pass


def test_clip_reward_loads_from_s3(models, images, tmp_path):
    from flowgrpo_core.storage import s3_client, upload_folder

    expected = ClipScore(model=str(models["clip0"]), device="cpu")(images, PROMPTS).scores
    with moto_s3(tmp_path):
        s3_client().create_bucket(Bucket="models")
        upload_folder(models["clip0"], "s3://models/tiny-clip")
        s3_client().upload_file(str(models["head"]), "models", "heads/aesthetic.pth")
        from_s3 = ClipScore(model="s3://models/tiny-clip", device="cpu")(images, PROMPTS).scores
        aesthetic = Aesthetic(
            model="s3://models/tiny-clip", head="s3://models/heads/aesthetic.pth", device="cpu"
        )
        assert aesthetic(images, PROMPTS).scores.shape == (4,)
        with pytest.raises(WeightsSourceError, match="no objects under"):
            ClipScore(model="s3://models/missing", device="cpu")
    np.testing.assert_array_equal(from_s3, expected)


def test_unknown_source_is_a_clear_error():
    with pytest.raises(WeightsSourceError, match="neither an existing folder"):
        ClipScore(model="/no/such/folder", device="cpu")


# ---- HPSv2: open_clip checkpoint -> transformers CLIP -----------------------------------------------


class _Block(nn.Module):
    """open_clip's ResidualAttentionBlock (pre-LN, nn.MultiheadAttention, GELU MLP)."""

    def __init__(self, width: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, mlp), gelu=nn.GELU(), c_proj=nn.Linear(mlp, width))
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class _Tower(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(_Block(width, heads, mlp) for _ in range(layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, mask)
        return x


class _Visual(nn.Module):
    def __init__(
        self, width: int, layers: int, heads: int, mlp: int, embed: int, image: int, patch: int
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * width**-0.5)
        self.positional_embedding = nn.Parameter(torch.randn((image // patch) ** 2 + 1, width) * width**-0.5)
        self.ln_pre, self.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
        self.transformer = _Tower(width, layers, heads, mlp)
        self.proj = nn.Parameter(torch.randn(width, embed) * width**-0.5)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixels).flatten(2).transpose(1, 2)  # (B, grid^2, width)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class OpenClipReference(nn.Module):
    """open_clip's CLIP forward, written from its equations, in its parameter layout (what HPSv2 ships)."""

    def __init__(
        self, width=32, layers=2, heads=2, mlp=64, embed=16, vocab=600, context=77, image=32, patch=8
    ) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.randn(context, width) * 0.01)
        self.transformer = _Tower(width, layers, heads, mlp)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, embed) * width**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.visual = _Visual(width, layers, heads, mlp, embed, image, patch)
        self.register_buffer(
            "attn_mask", torch.full((context, context), float("-inf")).triu(1), persistent=True
        )

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        x = self.token_embedding(ids) + self.positional_embedding[:length]
        x = self.ln_final(self.transformer(x, self.attn_mask[:length, :length]))
        return nn.functional.normalize(
            x[torch.arange(len(ids)), ids.argmax(-1)] @ self.text_projection, dim=-1
        )

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.visual(pixels), dim=-1)


@pytest.fixture(scope="module")
def hps(models):
    torch.manual_seed(3)
    reference = OpenClipReference().eval()
    # the HPS release wraps the weights: {"state_dict": ...}, with the causal mask buffer inside
    checkpoint = models["root"] / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": reference.state_dict()}, checkpoint)
    config_folder = models["root"] / "laion-like"
    tiny_clip_config(projection_dim=16, hidden_act="gelu").save_pretrained(config_folder)
    save_clip_processor(config_folder)
    return reference, checkpoint, config_folder


def test_hpsv2_conversion_matches_the_open_clip_forward(hps, images):
    reference, checkpoint, config_folder = hps
    reward = HPSv2(model=str(checkpoint), processor=str(config_folder), device="cpu")
    pixels = reward.processor(images=images, return_tensors="pt")["pixel_values"]
    ids = reward.processor.tokenizer(PROMPTS, padding=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = (reference.encode_image(pixels) * reference.encode_text(ids)).sum(-1).numpy()
    scores = reward(images, PROMPTS).scores
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert len(set(np.round(scores[:3], 6))) == 3
    # the folder + file-name form finds the same checkpoint
    from_folder = HPSv2(model=str(checkpoint.parent), processor=str(config_folder), device="cpu")(
        images, PROMPTS
    ).scores
    np.testing.assert_array_equal(from_folder, scores)


def test_openclip_conversion_rejects_other_architectures():
    with pytest.raises(ValueError, match="unexpected keys"):
        openclip_to_transformers({"visual.trunk.stem.weight": torch.zeros(1)})


# ---- ImageReward ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imagereward_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagereward")
    return tiny_imagereward_folder(root / "seed0", seed=0), tiny_imagereward_folder(root / "seed1", seed=1)


def test_imagereward_is_deterministic_and_sees_image_and_prompt(imagereward_folders, images):
    (model0, tokenizer0), (model1, _) = imagereward_folders
    reward = ImageReward(model=str(model0), tokenizer=str(tokenizer0), device="cpu")
    assert reward.image_size == 32 and reward.vision.config.num_hidden_layers == 2
    scores = reward(images, PROMPTS).scores
    np.testing.assert_array_equal(
        scores,
        ImageReward(model=str(model0), tokenizer=str(tokenizer0), device="cpu")(images, PROMPTS).scores,
    )
    assert len(set(np.round(scores[:3], 6))) == 3
    prompts_differ = reward([images[0]] * 2, ["a red cat", "a blue dog"]).scores
    assert prompts_differ[0] != prompts_differ[1]
    other = ImageReward(model=str(model1), tokenizer=str(tokenizer0), device="cpu")(images, PROMPTS).scores
    assert not np.allclose(scores, other)


def test_imagereward_rejects_a_foreign_checkpoint(tmp_path):
    (tmp_path / "med_config.json").write_text("{}")
    torch.save({"model.weight": torch.zeros(2)}, tmp_path / "ImageReward.pt")
    with pytest.raises(WeightsSourceError, match="not an ImageReward checkpoint"):
        ImageReward(model=str(tmp_path), tokenizer=str(tmp_path), device="cpu")
