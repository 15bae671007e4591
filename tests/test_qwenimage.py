"""The Qwen-Image family on its tiny random model: parity with ``QwenImagePipeline``, variable-length text padded
the same way in sampling and training (ratios exactly 1), true CFG as upstream computes it, LoRA, loading and
bad input, the trainer and the whole DAG."""

import json
import shutil

import pytest
import torch
from family_checks import (
    BF16_SETUP,
    ON_POLICY_BATCHINGS,
    assert_dag_registers_a_pyfunc,
    assert_resume_is_exact,
    bf16_epoch,
    on_policy_epoch,
    train_from_the_command_line,
)

from flowgrpo_core.config import ConfigError, load_config
from flowgrpo_core.models import Conditioning, ModelSourceError, QwenImageAdapter, adapter_for, load_model
from flowgrpo_core.models.loading import resolution_factor
from flowgrpo_core.models.qwenimage import text_batch, true_cfg
from flowgrpo_core.models.tiny import TinyQwenImageSpec, build_tiny_qwenimage
from flowgrpo_core.sampling import SamplingSpec, rollout, sde_window_mask
from flowgrpo_core.trainer import FlowGRPOTrainer

# three prompt lengths: the batch is padded to the longest, the shortest carries padding
PROMPTS = ["a photo of a cat", "hello world 42, and a much longer prompt than the others", "x"]
NEGATIVE = " "  # upstream's negative prompt for Qwen-Image
FAST = [
    "model.source=tiny:qwenimage",
    "train.checkpoint_every=0",
    "sampling.groups_per_epoch=2",
    "sampling.group_size=4",
    "sampling.num_steps=4",
]


@pytest.fixture(scope="module")
def pipe():
    pipe = build_tiny_qwenimage(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory, pipe):
    folder = tmp_path_factory.mktemp("tiny-qwenimage")
    pipe.save_pretrained(folder)
    return folder


def _ode(adapter, guidance, steps=4, prompts=PROMPTS, res=64):
    spec = SamplingSpec(res, steps, guidance, negative_prompt=NEGATIVE, max_sequence_length=64)
    mask = sde_window_mask(len(prompts), steps, 1, 0) & False
    return rollout(adapter, prompts, list(range(len(prompts))), spec, mask)


def _pipeline(pipe, guidance, steps=4, output_type="pt", **kwargs):
    generators = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    return pipe(
        PROMPTS,
        true_cfg_scale=guidance,
        height=64,
        width=64,
        num_inference_steps=steps,
        max_sequence_length=64,
        generator=generators,
        output_type=output_type,
        **kwargs,
    ).images


def _trainer(tmp_path, *overrides, name="run"):
    return FlowGRPOTrainer(
        load_config("tiny", overrides=[*FAST, *overrides]), tmp_path / name, progress=False
    )


# ---- the tiny model and the family's constants ----


def test_tiny_model_is_built_like_the_real_one(pipe):
    adapter = adapter_for(pipe)
    assert isinstance(adapter, QwenImageAdapter) and adapter.family == "qwenimage"
    # the tokenizer spells the chat template's system turn in as many tokens as the pipeline drops
    template = pipe.prompt_template_encode
    prefix = template[: template.index("{}")]
    assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 34
    assert adapter.resolution_factor == 16  # 2 ** len(temperal_downsample) x 2 for the packing
    assert (
        pipe.scheduler.config.time_shift_type == "exponential"
        and pipe.scheduler.config.shift_terminal == 0.02
    )
    # upstream's LoRA targets (train_qwenimage.py), in its order up to the attention projections' order
    assert sorted(adapter.lora_target_modules) == sorted(
        [
            "attn.to_k",
            "attn.to_q",
            "attn.to_v",
            "attn.to_out.0",
            "attn.add_k_proj",
            "attn.add_q_proj",
            "attn.add_v_proj",
            "attn.to_add_out",
            "img_mlp.net.0.proj",
            "img_mlp.net.2",
            "txt_mlp.net.0.proj",
            "txt_mlp.net.2",
        ]
    )


