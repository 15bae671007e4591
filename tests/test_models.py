"""Model adapters against the diffusers pipelines, and every way of loading a base model."""

import pytest
import torch

from flowgrpo_core.models import ModelSourceError, adapter_for, load_model, parse_source
from flowgrpo_core.models.tiny import build_tiny_flux, build_tiny_sd3
from flowgrpo_core.sampling import SamplingSpec, rollout, sde_window_mask

PROMPTS = ["a photo of a cat", "hello world 42"]


def _ode_images(adapter, steps=6, guidance=4.5, res=64):
    t = rollout(
        adapter,
        PROMPTS,
        [0, 1],
        SamplingSpec(res, steps, guidance, max_sequence_length=32),
        sde_window_mask(2, steps, 1, 0) & False,
    )
    return t.images


@pytest.mark.parametrize(("builder", "guidance"), [(build_tiny_sd3, 4.5), (build_tiny_flux, 3.5)])
def test_ode_rollout_reproduces_the_diffusers_pipeline_exactly(builder, guidance):
    pipe = builder(seed=0)
    adapter = adapter_for(pipe)
    ours = _ode_images(adapter, guidance=guidance)
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    negative = {}
    if "neg_embeds" in adapter.encode_prompts(PROMPTS, "", guidance, 32).tensors:
        # The empty negative prompt is encoded once and repeated over the batch, as the reference does; the
        # pipeline gets the same embeddings (its own batched encoding differs in the last bits).
        cond = adapter.encode_prompts(PROMPTS, "", guidance, 32).tensors
        negative = {
            "negative_prompt_embeds": cond["neg_embeds"],
            "negative_pooled_prompt_embeds": cond["neg_pooled"],
        }
    theirs = pipe(
        PROMPTS,
        height=64,
        width=64,
        num_inference_steps=6,
        guidance_scale=guidance,
        max_sequence_length=32,
        generator=generators,
        output_type="pt",
        **negative,
    ).images
    assert torch.equal(ours, theirs)


def test_negative_prompt_is_encoded_once_and_equals_the_batched_encoding():
    adapter = adapter_for(build_tiny_sd3(seed=0))
    calls = []
    encode = adapter.pipeline.encode_prompt
    adapter.pipeline.encode_prompt = lambda **kw: calls.append(kw["prompt"]) or encode(**kw)
    first = adapter.encode_prompts(PROMPTS, "blurry", 4.5, 32).tensors
    second = adapter.encode_prompts(PROMPTS[:1], "blurry", 4.5, 32).tensors
    assert calls == [PROMPTS, ["blurry"], PROMPTS[:1]]  # the negative prompt once, the prompts every time
    assert torch.equal(first["neg_embeds"][0], second["neg_embeds"][0]) and first["neg_embeds"].shape[0] == 2
    _, batched, _, batched_pooled = encode(
        prompt=PROMPTS,
        prompt_2=None,
        prompt_3=None,
        device="cpu",
        negative_prompt=["blurry"] * 2,
        max_sequence_length=32,
    )
    torch.testing.assert_close(first["neg_embeds"], batched, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(first["neg_pooled"], batched_pooled, rtol=1e-5, atol=1e-6)
    assert (
        "neg_embeds" not in adapter.encode_prompts(PROMPTS, "blurry", 1.0, 32).tensors
    )  # no CFG, no negative


def test_tiny_builders_are_deterministic_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = build_tiny_sd3(seed=0), build_tiny_sd3(seed=0), build_tiny_sd3(seed=1)
    assert torch.rand(1).item() == before.item()
    sa, sb, sc = (p.transformer.state_dict() for p in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_sde_rollout_is_reproducible_per_sample_whatever_the_batch():
    adapter = load_model("tiny:sd3")
    spec = SamplingSpec(64, 4, 4.5, noise_level=0.7, max_sequence_length=32)
    both = rollout(adapter, PROMPTS, [7, 8], spec, sde_window_mask(2, 4, 0, 0))
    alone = rollout(adapter, PROMPTS[1:], [8], spec, sde_window_mask(1, 4, 0, 0))
    torch.testing.assert_close(both.latents[1], alone.latents[0], rtol=1e-5, atol=1e-5)
    assert both.latents.shape == (2, 5, 16, 8, 8) and both.log_probs.shape == (2, 4)
    assert torch.all(both.log_probs != 0) and both.images.shape == (2, 3, 64, 64)


def _assert_same_model(loaded, built) -> None:
    """Every weight of every component identical, and the same images. Images are compared to 1e-5 only:
    weights loaded from safetensors sit at other memory alignments than freshly built ones, and the CPU
    matrix kernels round a batch-1 product (the cached negative prompt) differently by alignment."""
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        a, b = getattr(loaded.pipeline, name).state_dict(), getattr(built.pipeline, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    torch.testing.assert_close(_ode_images(loaded), _ode_images(built), rtol=0, atol=1e-5)


def test_local_folder_round_trip(tiny_sd3_folder):
    assert parse_source(str(tiny_sd3_folder)).kind == "local"
    _assert_same_model(load_model(str(tiny_sd3_folder)), load_model("tiny:sd3"))


def test_hub_id_loads_from_the_cache_when_offline(tiny_sd3_folder, hub_cache):
    hub_cache(tiny_sd3_folder, "flowgrpo/tiny-sd3")
    assert parse_source("flowgrpo/tiny-sd3").kind == "hub"
    _assert_same_model(load_model("flowgrpo/tiny-sd3"), load_model("tiny:sd3"))
    with pytest.raises(
        ModelSourceError,
        match=r"cannot download model 'flowgrpo/not-cached': .*HF_HUB_OFFLINE is set and it is not in the local cache",
    ):
        load_model("flowgrpo/not-cached")


def test_s3_source_downloads_through_boto3(tiny_sd3_folder, tmp_path, monkeypatch, free_port):
    import boto3
    from moto.server import ThreadedMotoServer

    from flowgrpo_core.storage import upload_folder

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port)
    server.start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port}")
        for var, value in {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(var, value)
        monkeypatch.setenv("FLOWGRPO_CACHE", str(tmp_path / "cache"))
        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{free_port}").create_bucket(Bucket="models")
        assert upload_folder(tiny_sd3_folder, "s3://models/tiny/sd3") > 5
        _assert_same_model(load_model("s3://models/tiny/sd3"), load_model("tiny:sd3"))
        assert (tmp_path / "cache" / "s3" / "models" / "tiny" / "sd3" / "model_index.json").is_file()
        with pytest.raises(ModelSourceError, match=r"no objects under s3://models/missing"):
            load_model("s3://models/missing")
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("tiny:sdxl", "unknown tiny model"),
        ("tiny:sd3@x", "seed"),
        ("./does/not/exist", "does not exist"),
        ("", "empty"),
        ("not a model", "neither"),
    ],
)
def test_bad_sources_are_named_in_the_error(source, message):
    with pytest.raises(ModelSourceError, match=message):
        parse_source(source)


