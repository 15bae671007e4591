"""The Bagel family on its tiny random model, read through the loader of the official checkpoint layout: the
generation path (text prefill, MoT routing, CFG with renorm), determinism, exact on-policy ratios, LoRA on the
generation expert, full fine-tuning of that expert, the loader's checks, resume, the CLI and the DAG."""

import json
import shutil

import numpy as np
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

from flowgrpo_core.config import load_config
from flowgrpo_core.models import BagelAdapter, ModelSourceError, load_model
from flowgrpo_core.models.bagel import BAGEL_LORA_TARGETS, BagelPipeline
from flowgrpo_core.models.bagel.adapter import renormalised_cfg
from flowgrpo_core.models.bagel.embeddings import sincos_table
from flowgrpo_core.models.bagel.layout import EMA_FILE
from flowgrpo_core.models.bagel.vae import AE_FILE, from_original, to_original
from flowgrpo_core.models.loading import resolution_factor
from flowgrpo_core.models.tiny import build_tiny_bagel
from flowgrpo_core.sampling import SamplingSpec, rollout, sde_window_mask
from flowgrpo_core.trainer import FlowGRPOTrainer

LAYER = "language_model.model.layers.0."
PROMPTS = ["a photo of a cat", "a dog in the snow, with a much longer prompt than the others", "x"]
FAST = [
    "model.source=tiny:bagel",
    "train.checkpoint_every=0",
    "sampling.groups_per_epoch=2",
    "sampling.group_size=4",
    "sampling.num_steps=4",
]


@pytest.fixture(scope="module")
def adapter():
    return load_model("tiny:bagel")


@pytest.fixture(scope="module")
def bagel_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-bagel")
    build_tiny_bagel(seed=0).save_pretrained(folder)
    return folder


def _ode(adapter, guidance=4.0, prompts=PROMPTS, seeds=None, steps=4):
    spec = SamplingSpec(64, steps, guidance, max_sequence_length=64)
    mask = sde_window_mask(len(prompts), steps, 1, 0) & False
    return rollout(adapter, prompts, seeds or list(range(len(prompts))), spec, mask)


def _trainer(tmp_path, *overrides, name="run"):
    return FlowGRPOTrainer(
        load_config("tiny", overrides=[*FAST, *overrides]), tmp_path / name, progress=False
    )