def test_tiny_builder_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    a, b, c = (build_tiny_qwenimage(seed=s) for s in (0, 0, 1))
    assert torch.rand(1).item() == before.item()
    for name in ("transformer", "text_encoder", "vae"):
        sa, sb, sc = (getattr(p, name).state_dict() for p in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        assert any(not torch.equal(sa[k], sc[k]) for k in sa), name


# ---- parity with the diffusers pipeline ----


def test_without_cfg_our_rollout_is_the_pipeline_bit_for_bit(pipe):
    # Prompts of three lengths: the pipeline passes the padding mask, as we do; guidance 1 makes no negative.
    ours = _ode(adapter_for(pipe), guidance=1.0)
    assert torch.equal(ours.images, _pipeline(pipe, 1.0))
    assert torch.equal(ours.latents[:, -1], _pipeline(pipe, 1.0, output_type="latent"))
    assert set(ours.cond.tensors) == {"embeds", "mask"}


def test_true_cfg_matches_the_pipeline_within_rounding(pipe):
    # The pipeline makes two transformer calls per step (prompts, then the negative at its own length); we make
    # upstream's one call on both, padded to one length and masked. Same arithmetic otherwise; measured max
    # |difference| (float32 rounding of the batched call): 4.2e-7 on the images in [0, 1] and 1.1e-6 on final
    # latents of magnitude up to 3.7.
    adapter = adapter_for(pipe)
    ours = _ode(adapter, guidance=4.0)
    cond = ours.cond.tensors
    negative = {"negative_prompt_embeds": cond["neg_embeds"], "negative_prompt_embeds_mask": cond["neg_mask"]}
    images = _pipeline(pipe, 4.0, **negative)
    latents = _pipeline(pipe, 4.0, output_type="latent", **negative)
    assert not torch.equal(ours.images, images)  # a different batching, not the same call
    torch.testing.assert_close(ours.images, images, rtol=0, atol=5e-6)
    torch.testing.assert_close(ours.latents[:, -1], latents, rtol=0, atol=5e-5)
    # guidance changes the image: both branches are used
    assert (ours.images - _ode(adapter, guidance=1.0).images).abs().max() > 1e-3


def test_cfg_velocity_is_upstreams_concatenated_call_bit_for_bit(pipe):
    # upstream's compute_log_prob (train_qwenimage.py) and its sampler: prompts and negatives padded to one
    # length, one call on [cond; neg] with both masks, then neg + g (cond - neg) rescaled to the cond's norm
    adapter = adapter_for(pipe)
    cond = adapter.encode_prompts(PROMPTS, NEGATIVE, 4.0, 64)
    latents = adapter.initial_noise([torch.Generator().manual_seed(i) for i in range(3)], 64, 64)
    sigma = torch.full((3,), 0.8)
    t = cond.tensors
    length = max(t["embeds"].shape[1], t["neg_embeds"].shape[1])
    pad = lambda x: torch.nn.functional.pad(x, (0, 0, 0, length - x.shape[1]))  # noqa: E731
    pad_mask = lambda m: torch.nn.functional.pad(m.long(), (0, length - m.shape[1]))  # noqa: E731
    timestep = (sigma * 1000).to(latents.dtype)
    with torch.no_grad():
        both = pipe.transformer(
            hidden_states=torch.cat([latents, latents]),
            timestep=torch.cat([timestep, timestep]) / 1000,
            encoder_hidden_states_mask=torch.cat([pad_mask(t["mask"]), pad_mask(t["neg_mask"])]),
            encoder_hidden_states=torch.cat([pad(t["embeds"]), pad(t["neg_embeds"])]),
            img_shapes=[[(1, 4, 4)]] * 6,
            return_dict=False,
        )[0]
        text, neg = both.chunk(2)
        combined = neg + 4.0 * (text - neg)
        expected = combined * (
            torch.norm(text, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True)
        )
        ours = adapter.predict_velocity(latents, sigma, cond, 4.0, 64, 64)
    assert torch.equal(ours, expected)


def test_true_cfg_rescales_each_token_to_the_conditional_norm_and_never_divides_by_zero():
    cond = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])
    uncond = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]])
    guided = true_cfg(cond, uncond, 4.0)  # token 0: (9, 13) rescaled to norm 5; token 1: cond == uncond
    torch.testing.assert_close(guided[0, 0], torch.tensor([9.0, 13.0]) * 5 / (9**2 + 13**2) ** 0.5)
    torch.testing.assert_close(guided[0, 1], torch.tensor([1.0, 0.0]))
    zero = true_cfg(torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), 4.0)
    assert torch.equal(zero, torch.zeros(1, 1, 2)) and guided.dtype == torch.float32