def test_folder_without_model_index_is_rejected(tmp_path):
    with pytest.raises(ModelSourceError, match=r"model_index\.json"):
        parse_source(str(tmp_path))


def test_lora_reference_and_export(tmp_path):
    adapter = load_model("tiny:sd3")
    base = _ode_images(adapter)
    adapter.add_lora(rank=4, alpha=8)
    with torch.no_grad():
        for name, p in adapter.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    tuned = _ode_images(adapter)
    assert not torch.allclose(tuned, base)
    with adapter.reference_model():
        assert torch.equal(_ode_images(adapter), base)
    adapter.save_lora(tmp_path)
    fresh = build_tiny_sd3(seed=0)
    fresh.load_lora_weights(tmp_path, adapter_name="grpo")
    assert torch.equal(_ode_images(adapter_for(fresh)), tuned)


def test_full_finetuning_reference_is_a_frozen_copy():
    adapter = load_model("tiny:sd3")
    base = _ode_images(adapter)
    adapter.keep_reference_copy()
    with torch.no_grad():
        for p in adapter.transformer.parameters():
            p.add_(0.05)
    assert not torch.allclose(_ode_images(adapter), base)
    with adapter.reference_model():
        assert torch.equal(_ode_images(adapter), base)


def test_resolution_factor_check():
    adapter = load_model("tiny:sd3")
    adapter.check_resolution(64, 128)
    with pytest.raises(ValueError, match="not divisible by the sd3 model's factor 16"):
        adapter.check_resolution(72, 64)


def test_lora_targets_the_joint_attention_and_not_sd35s_second_image_attention():
    from flowgrpo_core.models.tiny import TinySD3Spec

    adapter = adapter_for(build_tiny_sd3(seed=0, spec=TinySD3Spec(dual_attention_layers=(0,))))
    adapter.add_lora(4, 8.0)
    with_lora = {
        name.rsplit(".lora_A", 1)[0]
        for name, _ in adapter.transformer.named_parameters()
        if ".lora_A." in name
    }
    assert with_lora, "no LoRA attached"
    assert all(".attn." in name for name in with_lora)
    assert not any(".attn2." in name for name in with_lora)  # SD3.5-Medium's attn2 stays frozen, as upstream
    assert any("transformer_blocks.0.attn.to_q" in name for name in with_lora)
    assert any("transformer_blocks.0.attn.add_k_proj" in name for name in with_lora)


@pytest.mark.parametrize("family", ["sd3", "flux", "qwenimage"])
def test_text_encoders_can_stay_on_the_cpu(family):
    """model.text_encoders_on_cpu: the encoders stay in CPU memory wherever the pipeline goes, and the
    embeddings come out on the transformer's device, as they do with the encoders beside it."""
    from flowgrpo_core.models.base import TEXT_ENCODERS

    adapter = load_model(f"tiny:{family}")
    before = adapter.encode_prompts(["a red cube"], " ", 4.5, 16)
    adapter.text_encoders_on_cpu = True
    after = adapter.encode_prompts(["a red cube"], " ", 4.5, 16)
    assert before.tensors.keys() == after.tensors.keys()
    assert all(torch.equal(before.tensors[k], after.tensors[k]) for k in before.tensors)
    adapter.to("meta")  # a device the CPU-only test machine has: the weights leave, the encoders stay
    encoders = [getattr(adapter.pipeline, n) for n in TEXT_ENCODERS if getattr(adapter.pipeline, n, None)]
    assert encoders and all(p.device.type == "cpu" for e in encoders for p in e.parameters())
    assert adapter.device.type == "meta" and adapter.text_device.type == "cpu"