def _equal_states(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- the tiny model and the family's constants ----


def test_tiny_model_has_the_official_parameter_names_and_the_reference_settings(adapter, bagel_folder):
    assert isinstance(adapter, BagelAdapter) and adapter.family == "bagel"
    assert type(adapter.pipeline).__name__ == "BagelPipeline"
    names = set(adapter.transformer.state_dict())
    layer = "language_model.model.layers.0."
    for suffix in ("", "_moe_gen"):
        for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"):
            assert f"{layer}{module}{suffix}.weight" in names
        for module in ("self_attn.q_norm", "self_attn.k_norm", "input_layernorm", "post_attention_layernorm"):
            assert f"{layer}{module}{suffix}.weight" in names
        assert f"{layer}mlp{suffix}.gate_proj.weight" in names
        assert f"language_model.model.norm{suffix}.weight" in names
    assert f"{layer}self_attn.q_proj_moe_gen.bias" in names and f"{layer}self_attn.o_proj.bias" not in names
    for name in ("time_embedder.mlp.0.weight", "time_embedder.mlp.2.bias", "vae2llm.weight", "llm2vae.bias"):
        assert name in names
    assert "latent_pos_embed.pos_embed" in names and "language_model.model.embed_tokens.weight" in names
    # the ViT and lm_head are not built (text-to-image never runs them)
    assert not any(n.startswith(("vit_model.", "connector.", "language_model.lm_head")) for n in names)
    files = {p.name for p in bagel_folder.iterdir()}
    assert files >= {"config.json", "llm_config.json", "vit_config.json", EMA_FILE, AE_FILE, "tokenizer.json"}
    assert adapter.resolution_factor == 16 and adapter.lora_target_modules == BAGEL_LORA_TARGETS
    # the reference's schedule: linspace(1, 0, T + 1) shifted by 3
    t = torch.linspace(1, 0, 5)
    assert torch.equal(adapter.sigmas(4, 64, 64), 3 * t / (1 + 2 * t))
    # its special tokens
    tokens = adapter.pipeline.tokenizer.convert_ids_to_tokens(
        adapter.encode_prompts(["x"], "", 1.0, 8).tensors["ids"][0]
    )
    assert tokens == ["<|im_start|>", "x", "<|im_end|>"]


def test_position_table_is_the_reference_sine_cosine_grid():
    # the reference's construction (MAE's get_2d_sincos_pos_embed) in numpy, written out independently
    side, dim = 5, 16
    grid = np.stack(np.meshgrid(np.arange(side, dtype=np.float32), np.arange(side, dtype=np.float32)), 0)

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    expected = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
    assert torch.equal(sincos_table(side, dim), torch.from_numpy(expected).float())


def test_tiny_builder_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    a, b, c = (build_tiny_bagel(seed=s) for s in (0, 0, 1))
    assert torch.rand(1).item() == before.item()
    assert _equal_states(a.transformer, b.transformer) and _equal_states(a.vae, b.vae)
    assert not _equal_states(a.transformer, c.transformer)


# ---- the generation path ----


def test_generation_is_deterministic_per_seed(adapter):
    first, again = _ode(adapter), _ode(adapter)
    assert torch.equal(first.images, again.images) and torch.equal(first.latents, again.latents)
    other = _ode(adapter, seeds=[7, 8, 9])
    assert (other.images - first.images).abs().max() > 1e-3
    # an image does not depend on the batch it was drawn in beyond rounding (its prompt's padding is masked)
    alone = _ode(adapter, prompts=PROMPTS[2:], seeds=[2])
    torch.testing.assert_close(alone.images[0], first.images[2], rtol=0, atol=1e-5)


def test_text_prefill_then_image_block_is_one_pass_over_the_whole_sequence(adapter):
    # The cached path (prompt through the understanding expert, then the block against its keys and values)
    # against one pass over [prompt; block] with the mask the reference builds for training: causal text,
    # the block sees everything before it and itself.
    model = adapter.transformer
    cond = adapter.encode_prompts(PROMPTS[:1], "", 1.0, 64)
    ids = cond.tensors["ids"]
    latents = adapter.initial_noise([torch.Generator().manual_seed(0)], 64, 64)
    sigma = torch.tensor([0.7])
    start, end = (adapter.pipeline.token_id(t) for t in ("<|vision_start|>", "<|vision_end|>"))
    with torch.no_grad():
        cached = model(latents, sigma, ids, cond.tensors["mask"], (4, 4), (start, end))
        length, n = ids.shape[1], latents.shape[1]
        block = torch.cat(
            [
                model.embed(torch.tensor([[start]])),
                model.vae2llm(latents)
                + model.time_embedder(sigma)[:, None]
                + model.latent_pos_embed.pos_embed[
                    (torch.arange(4)[:, None] * model.config.max_latent_size + torch.arange(4)).flatten()
                ],
                model.embed(torch.tensor([[end]])),
            ],
            dim=1,
        )
        sequence = torch.cat([model.embed(ids), block], dim=1)
        total = length + n + 2
        mask = torch.zeros(total, total, dtype=torch.bool)
        mask[:length, :length] = torch.ones(length, length).tril().bool()
        mask[length:] = True
        positions = torch.cat([torch.arange(length), torch.full((n + 2,), length)])[None]
        # a block span beyond the text: the text tokens take the understanding expert
        hidden, _ = model.language_model.model(
            sequence, positions, mask[None, None], gen=(length + 1, total - 1)
        )
        one_pass = model.llm2vae(hidden[:, length + 1 : total - 1])
    torch.testing.assert_close(cached, one_pass, rtol=0, atol=1e-5)


def _perturbed(model, predicate):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if predicate(name):
                p.add_(torch.randn_like(p) * 0.5)
    return state


def test_mot_routes_text_through_the_understanding_expert_and_latents_through_the_generation_expert(adapter):
    model = adapter.transformer
    cond = adapter.encode_prompts(PROMPTS, "", 1.0, 64)
    ids, mask = cond.tensors["ids"], cond.tensors["mask"]
    n = 16
    block = torch.randn(3, n + 2, model.config.llm_config["hidden_size"])
    positions = torch.full((3, n + 2), 5)
    attend = torch.ones(3, 1, n + 2, n + 2, dtype=torch.bool)
    last = "language_model.model.layers.1."

    def outputs():
        with torch.no_grad():
            kv = model.prefill_text(ids, mask)
            hidden, _ = model.language_model.model(block, positions, attend, gen=(1, n + 1))
        return kv, hidden

    kv, hidden = outputs()
    # every generation weight changed: the prompt's keys and values (the text path) do not move, the patches do
    saved = _perturbed(model, lambda name: "moe_gen" in name)
    try:
        kv_gen, hidden_gen = outputs()
    finally:
        model.load_state_dict(saved)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(kv, kv_gen))
    assert not torch.allclose(hidden_gen[:, 1 : n + 1], hidden[:, 1 : n + 1])
    # the last layer's feed-forwards: the understanding one moves only the two markers around the image,
    # the generation one only the latent patches
    for expert, moved in (("mlp.", [0, n + 1]), ("mlp_moe_gen.", list(range(1, n + 1)))):
        saved = _perturbed(model, lambda name, e=expert: name.startswith(last + e))
        _, changed = outputs()
        model.load_state_dict(saved)
        differs = (changed - hidden).abs().amax(dim=(0, 2)) > 0
        assert differs.nonzero().flatten().tolist() == moved, expert
    # the understanding weights make the prompt's context
    saved = _perturbed(model, lambda name: name.startswith(last + "self_attn.k_proj."))
    kv_und, _ = outputs()
    model.load_state_dict(saved)
    assert not torch.equal(kv_und[1][0], kv[1][0]) and torch.equal(kv_und[0][0], kv[0][0])