# ---- variable-length text ----


def test_conditioning_cat_pads_token_axes_and_trimming_restores_each_batch(pipe):
    adapter = adapter_for(pipe)
    long, short = (adapter.encode_prompts(p, NEGATIVE, 4.0, 64) for p in (PROMPTS[:2], PROMPTS[2:]))
    both = Conditioning.cat([long, short])
    t, s = both.tensors, short.tensors
    assert t["embeds"].shape[1] == long.tensors["embeds"].shape[1] > s["embeds"].shape[1]
    n = s["embeds"].shape[1]
    assert torch.equal(t["embeds"][2:, :n], s["embeds"]) and not t["embeds"][2:, n:].any()
    assert not t["mask"][2:, n:].any() and t["mask"].dtype == torch.bool
    # a batch taken out of the padded whole reaches the transformer as it was encoded
    for index, alone in ((slice(0, 2), long), (slice(2, 3), short)):
        for with_negative in (False, True):
            padded, original = text_batch(both.select(index), with_negative), text_batch(alone, with_negative)
            assert torch.equal(padded[0], original[0])
            assert (padded[1] is None and original[1] is None) or torch.equal(padded[1], original[1])
    # one prompt, no CFG: every token valid, no mask (as encode_prompt returns it)
    assert text_batch(short, False)[1] is None and text_batch(long, False)[1] is not None
    # SD3/FLUX tensors never differ in length: their cat is the plain one
    a = Conditioning({"embeds": torch.ones(2, 3, 4), "pooled": torch.ones(2, 4)})
    assert torch.equal(Conditioning.cat([a, a]).tensors["embeds"], torch.ones(4, 3, 4))


@pytest.mark.parametrize("batching", ON_POLICY_BATCHINGS)
def test_one_optimiser_step_is_exactly_on_policy_with_padded_prompts(tmp_path, batching):
    trainer = _trainer(tmp_path, *batching, "train.optimizer_steps_per_epoch=1", "train.beta=0.1")
    metrics = on_policy_epoch(trainer)
    assert metrics["train/trained_samples"] == 8
    mask = trainer.last_samples.cond.tensors["mask"]
    assert len(set(mask.sum(1).tolist())) > 1  # the prompts differ in length: some rows are padded
    trainer.train(epochs=2)
    assert any(p.abs().sum() > 0 for n, p in trainer.trainable.items() if "lora_B" in n)


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_sde_log_probs_are_finite_in_float32_and_bf16_autocast(pipe, autocast):
    adapter = adapter_for(pipe)
    spec = SamplingSpec(64, 4, 4.0, noise_level=1.2, negative_prompt=NEGATIVE, max_sequence_length=64)
    out = rollout(adapter, PROMPTS, [0, 1, 2], spec, sde_window_mask(3, 4, 0, 0), autocast_dtype=autocast)
    assert torch.isfinite(out.log_probs).all() and (out.log_probs != 0).all()
    assert torch.isfinite(out.latents).all() and torch.isfinite(out.images).all()


def test_a_bfloat16_model_trains_under_bf16_autocast_with_checkpointing(tmp_path):
    bf16_epoch(_trainer(tmp_path, *BF16_SETUP))


# ---- LoRA ----


