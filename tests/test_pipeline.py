"""The whole DAG on `tiny` through kfp.local, checked through MLflow; the compiled YAML; stage failures."""

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flowgrpo_core.cli import main
from flowgrpo_core.stages import PipelineContext
from pipelines.runner import compile_pipeline, run_local

STAGES = [
    "download_model",
    "launch_reward_servers",
    "calibrate_rewards",
    "train_grpo",
    "evaluate",
    "register_model",
]


@pytest.fixture(scope="module")
def dag_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dag")
    args = PipelineContext(
        preset="tiny",
        overrides=["train.epochs=2", "calibration.epochs=1", "eval.num_prompts=4", "eval.num_steps=4"],
        tracking_uri=f"sqlite:///{root}/mlflow.db",
        workdir=str(root / "work"),
        experiment="dag-test",
    )
    result = run_local(args, pipeline_root=str(root / "kfp"))
    return result, args, root


def test_dag_logs_one_parent_and_six_stage_runs(dag_run):
    from mlflow.tracking import MlflowClient

    result, _, _ = dag_run
    client = MlflowClient()
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["flowgrpo.role"] == "pipeline"
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert sorted(r.data.tags["stage"] for r in children) == sorted(STAGES)
    assert all(r.info.status == "FINISHED" for r in children)
    by_stage = {r.data.tags["stage"]: r for r in children}

    download = by_stage["download_model"]
    assert download.data.params["train.beta"] == "0.01" and download.data.params["model.family"] == "sd3"
    assert {a.path for a in client.list_artifacts(download.info.run_id)} >= {"config.yaml", "manifest.json"}

    train = by_stage["train_grpo"]
    history = client.get_metric_history(train.info.run_id, "reward/total")
    assert [m.step for m in history] == [0, 1]
    for key in (
        "train/loss",
        "train/kl",
        "train/clipfrac",
        "train/ratio_mean",
        "train/approx_kl",
        "time/epoch_s",
        "time/sample_s",
        "reward/jpeg_incompressibility/mean",
    ):
        assert len(client.get_metric_history(train.info.run_id, key)) == 2, key
    train_artifacts = {a.path for a in client.list_artifacts(train.info.run_id)}
    assert {"config.yaml", "reward_curve.png", "policy", "samples"} <= train_artifacts
    assert [a.path for a in client.list_artifacts(train.info.run_id, "samples")] == ["samples/last_epoch.png"]
    assert (
        train.data.tags["train.launcher"] == "in-process"
        and train.data.tags["train.resumed_from_epoch"] == "none"
    )
    assert train.data.metrics["stage/work_s"] > 0

    calibration = client.list_artifacts(by_stage["calibrate_rewards"].info.run_id)
    assert "calibration.json" in {a.path for a in calibration}

    evaluation = by_stage["evaluate"]
    assert {
        "eval/base/reward_mean",
        "eval/policy/reward_mean",
        "eval/delta/reward",
        "eval/win_rate/reward",
    } <= set(evaluation.data.metrics)
    assert {"report.md", "samples.json", "samples"} <= {
        a.path for a in client.list_artifacts(evaluation.info.run_id)
    }


def test_dag_registers_a_pyfunc_that_generates_images(dag_run):
    import base64
    import io

    import mlflow
    from mlflow.tracking import MlflowClient
    from PIL import Image

    result, _, _ = dag_run
    assert result.registered == "flowgrpo-sd3/1"
    version = MlflowClient().get_model_version_by_alias("flowgrpo-sd3", "candidate")
    assert str(version.version) == "1" and version.tags["base.source"] == "tiny:sd3"
    # the decision `flowgrpo run` prints, as the registry recorded it
    decided = "champion" if version.tags["gate.decision"] == "passed" else "stays a candidate"
    assert (
        result.gate.startswith(f"{decided}: eval/policy/reward_mean ")
        and "against the base model" in result.gate
    )
    model = mlflow.pyfunc.load_model("models:/flowgrpo-sd3@candidate")
    out = model.predict({"prompt": ["a photo of a cat", "a photo of a dog"]}, params={"seed": 3})
    assert list(out["seed"]) == [3, 4]
    images = [Image.open(io.BytesIO(base64.b64decode(text))) for text in out["image"]]
    assert len(images) == 2 and all(im.size == (64, 64) and im.mode == "RGB" for im in images)