def test_renormalised_cfg_is_the_reference_global_renorm():
    cond = torch.tensor([[[3.0, 4.0], [0.0, 0.0]]])  # |c| = 5
    uncond = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    guided = uncond + 2.0 * (cond - uncond)  # (5, 8): norm sqrt(89) > 5, scaled down to 5
    out = renormalised_cfg(cond, uncond, 2.0, 0.0)
    torch.testing.assert_close(out, guided * (5 / (89**0.5 + 1e-8)))
    # a guided velocity already smaller than the conditional one is kept (the scale is clamped at 1)
    small = renormalised_cfg(cond, cond * 1.5, 2.0, 0.0)  # guided = 0.5 c
    torch.testing.assert_close(small, 0.5 * cond)
    # per sample: the norms do not mix the batch
    both = renormalised_cfg(torch.cat([cond, 10 * cond]), torch.cat([uncond, 10 * uncond]), 2.0, 0.0)
    torch.testing.assert_close(both[1], 10 * out[0])


def test_cfg_is_one_call_on_prompt_and_empty_context(adapter):
    cond = adapter.encode_prompts(PROMPTS, "ignored", 4.0, 64)
    assert set(cond.tensors) == {"ids", "mask"}  # no negative prompt: the unconditional context is empty
    latents = adapter.initial_noise([torch.Generator().manual_seed(i) for i in range(3)], 64, 64)
    sigma = torch.full((3,), 0.6)
    ids, mask = cond.tensors["ids"], cond.tensors["mask"]
    markers = tuple(adapter.pipeline.token_id(t) for t in ("<|vision_start|>", "<|vision_end|>"))
    with torch.no_grad():
        both = adapter.transformer(
            torch.cat([latents, latents]),
            torch.cat([sigma, sigma]),
            torch.cat([ids, ids]),
            torch.cat([mask, torch.zeros_like(mask)]),
            (4, 4),
            markers,
        )
        text, uncond = both.chunk(2)
        expected = renormalised_cfg(text, uncond, 4.0, 0.0)
        ours = adapter.predict_velocity(latents, sigma, cond, 4.0, 64, 64)
        # the unconditional branch ignores the prompt: equal latents give equal unconditional velocities
        same = adapter.transformer(
            latents[:1].expand(3, -1, -1), sigma, ids, torch.zeros_like(mask), (4, 4), markers
        )
    assert torch.equal(ours, expected)
    # equal up to rounding: rows padded differently may take different kernel paths on a multi-threaded CPU
    torch.testing.assert_close(same[1:], same[:1].expand(2, -1, -1), rtol=0, atol=1e-6)
    assert (ours - adapter.predict_velocity(latents, sigma, cond, 1.0, 64, 64)).abs().max() > 1e-4


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_sde_log_probs_are_finite_in_float32_and_bf16_autocast(adapter, autocast):
    spec = SamplingSpec(64, 4, 4.0, noise_level=1.3, max_sequence_length=64)
    out = rollout(adapter, PROMPTS, [0, 1, 2], spec, sde_window_mask(3, 4, 0, 0), autocast_dtype=autocast)
    assert torch.isfinite(out.log_probs).all() and (out.log_probs != 0).all()
    assert torch.isfinite(out.latents).all() and torch.isfinite(out.images).all()