def test_lora_on_the_family_targets_round_trips_through_save_and_load(tmp_path):
    adapter = load_model("tiny:qwenimage")
    base = _ode(adapter, 4.0).images
    adapter.add_lora(rank=4, alpha=8)
    layers = {n.rsplit(".lora_A", 1)[0] for n, _ in adapter.transformer.named_parameters() if ".lora_A." in n}
    first_block = "transformer_blocks.0."
    assert {n.removeprefix(first_block) for n in layers if n.startswith(first_block)} == set(
        adapter.lora_target_modules
    )
    with torch.no_grad():
        for name, p in adapter.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    tuned = _ode(adapter, 4.0).images
    assert not torch.allclose(tuned, base)
    with adapter.reference_model():
        assert torch.equal(_ode(adapter, 4.0).images, base)
    adapter.save_lora(tmp_path)
    fresh = build_tiny_qwenimage(seed=0)
    fresh.load_lora_weights(tmp_path, adapter_name="grpo")
    assert torch.equal(_ode(adapter_for(fresh), 4.0).images, tuned)


def test_mmdit_feed_forward_names_map_onto_the_qwen_streams():
    # the tiny preset names SD3's image-stream feed-forward; on Qwen-Image that is img_mlp
    adapter = load_model("tiny:qwenimage")
    adapter.add_lora(4, 8.0, target_modules=["attn.to_q", "proj_out", "ff.net.0.proj", "ff_context.net.2"])
    layers = {n.rsplit(".lora_A", 1)[0] for n, _ in adapter.transformer.named_parameters() if ".lora_A." in n}
    assert {n.split(".", 2)[-1] if n.startswith("transformer_blocks") else n for n in layers} == {
        "attn.to_q",
        "proj_out",
        "img_mlp.net.0.proj",
        "txt_mlp.net.2",
    }


# ---- Fast and resume ----


def test_fast_window_trains_only_its_steps(tmp_path):
    trainer = _trainer(
        tmp_path, "sampling.num_steps=8", "sampling.sde_window_size=2", "sampling.noise_level=1.2"
    )
    (metrics,) = trainer.train(epochs=1)
    samples = trainer.last_samples
    for row_mask, row_logp in zip(samples.sde_mask, samples.log_probs):
        steps = torch.nonzero(row_mask).flatten().tolist()
        assert len(steps) == 2 and steps[1] == steps[0] + 1 and 0 <= steps[0] <= 2
        assert torch.all(row_logp[~row_mask] == 0) and torch.all(row_logp[row_mask] != 0)
    trained = {int(k.rsplit("_", 1)[1]) for k in metrics if k.startswith("train/ratio_mean/step_")}
    assert trained and trained <= set(torch.nonzero(samples.sde_mask)[:, 1].tolist())


def test_interrupted_and_resumed_run_ends_with_the_same_parameters(tmp_path):
    assert_resume_is_exact(lambda *overrides, name: _trainer(tmp_path, *overrides, name=name))


# ---- loading and bad input ----


def test_folder_round_trip(qwen_folder):
    loaded, built = load_model(str(qwen_folder)), load_model("tiny:qwenimage")
    assert isinstance(loaded, QwenImageAdapter)
    for name in ("transformer", "vae", "text_encoder"):
        a, b = getattr(loaded.pipeline, name).state_dict(), getattr(built.pipeline, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert loaded.pipeline.tokenizer(PROMPTS).input_ids == built.pipeline.tokenizer(PROMPTS).input_ids
    # weights at other memory alignments round a few products differently (see tests/test_models.py)
    torch.testing.assert_close(_ode(loaded, 4.0).images, _ode(built, 4.0).images, rtol=0, atol=1e-5)
    assert resolution_factor(str(qwen_folder)) == 16


def test_hub_id_loads_the_family_from_the_cache_when_offline(qwen_folder, hub_cache):
    source = hub_cache(qwen_folder, "flowgrpo/tiny-qwenimage")
    assert resolution_factor(source) == 16  # read from the cached VAE config, before any weight loads
    loaded, built = load_model(source), load_model("tiny:qwenimage")
    assert isinstance(loaded, QwenImageAdapter)
    a, b = loaded.pipeline.transformer.state_dict(), built.pipeline.transformer.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _no_weights(monkeypatch):
    from diffusers import DiffusionPipeline

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", refuse)


def _copy(folder, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(folder, out)
    return out


def test_a_folder_of_an_unsupported_pipeline_fails_before_loading_weights(qwen_folder, tmp_path, monkeypatch):
    folder = _copy(qwen_folder, tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"_class_name": "QwenImageEditPipeline"}))
    _no_weights(monkeypatch)
    with pytest.raises(ModelSourceError, match=r"pipeline class QwenImageEditPipeline is not supported"):
        load_model(str(folder))