def test_registering_the_same_run_twice_keeps_one_version(dag_run):
    import json

    from mlflow.tracking import MlflowClient

    from flowgrpo_core.stages import PipelineContext
    from flowgrpo_core.stages.register import register_model

    result, args, root = dag_run
    run_id = MlflowClient().get_run(result.parent_run_id).data.tags["kfp.run_id"]
    ctx = PipelineContext(
        preset=args.preset,
        overrides=list(args.overrides),
        kfp_run_id=run_id,
        tracking_uri=args.tracking_uri,
        experiment=args.experiment,
        workdir=args.workdir,
    )
    evaluation = next((root / "kfp").rglob("evaluate/evaluation"))
    policy = next((root / "kfp").rglob("train-grpo/policy"))
    again = register_model(ctx, policy, "sd3", json.loads(evaluation.read_text()))
    assert again["version"] == "1" and again["created"] is False
    assert len(MlflowClient().search_model_versions("name='flowgrpo-sd3'")) == 1


def test_every_component_and_the_pipeline_take_exactly_the_context_parameters():
    # KFP reads parameters from signatures, so each component lists PipelineContext's fields again: they must
    # agree with the dataclass in names and types, and the pipeline's defaults must be the dataclass's.
    import dataclasses
    import inspect
    import typing

    import components
    from flowgrpo_core.stages.common import PIPELINE_ARGUMENTS, PIPELINE_PARAMETERS
    from pipelines.flowgrpo_pipeline import flowgrpo_pipeline

    hints = typing.get_type_hints(PipelineContext)
    expected = {name: typing.get_origin(hints[name]) or hints[name] for name in PIPELINE_PARAMETERS}
    for name in components.__all__:
        signature = inspect.signature(getattr(components, name).python_func)
        plain = {
            p.name: p.annotation
            for p in signature.parameters.values()
            if typing.get_origin(p.annotation) is not typing.Annotated  # artifacts are Input[...]/Output[...]
        }
        # first, in the dataclass's order; then any task outputs passed as parameters (register's family)
        assert list(plain.items())[: len(expected)] == list(expected.items()), name
    defaults = PipelineContext()
    signature = inspect.signature(flowgrpo_pipeline.pipeline_func)
    assert tuple(signature.parameters) == PIPELINE_ARGUMENTS
    for p in signature.parameters.values():
        assert p.annotation == expected[p.name] and p.default == getattr(defaults, p.name), p.name
    assert "kfp_run_id" in PIPELINE_PARAMETERS and "_config" not in PIPELINE_PARAMETERS
    assert set(PIPELINE_PARAMETERS) == {f.name for f in dataclasses.fields(PipelineContext) if f.init}


def test_context_from_component_arguments_ignores_artifacts_and_copies_overrides():
    overrides = ("train.epochs=1",)
    arguments = {
        "preset": "tiny",
        "overrides": overrides,  # KFP may hand a list parameter over as any sequence
        "model_source": "",
        "model_revision": "",
        "tracking_uri": "sqlite:///x.db",
        "experiment": "e",
        "workdir": "w",
        "run_id": "",
        "kfp_run_id": "run-1",
        "model": object(),  # an artifact
    }
    ctx = PipelineContext.from_arguments(arguments)
    assert ctx.overrides == ["train.epochs=1"] and ctx.identity == "run-1" and ctx.experiment_name == "e"
    assert PipelineContext.from_arguments({**arguments, "run_id": "earlier"}).run_dir == Path("w/earlier")
    assert ctx.pipeline_arguments() == {
        k: v for k, v in arguments.items() if k not in ("model", "kfp_run_id")
    } | {"overrides": ["train.epochs=1"]}
    with pytest.raises(TypeError):
        PipelineContext("tiny")  # by keyword only