def test_resolution_beyond_the_position_table_is_refused(adapter):
    with pytest.raises(ValueError, match=r"exceeds the bagel model's largest side 256"):
        adapter.check_resolution(272, 64)
    with pytest.raises(ValueError, match=r"not divisible by the bagel model's factor 16"):
        adapter.check_resolution(72, 64)


# ---- training ----


@pytest.mark.parametrize("batching", ON_POLICY_BATCHINGS)
def test_one_optimiser_step_is_exactly_on_policy(tmp_path, batching):
    trainer = _trainer(tmp_path, *batching, "train.optimizer_steps_per_epoch=1", "train.beta=0.1")
    on_policy_epoch(trainer)
    trainer.train(epochs=2)
    assert any(p.abs().sum() > 0 for n, p in trainer.trainable.items() if "lora_B" in n)


def test_a_bfloat16_model_trains_under_bf16_autocast_with_checkpointing(tmp_path):
    trainer = _trainer(tmp_path, *BF16_SETUP)
    assert trainer.adapter.transformer.language_model.model.gradient_checkpointing
    bf16_epoch(trainer)
    assert any(p.abs().sum() > 0 for n, p in trainer.trainable.items() if "lora_B" in n)


def test_full_fine_tuning_trains_the_generation_expert_only(tmp_path):
    from flowgrpo_core.policy import attach_policy

    trainer = _trainer(tmp_path, "train.lora=false", "train.beta=0.1", "train.optimizer_steps_per_epoch=1")
    assert trainer.trainable and all("moe_gen" in n for n in trainer.trainable)
    layer = "language_model.model.layers.0."
    assert f"{layer}mlp_moe_gen.down_proj.weight" in trainer.trainable
    assert f"{layer}self_attn.q_norm_moe_gen.weight" in trainer.trainable
    before = {k: v.detach().clone() for k, v in trainer.adapter.transformer.state_dict().items()}
    (metrics,) = trainer.train(epochs=1)
    # one thread: exactly 1 (as with LoRA); with several intra-op threads the no-grad sampling forward and the
    # grad-recording training forward of the whole expert may round one float32 ulp apart (2026-12-03, 2 threads)
    ulp = torch.finfo(torch.float32).eps
    assert abs(metrics["train/ratio_min"] - 1.0) <= ulp and abs(metrics["train/ratio_max"] - 1.0) <= ulp
    after = trainer.adapter.transformer.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all("moe_gen" in k for k in moved)
    policy = trainer.save_policy(tmp_path / "policy")
    fresh = load_model("tiny:bagel")
    attach_policy(fresh, policy, ema=False)
    assert _equal_states(fresh.transformer, trainer.adapter.transformer)
    with fresh.reference_model():
        assert torch.equal(fresh.transformer.state_dict()[k := sorted(moved)[0]], before[k])


def test_interrupted_and_resumed_run_ends_with_the_same_parameters(tmp_path):
    assert_resume_is_exact(lambda *overrides, name: _trainer(tmp_path, *overrides, name=name))


# ---- LoRA ----


def _lora_modules(adapter):
    return {n.rsplit(".lora_A", 1)[0] for n, _ in adapter.transformer.named_parameters() if ".lora_A." in n}