def test_a_missing_tokenizer_file_fails_before_loading_weights(qwen_folder, tmp_path, monkeypatch):
    folder = _copy(qwen_folder, tmp_path)
    (folder / "tokenizer" / "tokenizer.json").unlink()
    _no_weights(monkeypatch)
    with pytest.raises(ModelSourceError, match=r"tokenizer folder tokenizer/ has no vocabulary file"):
        load_model(str(folder))
    shutil.rmtree(folder / "tokenizer")
    with pytest.raises(ModelSourceError, match=r"component folder tokenizer/ \(Qwen2Tokenizer\) is missing"):
        load_model(str(folder))


def test_resolution_is_checked_against_the_vae_config_before_loading(tmp_path, monkeypatch):
    # a VAE with two halvings instead of three: factor 4 x 2 = 8, read from its config (it has no
    # block_out_channels, the KL VAE's field)
    folder = tmp_path / "model"
    build_tiny_qwenimage(seed=0, spec=TinyQwenImageSpec(vae_downsamples=2)).save_pretrained(folder)
    assert "block_out_channels" not in json.loads((folder / "vae" / "config.json").read_text())
    assert (
        resolution_factor(str(folder))
        == 8
        == adapter_for(build_tiny_qwenimage(0, TinyQwenImageSpec(vae_downsamples=2))).resolution_factor
    )
    _no_weights(monkeypatch)
    with pytest.raises(
        ConfigError, match=r"sampling.resolution: 60 is not divisible by the model's factor 8"
    ):
        load_config("tiny", overrides=[f"model.source={folder}", "sampling.resolution=60"])
    with pytest.raises(
        ConfigError, match=r"sampling.resolution: 72 is not divisible by the model's factor 16"
    ):
        load_config("tiny", overrides=["model.source=tiny:qwenimage", "sampling.resolution=72"])


# ---- presets and the command line ----


@pytest.mark.parametrize("name", ["qwenimage-pickscore", "qwenimage-ocr", "qwenimage-geneval"])
def test_presets_train_the_family_lora_targets_on_upstreams_window(name):
    cfg = load_config(name)
    assert cfg.model.source == "Qwen/Qwen-Image" and cfg.train.lora_target_modules == []  # the family's
    assert cfg.sampling.window_bounds() == (0, 5) and cfg.trained_steps_per_sample == 2
    assert cfg.sampling.guidance_scale == cfg.eval.guidance_scale == 4.0


def test_train_command_follows_the_model_family(tmp_path):
    output, keys = train_from_the_command_line(tmp_path / "run", "tiny:qwenimage", epochs=1)
    assert "epoch 0: reward" in output
    # the tiny preset's targets (attention, proj_out, the image stream's feed-forward) on Qwen-Image's modules
    assert any(".img_mlp.net.0.proj.lora_A" in k for k in keys) and any(".proj_out.lora_A" in k for k in keys)
    assert any(".attn.add_k_proj.lora_A" in k for k in keys) and not any(".ff." in k for k in keys)


# ---- the whole DAG ----


def test_flowgrpo_run_registers_a_qwenimage_pyfunc_that_generates_images(tmp_path):
    assert_dag_registers_a_pyfunc(tmp_path, "tiny:qwenimage", "qwenimage")