def test_compiled_yaml_has_the_dag_exit_handler_retries_and_resources(tmp_path):
    path = compile_pipeline(
        PipelineContext(preset="sd3-ocr", overrides=["train.beta=0.02"]), tmp_path / "p.yaml", gpus=2
    )
    spec = yaml.safe_load(path.read_text())
    root_tasks = spec["root"]["dag"]["tasks"]
    assert root_tasks["stop-reward-servers"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    handler = next(k for k in spec["components"] if k.startswith("comp-exit-handler"))
    tasks = spec["components"][handler]["dag"]["tasks"]
    order = [
        "download-model",
        "launch-reward-servers",
        "calibrate-rewards",
        "train-grpo",
        "evaluate",
        "register-model",
    ]
    assert set(tasks) == set(order)
    for before, after in itertools.pairwise(order):
        assert before in tasks[after]["dependentTasks"], f"{after} must run after {before}"
    assert tasks["train-grpo"]["retryPolicy"] == {
        "backoffDuration": "60s",
        "backoffFactor": 2.0,
        "backoffMaxDuration": "86400s",
        "maxRetryCount": 2,
    }
    executors = spec["deploymentSpec"]["executors"]
    train = executors["exec-train-grpo"]["container"]
    assert (
        train["resources"]["accelerator"]["count"] == "2"
        and train["resources"]["resourceMemoryRequest"] == "32G"
    )
    assert "accelerator" not in executors["exec-download-model"]["container"].get("resources", {})
    assert all(
        e["container"]["image"].startswith("ghcr.io/flowgrpo/flowgrpo-trainer:") for e in executors.values()
    )
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["preset"]["defaultValue"] == "sd3-ocr" and params["overrides"]["defaultValue"] == [
        "train.beta=0.02"
    ]


def _broken_vae_model(folder: Path) -> Path:
    """A tiny SD3 whose VAE decoder ignores its input: every image is the same, so every reward is constant."""
    import torch

    from flowgrpo_core.models.tiny import build_tiny_sd3

    pipe = build_tiny_sd3(seed=0)
    with torch.no_grad():
        pipe.vae.decoder.conv_out.weight.zero_()
    pipe.save_pretrained(folder)
    return folder


def test_a_constant_reward_fails_calibration_with_its_message(tmp_path):
    from flowgrpo_core.calibration import CalibrationError
    from flowgrpo_core.stages import PipelineContext
    from flowgrpo_core.stages.calibrate import calibrate_rewards

    model = _broken_vae_model(tmp_path / "model")
    ctx = PipelineContext(
        preset="tiny",
        overrides=["serving.mode=inline", "calibration.epochs=1", "sampling.num_steps=4"],
        kfp_run_id="cal-test",
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        experiment="",
        workdir=str(tmp_path / "work"),
    )
    with pytest.raises(
        CalibrationError,
        match=r"reward 'jpeg_incompressibility' is broken: it is constant \(.* for all 16 images\)",
    ):
        calibrate_rewards(ctx, model, None, tmp_path / "calibration.json")
    assert '"ok": false' in (tmp_path / "calibration.json").read_text()


def test_a_killed_training_stage_resumes_from_its_checkpoint(tmp_path):
    from mlflow.tracking import MlflowClient

    from flowgrpo_core.models.tiny import build_tiny_sd3
    from flowgrpo_core.tracking import configure

    build_tiny_sd3(seed=0).save_pretrained(tmp_path / "model")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = ["serving.mode=inline", "train.epochs=6", "train.checkpoint_every=1"]
    code = (
        "import sys; from flowgrpo_core.stages import PipelineContext; from flowgrpo_core.stages.train import train_grpo;"
        f"ctx = PipelineContext(preset='tiny', overrides={overrides!r}, kfp_run_id='retry-test', tracking_uri={uri!r}, experiment='retry', workdir={str(tmp_path / 'work')!r});"
        f"train_grpo(ctx, {str(tmp_path / 'model')!r}, None, {str(tmp_path / 'policy')!r})"
    )
    env = {**os.environ, "TQDM_DISABLE": "1"}
    first = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    checkpoints = tmp_path / "work" / "retry-test" / "train" / "checkpoints"
    deadline = time.monotonic() + 300
    while (
        not list(checkpoints.glob("epoch-00000[2-9]"))
        and time.monotonic() < deadline
        and first.poll() is None
    ):
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    done = sorted(p.name for p in checkpoints.glob("epoch-*") if not p.name.endswith(".tmp"))
    assert done and done[-1] < "epoch-000006", f"the first attempt finished before it was killed: {done}"

    second = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resumed from {checkpoints / done[-1]}" in second.stdout + second.stderr
    configure(uri)
    client = MlflowClient()
    (run,) = client.search_runs(
        [client.get_experiment_by_name("retry").experiment_id], "tags.stage = 'train_grpo'"
    )
    assert run.data.tags["train.resumed_from_epoch"] == str(int(done[-1].split("-")[1]))
    assert sorted({m.step for m in client.get_metric_history(run.info.run_id, "reward/total")}) == list(
        range(6)
    )
    assert (tmp_path / "policy" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--preset", "nope"], "unknown preset 'nope'"),
        (["run", "--model-source", "/no/such/model"], "model folder '/no/such/model' does not exist"),
        (["run", "--set", "train.beta"], "malformed override"),
        (
            ["run", "--tracking-uri", "http://127.0.0.1:9"],
            "MLflow tracking server http://127.0.0.1:9 is not reachable",
        ),
        (["compile", "--set", "sampling.resolution=70"], "sampling.resolution"),
        (
            ["submit", "--host", "http://127.0.0.1:9"],
            "Kubeflow Pipelines host http://127.0.0.1:9 is not reachable",
        ),
    ],
)
def test_bad_inputs_fail_fast_with_clear_messages(args, message, capsys):
    start = time.monotonic()
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert time.monotonic() - start < 20


def test_presets_share_their_param_keys_for_side_by_side_comparison():
    from flowgrpo_core.config import load_config
    from flowgrpo_core.presets import preset_names
    from flowgrpo_core.tracking import comparable_params

    keys = {name: frozenset(comparable_params(load_config(name))) for name in preset_names()}
    assert len(set(keys.values())) == 1, "presets log different param keys"
    assert comparable_params(load_config("sd3-ocr-guard"))["rewards"] == "ocr=1, pickscore=0"