def test_lora_on_the_generation_expert_round_trips_through_save_and_load(tmp_path):
    from flowgrpo_core.policy import attach_policy

    adapter = load_model("tiny:bagel")
    base = _ode(adapter).images
    adapter.add_lora(rank=4, alpha=8)
    layer = "language_model.model.layers.0."
    assert {n.removeprefix(layer) for n in _lora_modules(adapter) if n.startswith(layer)} == set(
        BAGEL_LORA_TARGETS
    )
    assert len(_lora_modules(adapter)) == 2 * len(BAGEL_LORA_TARGETS)  # two layers, nothing else
    with torch.no_grad():
        for name, p in adapter.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    tuned = _ode(adapter).images
    assert not torch.allclose(tuned, base)
    with adapter.reference_model():
        assert torch.equal(_ode(adapter).images, base)
    adapter.save_lora(tmp_path)
    with open(tmp_path / "pytorch_lora_weights.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert all(k.startswith("transformer.language_model.") for k in header if k != "__metadata__")
    fresh = load_model("tiny:bagel")
    attach_policy(fresh, tmp_path, ema=False)
    assert torch.equal(_ode(fresh).images, tuned)


def test_mmdit_target_names_map_onto_the_generation_expert():
    # the tiny preset's targets: the image stream is the generation expert, proj_out is llm2vae, and the text
    # stream (Bagel's understanding expert, never trained by the reference) selects nothing
    adapter = load_model("tiny:bagel")
    adapter.add_lora(4, 8.0, target_modules=["attn.to_q", "attn.add_k_proj", "proj_out", "ff.net.0.proj"])
    layer = "language_model.model.layers.1."
    assert {n.removeprefix(layer) for n in _lora_modules(adapter) if n.startswith(layer)} == {
        "self_attn.q_proj_moe_gen",
        "mlp_moe_gen.gate_proj",
        "mlp_moe_gen.up_proj",
    }
    assert "llm2vae" in _lora_modules(adapter)
    with pytest.raises(ValueError, match=r"select no bagel module"):
        load_model("tiny:bagel").add_lora(4, 8.0, target_modules=["attn.add_q_proj", "ff_context.net.2"])


# ---- the official layout and the loader's checks ----


def test_folder_round_trip(bagel_folder, adapter):
    from flowgrpo_core.stages.download import model_family

    loaded = load_model(str(bagel_folder))
    assert isinstance(loaded, BagelAdapter) and model_family(bagel_folder) == "bagel"
    assert _equal_states(loaded.transformer, adapter.transformer)
    assert _equal_states(loaded.pipeline.vae, adapter.pipeline.vae)
    assert torch.equal(_ode(loaded).images, _ode(adapter).images)
    assert json.loads((bagel_folder / "llm_config.json").read_text())["num_hidden_layers"] == 2
    # known before any weight loads, from ae.safetensors' header and config.json
    assert resolution_factor(str(bagel_folder)) == 16


def test_hub_id_loads_the_official_layout_from_the_cache_when_offline(bagel_folder, hub_cache, adapter):
    source = hub_cache(bagel_folder, "flowgrpo/tiny-bagel")
    loaded = load_model(source)
    assert isinstance(loaded, BagelAdapter) and _equal_states(loaded.transformer, adapter.transformer)


def test_vae_file_uses_the_original_names_and_diffusers_reads_it_back(adapter):
    vae = adapter.pipeline.vae
    original = to_original(vae.state_dict(), len(vae.config.block_out_channels))
    for key in (
        "encoder.down.0.block.0.conv1.weight",
        "encoder.down.0.downsample.conv.weight",
        "encoder.mid.block_1.norm1.weight",
        "encoder.norm_out.weight",
        "decoder.up.0.block.1.conv2.weight",  # the decoder's level 0 is its last (highest resolution)
        "decoder.up.3.upsample.conv.weight",
        "decoder.mid.block_2.conv1.weight",
    ):
        assert key in original, key
    assert original["encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 convolutions, as in FLUX's ae.safetensors
    back = from_original(original, dict(vae.config))
    state = vae.state_dict()
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def _copy(folder, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(folder, out)
    return out


def _rewrite(path, change):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


@pytest.fixture()
def no_weights(monkeypatch):
    from flowgrpo_core.models.bagel import layout

    def refuse(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(layout, "_read", refuse)
    monkeypatch.setattr(layout, "read_vae", refuse)


def test_understanding_weights_on_disk_are_skipped(bagel_folder, tmp_path):
    folder = _copy(bagel_folder, tmp_path)
    _rewrite(
        folder / EMA_FILE,
        lambda t: t.update(
            {"vit_model.x.weight": torch.ones(2), "language_model.lm_head.weight": torch.ones(3, 2)}
        ),
    )
    assert isinstance(load_model(str(folder)), BagelAdapter)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: (f / AE_FILE).unlink(), r"lacks ae\.safetensors"),
        (lambda f: (f / "llm_config.json").unlink(), r"no model_index\.json .*Bagel checkpoint folder"),
        (
            lambda f: [(f / n).unlink() for n in ("vocab.json", "tokenizer.json") if (f / n).exists()],
            r"no tokenizer",
        ),
        (
            lambda f: _rewrite(
                f / EMA_FILE, lambda t: t.pop("language_model.model.layers.1.mlp_moe_gen.up_proj.weight")
            ),
            r"ema\.safetensors: 1 missing tensors: language_model\.model\.layers\.1\.mlp_moe_gen\.up_proj\.weight",
        ),
        (
            lambda f: _rewrite(
                f / EMA_FILE, lambda t: t.update({"language_model.model.extra.weight": torch.ones(1)})
            ),
            r"1 unexpected tensors: language_model\.model\.extra\.weight",
        ),
        (
            lambda f: _rewrite(
                f / EMA_FILE,
                lambda t: t.update({f"{LAYER}self_attn.q_proj_moe_gen.weight": torch.ones(16, 32)}),
            ),
            r"q_proj_moe_gen\.weight \[16, 32\] \(expected \[32, 32\]\)",
        ),
        (
            lambda f: _rewrite(f / EMA_FILE, lambda t: t.update({"vae2llm.weight": torch.ones(32, 8)})),
            r"vae2llm\.weight \[32, 8\] takes no square patch of 4-channel latents",
        ),
        (
            lambda f: _rewrite(f / AE_FILE, lambda t: t.pop("decoder.up.2.block.0.conv1.bias")),
            r"ae\.safetensors: 1 missing tensors: decoder\.up\.2\.block\.0\.conv1\.bias",
        ),
        (
            lambda f: (f / "llm_config.json").write_text(json.dumps({"hidden_size": 32})),
            r"llm_config\.json: missing fields \['intermediate_size'",
        ),
    ],
)
def test_a_bad_checkpoint_folder_fails_before_any_weight_is_read(
    bagel_folder, tmp_path, no_weights, change, message
):
    folder = _copy(bagel_folder, tmp_path)
    change(folder)
    with pytest.raises(ModelSourceError, match=message):
        load_model(str(folder))


def test_a_bad_folder_fails_in_config_validation_before_training(bagel_folder, tmp_path, no_weights):
    from flowgrpo_core.config import ConfigError

    folder = _copy(bagel_folder, tmp_path)
    (folder / "llm_config.json").unlink()
    with pytest.raises((ConfigError, ModelSourceError), match=r"model_index\.json"):
        FlowGRPOTrainer(load_config("tiny", overrides=[f"model.source={folder}"]), tmp_path / "run")


def test_pipeline_class_of_folders(bagel_folder, tiny_sd3_folder, tmp_path):
    from flowgrpo_core.models.loading import pipeline_class

    assert pipeline_class(bagel_folder) == "BagelPipeline" == type(load_model("tiny:bagel").pipeline).__name__
    assert pipeline_class(tiny_sd3_folder) == "StableDiffusion3Pipeline"
    assert pipeline_class(tmp_path) is None
    assert BagelPipeline.__name__ == "BagelPipeline"


# ---- presets and the command line ----


def test_train_command_follows_the_model_family(tmp_path):
    output, keys = train_from_the_command_line(tmp_path / "run", "tiny:bagel", epochs=2)
    assert "epoch 1: reward" in output
    # the tiny preset's targets on Bagel's generation expert (and llm2vae for proj_out); no understanding weight
    assert any(".self_attn.q_proj_moe_gen.lora_A" in k for k in keys) and any(
        ".llm2vae.lora_A" in k for k in keys
    )
    assert any(".mlp_moe_gen.up_proj.lora_A" in k for k in keys)
    assert not any(".self_attn.q_proj.lora" in k or ".mlp.gate_proj" in k for k in keys)


@pytest.mark.parametrize("name", ["bagel-pickscore-lora", "bagel-pickscore"])
def test_presets_train_the_generation_expert_on_upstreams_window(name):
    cfg = load_config(name)
    assert cfg.model.source == "ByteDance-Seed/BAGEL-7B-MoT" and cfg.train.lora_target_modules == []
    assert cfg.sampling.window_bounds() == (0, 7)  # upstream: randint(0, 15 // 2 - size) over its 14 steps
    assert cfg.trained_steps_per_sample == cfg.sampling.sde_window_size
    assert cfg.sampling.guidance_scale == cfg.eval.guidance_scale == 4.0
    assert cfg.train.lora == (name == "bagel-pickscore-lora")


# ---- the whole DAG ----


def test_flowgrpo_run_registers_a_bagel_pyfunc_that_generates_images(tmp_path):
    assert_dag_registers_a_pyfunc(tmp_path, "tiny:bagel", "bagel")
