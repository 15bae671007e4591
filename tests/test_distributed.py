"""`flowgrpo train` under torchrun: 2 CPU processes over gloo (plain all-reduce, DeepSpeed ZeRO-2, or ZeRO-3 with
and without CPU offload) take the same optimiser steps as 1 process with the same global batch and seed.

Comparisons are after one epoch: the next epoch samples with the updated weights, and the JPEG reward counts
bytes, so a 1e-7 difference in a weight can flip an image's reward and the whole trajectory after it."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ARGS = ["train", "--preset", "tiny", "--no-progress", "--set", "train.checkpoint_every=1"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(out, processes: int, *extra: str, epochs: int = 1) -> subprocess.CompletedProcess:
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={processes}",
        "--master_addr=127.0.0.1",
        f"--master_port={_port()}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run(
        [*launcher, "-m", "flowgrpo_core.cli", *ARGS, "--epochs", str(epochs), "--out", str(out), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def _weights(run, folder="policy"):
    lora = run / folder / "pytorch_lora_weights.safetensors"
    if lora.is_file():
        return load_file(str(lora))
    return load_file(str(run / folder / "transformer" / "diffusion_pytorch_model.safetensors"))


def _history(run):
    return json.loads((run / "policy" / "metrics.json").read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    _train(out, 1)
    return out


def _assert_same_epoch(a, b, base=None):
    """Runs ``a`` and ``b`` took the same step; ``base``: the untrained weights of a full fine-tuning."""
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    if base is None:
        assert any(v.abs().sum() > 0 for k, v in wa.items() if "lora_B" in k)  # it trained
    else:
        assert any(not torch.equal(v, base[k]) for k, v in wa.items())
    # Adam divides by the running RMS of each gradient: summation-order noise in near-zero gradients
    # (lora_A while lora_B is ~0) moves weights by ~1e-5 here, a thousandth of one step (lr 1e-2).
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-4)
    ea, eb = _weights(a, "policy/ema"), _weights(b, "policy/ema")  # the exported EMA, an average of those
    assert ea.keys() == wa.keys() and all(torch.allclose(ea[k], eb[k], rtol=0, atol=1e-4) for k in ea)
    (ha,), (hb,) = _history(a), _history(b)
    assert (
        ha["reward/total"] == hb["reward/total"]
        and ha["train/trained_samples"] == hb["train/trained_samples"]
    )
    # Gradient norms are not scale-invariant: a missing or doubled reduction would show here.
    for key in ("train/grad_norm", "train/loss", "train/kl", "train/ratio_mean", "train/clipfrac"):
        assert ha[key] == pytest.approx(hb[key], rel=1e-5, abs=1e-7), (
            key
        )  # the loss is a near-cancelling mean


def test_two_gloo_processes_match_one_process(single, tmp_path):
    result = _train(tmp_path, 2)
    assert "2 processes" in result.stdout + result.stderr
    _assert_same_epoch(single, tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "epoch-000001"
    ]  # written once, by rank 0


def test_zero2_on_two_processes_matches_the_plain_run(single, tmp_path):
    _train(tmp_path, 2, "--set", "train.deepspeed_stage=2")
    _assert_same_epoch(single, tmp_path)


ZERO3 = ("--set", "train.deepspeed_stage=3")
OFFLOAD = ("--set", "train.offload_optimizer=true", "--set", "train.offload_params=true")


@pytest.mark.parametrize("offload", [(), OFFLOAD], ids=["zero3", "zero3-cpu-offload"])
def test_zero3_on_two_processes_matches_the_plain_run(single, tmp_path, offload):
    """The base and the LoRA weights partitioned over the ranks (on a CPU, 'offload' moves nothing but runs
    DeepSpeed's offload code: the optimiser steps the CPU copies)."""
    _train(tmp_path, 2, *ZERO3, *offload)
    _assert_same_epoch(single, tmp_path)


def test_zero3_full_fine_tuning_matches_the_plain_run(tmp_path):
    """Every weight of the transformer trained and partitioned; the KL reference is the frozen copy."""
    full = ("--set", "train.lora=false", "--set", "train.learning_rate=1e-4")
    _train(tmp_path / "one", 1, *full)
    _train(tmp_path / "zero3", 2, *full, *ZERO3)
    from flowgrpo_core.models import load_model

    base = {
        k: v.detach().float()
        for k, v in load_model("tiny:sd3").transformer.state_dict().items()  # what the run started from
    }
    _assert_same_epoch(tmp_path / "one", tmp_path / "zero3", base=base)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_checkpoints_from_all_ranks_and_resume_exactly(tmp_path, stage):
    ds = ("--set", f"train.deepspeed_stage={stage}")
    _train(tmp_path / "straight", 2, *ds, epochs=2)
    _train(tmp_path / "resumed", 2, *ds, epochs=1)
    state = tmp_path / "resumed" / "checkpoints" / "epoch-000001" / "deepspeed" / "state"
    assert sorted(p.name for p in state.glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    resumed = _train(tmp_path / "resumed", 2, *ds, "--resume", epochs=2)
    assert "resumed from" in resumed.stdout + resumed.stderr
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (
        _history(tmp_path / "straight")[1]["reward/total"]
        == _history(tmp_path / "resumed")[1]["reward/total"]
    )


def test_world_size_must_divide_the_sampling_batches(tmp_path):
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_port()}",
    ]
    result = subprocess.run(
        [
            *launcher,
            "-m",
            "flowgrpo_core.cli",
            *ARGS,
            "--out",
            str(tmp_path),
            "--set",
            "sampling.groups_per_epoch=3",
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0
    assert "3 sampling batches per epoch cannot be shared by 2 processes" in result.stderr
