"""MLflow and Kubeflow as their users meet them: two `flowgrpo run`s compared through MlflowClient, the
registered model served by the real `mlflow` CLI, the tracking URI from the environment, a quiet console,
the compiled YAML's descriptions, the command line's help and versions."""

import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from flowgrpo_core.cli import build_parser, main

# a tiny run's console: our lines only (run id, log path, a line per step, the trainer's lines, the result)
CONSOLE_BUDGET = 40
SHORT = [
    "train.epochs=2",
    "calibration.epochs=1",
    "sampling.num_steps=4",
    "eval.num_prompts=2",
    "eval.num_steps=2",
]
MLFLOW = str(Path(sys.executable).with_name("mlflow"))
# two pipeline runs, then the mlflow CLI: minutes each on a busy 2-core machine
pytestmark = pytest.mark.timeout(3000)


def _flowgrpo(*args, cwd, env=None, timeout=2400):
    return subprocess.run(
        [sys.executable, "-m", "flowgrpo_core.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two tiny pipeline runs on one database, Flow-GRPO then DiffusionNFT (the comparison a user makes in the
    UI): the first names the database with --tracking-uri, the second only through MLFLOW_TRACKING_URI."""
    root = tmp_path_factory.mktemp("users")
    uri = f"sqlite:///{root}/mlflow.db"
    common = ["run", "--preset", "tiny", "--experiment", "compare", "--workdir", str(root / "work")]
    common += ["--pipeline-root", str(root / "kfp"), *[a for o in SHORT for a in ("--set", o)]]
    env = {"MLFLOW_TRACKING_URI": ""}
    first = _flowgrpo(*common, "--tracking-uri", uri, cwd=root, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    # the preset's Flow-GRPO settings stay quietly unused; calibration probes with NFT
    second = _flowgrpo(*common, "--set", "train.algorithm=nft", cwd=root, env={"MLFLOW_TRACKING_URI": uri})
    assert second.returncode == 0, second.stdout + second.stderr
    assert not (root / "flowgrpo-runs" / "mlflow.db").exists(), "the second run ignored MLFLOW_TRACKING_URI"
    return root, uri, first, second


def _parents(uri):
    from mlflow.tracking import MlflowClient

    from flowgrpo_core.tracking import configure

    configure(uri)
    client = MlflowClient()
    experiment = client.get_experiment_by_name("compare")
    runs = client.search_runs(
        [experiment.experiment_id],
        "tags.`flowgrpo.role` = 'pipeline'",
        order_by=["attributes.start_time ASC"],
    )
    return client, experiment, runs


def test_parent_runs_compare_side_by_side(two_runs):
    _, uri, _, _ = two_runs
    client, experiment, parents = _parents(uri)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert len(parents) == 2
    a, b = parents
    assert len(a.data.params) > 80 and set(a.data.params) == set(b.data.params)
    assert (a.data.params["train.algorithm"], b.data.params["train.algorithm"]) == ("grpo", "nft")
    assert a.data.params["rewards"] == "jpeg_incompressibility=1"
    headline = {
        "train/final_reward",
        "train/epochs",
        "eval/delta/reward",
        "eval/policy/reward_mean",
        "gate/passed",
    }
    assert headline <= set(a.data.metrics) and set(a.data.metrics) == set(b.data.metrics)
    assert a.data.metrics["train/epochs"] == 2 and a.data.metrics["gate/passed"] in (0, 1)
    # names say what a run is; stage runs carry their parent's short id
    for parent in parents:
        short = parent.data.tags["kfp.run_id"].rsplit("-", 1)[-1]
        assert parent.info.run_name == f"tiny-sd3-{short}"
        children = client.search_runs(
            [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
        )
        assert len(children) == 6
        assert {r.info.run_name for r in children} == {f"{short}-{r.data.tags['stage']}" for r in children}
        # lineage: the prompt sets, on the parent too
        contexts = {
            (d.dataset.name, {t.key: t.value for t in d.tags}["mlflow.data.context"])
            for d in parent.inputs.dataset_inputs
        }
        assert contexts == {("animals", "training"), ("animals", "evaluation")}


def test_training_logs_captioned_samples_per_epoch(two_runs):
    _, uri, _, _ = two_runs
    client, experiment, (parent, _) = _parents(uri)
    (train,) = client.search_runs(
        [experiment.experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.stage = 'train_grpo'",
    )
    images = [a.path for a in client.list_artifacts(train.info.run_id, "images")]
    steps = {int(m.group(1)) for p in images if (m := re.search(r"samples\+step\+(\d+)\+", p))}
    assert steps == {0, 1}, images


def test_the_nft_run_logs_its_algorithm_and_its_own_training_metrics(two_runs):
    # issue 23's pipeline check: `flowgrpo run --set train.algorithm=nft` on tiny through the whole DAG
    _, uri, _, second = two_runs
    assert "registered model version: flowgrpo-sd3/2" in second.stdout
    client, experiment, (_, parent) = _parents(uri)
    runs = client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    by_stage = {r.data.tags["stage"]: r for r in runs}
    assert len(by_stage) == 6 and all(r.info.status == "FINISHED" for r in runs)
    for stage in ("download_model", "train_grpo"):
        assert by_stage[stage].data.params["train.algorithm"] == "nft", stage
    train = by_stage["train_grpo"].info.run_id
    for key in ("train/loss", "train/positive_loss", "train/old_deviation", "train/old_policy_decay"):
        assert [m.step for m in client.get_metric_history(train, key)] == [0, 1], key
    assert not client.get_metric_history(train, "train/clipfrac")
    assert "eval/policy/reward_mean" in by_stage["evaluate"].data.metrics


def test_the_console_shows_our_lines_and_the_log_keeps_the_rest(two_runs):
    _, _, first, second = two_runs
    for run in (first, second):
        lines = (run.stdout + run.stderr).splitlines()
        assert len(lines) <= CONSOLE_BUDGET, "\n".join(lines)
        assert not [line for line in lines if "KFP Executor" in line or "UserWarning" in line]
        assert "[flowgrpo] step train-grpo ..." in lines
        assert any(re.match(r"\[flowgrpo\] epoch 1: reward", line) for line in lines)
        log = Path(re.search(r"every step's output: (\S+)", run.stdout).group(1))
        assert "KFP Executor" in log.read_text()


def test_mlflow_models_predict_on_the_registered_model_returns_images(two_runs):
    from PIL import Image

    root, uri, _, _ = two_runs
    request = root / "request.json"
    request.write_text(
        json.dumps(
            {
                "dataframe_split": {"columns": ["prompt"], "data": [["a photo of a cat"], ["a dog"]]},
                "params": {"seed": 5, "num_steps": 2},
            }
        )
    )
    out = subprocess.run(
        [
            *(MLFLOW, "models", "predict", "-m", "models:/flowgrpo-sd3/1", "-i", str(request), "-t", "json"),
            *("--env-manager", "local", "-o", str(root / "predictions.json")),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri},
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((root / "predictions.json").read_text())["predictions"]
    assert [(r["prompt"], r["seed"]) for r in rows] == [("a photo of a cat", 5), ("a dog", 6)]
    for row in rows:
        image = Image.open(io.BytesIO(base64.b64decode(row["image"])))
        assert image.format == "PNG" and image.size == (64, 64)


def test_the_registered_model_has_a_signature_with_params(two_runs):
    import mlflow

    _, uri, _, _ = two_runs
    mlflow.set_tracking_uri(uri)
    info = mlflow.models.get_model_info("models:/flowgrpo-sd3/1")
    assert info.signature.inputs.input_names() == ["prompt", "seed"]
    assert info.signature.outputs.input_names() == ["prompt", "seed", "image"]
    params = {p.name: p.default for p in info.signature.params.params}
    assert params == {"seed": 0, "num_steps": 2, "guidance_scale": 4.5, "resolution": 64}
    assert info.saved_input_example_info is not None


def test_mlflow_models_serve_answers_with_images(two_runs):
    from PIL import Image

    root, uri, _, _ = two_runs
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [
            MLFLOW,
            "models",
            "serve",
            "-m",
            "models:/flowgrpo-sd3/1",
            "-p",
            str(port),
            "--env-manager",
            "local",
        ],
        # mlflow starts `uvicorn` by name: the environment's bin/ on PATH, as in an activated virtualenv
        env={**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(MLFLOW).parent}:{os.environ['PATH']}"},
        stdout=open(root / "serve.log", "w"),  # noqa: SIM115 (the server keeps writing)
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert server.poll() is None, (root / "serve.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                time.sleep(1)
        body = json.dumps({"inputs": {"prompt": ["a cat"]}, "params": {"num_steps": 2}}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=300) as response:
            (row,) = json.loads(response.read())["predictions"]
        assert Image.open(io.BytesIO(base64.b64decode(row["image"]))).size == (64, 64)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_promote_reads_the_environment_s_tracking_uri(two_runs, tmp_path):
    _, uri, _, _ = two_runs
    out = _flowgrpo(
        "promote", "--model", "flowgrpo-sd3", "--version", "2", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri}
    )
    assert out.returncode in (0, 1), out.stderr
    assert out.stdout.startswith("[flowgrpo] flowgrpo-sd3 v2: ")


def test_promote_without_a_database_fails_in_one_line_and_creates_none(tmp_path):
    out = _flowgrpo(
        "promote", "--model", "flowgrpo-sd3", "--version", "1", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": ""}
    )
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "flowgrpo promote: error: no MLflow database at flowgrpo-runs/mlflow.db "
        "(sqlite:///flowgrpo-runs/mlflow.db): pass --tracking-uri or set MLFLOW_TRACKING_URI"
    ]
    assert not (tmp_path / "flowgrpo-runs").exists()


def test_promote_of_an_unknown_version_fails_in_one_line(tmp_path, capsys):
    from flowgrpo_core.tracking import configure, ensure_experiment

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    configure(uri)
    ensure_experiment("x", uri)  # creates the database
    capsys.readouterr()
    assert main(["promote", "--model", "nope", "--version", "3", "--tracking-uri", uri]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"flowgrpo promote: error: {uri}: ") and "nope" in line


def test_the_compiled_yaml_describes_the_pipeline_its_steps_and_every_parameter(
    tmp_path, capsys, monkeypatch
):
    from flowgrpo_core.stages.common import PIPELINE_ARGUMENTS

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["compile", "-o", str(tmp_path / "p.yaml")]) == 0
    assert (
        "tracking URI sqlite:///flowgrpo-runs/mlflow.db is a file inside each step's pod"
        in capsys.readouterr().err
    )
    spec = yaml.safe_load((tmp_path / "p.yaml").read_text())
    description = spec["pipelineInfo"]["description"]
    assert "train-grpo: Flow-GRPO training" in description and "register-model: Register" in description
    root = spec["root"]["inputDefinitions"]["parameters"]
    assert set(root) == set(PIPELINE_ARGUMENTS) and all(p.get("description") for p in root.values())
    for name, component in spec["components"].items():
        if name.startswith("comp-exit-handler"):  # KFP's own sub-DAG: its inputs are the pipeline's
            continue
        inputs = component.get("inputDefinitions", {})
        for kind in ("parameters", "artifacts"):
            for key, value in inputs.get(kind, {}).items():
                assert value.get("description"), f"{name}: input {key} has no description"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.mlflow.svc:5000")
    assert main(["compile", "-o", str(tmp_path / "q.yaml")]) == 0
    assert "warning" not in capsys.readouterr().err
    defaults = yaml.safe_load((tmp_path / "q.yaml").read_text())["root"]["inputDefinitions"]["parameters"]
    assert defaults["tracking_uri"]["defaultValue"] == "http://mlflow.mlflow.svc:5000"


def test_help_offers_only_what_each_command_takes(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in ("run", "compile", "submit"):
        text = sub.choices[name].format_help()
        assert "--config" not in text and "--show-config" not in text, name
    assert "--config" in sub.choices["train"].format_help()
    assert "--verbose" in sub.choices["run"].format_help()
    assert {"--namespace", "--token-env", "--sa-token-path", "--cookies-env"} <= set(
        sub.choices["submit"]._option_string_actions
    )
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert re.match(r"flowgrpo \S+ \(mlflow 3\.\S+, kfp 2\.\S+, torch \S+\)", capsys.readouterr().out)


def test_submit_connection_becomes_kfp_client_arguments(tmp_path, monkeypatch):
    from pipelines.runner import KfpConnection

    monkeypatch.setenv("KFP_TOKEN", "secret-token")
    arguments = KfpConnection(
        "https://kfp.example", namespace="team-a", token_env="KFP_TOKEN"
    ).client_arguments()
    assert arguments == {
        "host": "https://kfp.example",
        "namespace": "team-a",
        "existing_token": "secret-token",
    }
    token = tmp_path / "token"
    token.write_text("sa-token")
    credentials = KfpConnection("https://kfp.example", sa_token_path=str(token)).client_arguments()[
        "credentials"
    ]
    assert credentials._get_token() == "sa-token"  # read from the file, as kfp.Client will
    with pytest.raises(ValueError, match="--token-env NOPE: the environment variable is not set"):
        KfpConnection("https://kfp.example", token_env="NOPE").client_arguments()
    with pytest.raises(ValueError, match="one way to authenticate"):
        KfpConnection("h", token_env="KFP_TOKEN", cookies_env="KFP_TOKEN").client_arguments()


def test_a_failing_step_ends_the_run_with_its_reason_after_the_tail_of_its_output(tmp_path):
    from pipelines.console import failure_report

    log = tmp_path / "pipeline.log"
    log.write_text(
        "Executing task 'download-model'\n    fine\nTask 'download-model' finished with status SUCCESS\n"
        "Executing task 'calibrate-rewards'\n    [KFP Executor] starting\n    Traceback (most recent call last):\n"
        "      File \"x.py\", line 1\n    flowgrpo_core.calibration.CalibrationError: reward 'ocr' is broken\n"
        "Task 'calibrate-rewards' finished with status FAILURE\nExecuting task 'stop-reward-servers'\n"
    )
    failure = failure_report(log)
    assert failure.step == "calibrate-rewards"
    assert failure.reason == "flowgrpo_core.calibration.CalibrationError: reward 'ocr' is broken"
    assert failure.tail[0] == "[KFP Executor] starting" and len(failure.tail) == 4


def test_a_failed_run_shows_the_step_s_output_tail_and_ends_with_its_reason(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text('{"_class_name": "NoSuchPipeline"}')
    out = _flowgrpo(
        "run",
        "--model-source",
        str(model),
        "--workdir",
        str(tmp_path / "work"),
        "--pipeline-root",
        str(tmp_path / "kfp"),
        "--tracking-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
        cwd=tmp_path,
    )
    assert out.returncode == 1
    last = out.stderr.splitlines()[-1]
    assert last.startswith("flowgrpo run: error: step download-model failed: ValueError: ")
    assert "pipeline class 'NoSuchPipeline' is not supported" in last
    assert "the last lines of the step's output" in out.stderr
    assert len((out.stdout + out.stderr).splitlines()) <= CONSOLE_BUDGET


@pytest.mark.parametrize("key", ["tracking.tracking_uri", "tracking.experiment"])
def test_where_runs_go_is_no_config_key(key):
    from flowgrpo_core.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=f"{key}: unknown key"):
        load_config("tiny", overrides=[f"{key}=x"])


def test_run_names_say_preset_model_and_short_id():
    from flowgrpo_core.stages import PipelineContext
    from flowgrpo_core.tracking import parent_run_name, short_id, stage_run_name

    assert short_id("local-20261203-153145-5766db") == "5766db"
    assert short_id("73769316-0c1d-4e5f-8a9b-000000000000") == "73769316"
    assert parent_run_name("sd3-ocr", "stabilityai/stable-diffusion-3.5-medium", "73769316-0c1d") == (
        "sd3-ocr-stable-diffusion-3.5-medium-73769316"
    )
    assert parent_run_name("tiny", "tiny:flux@7", "local-x-abc123") == "tiny-flux-abc123"
    assert stage_run_name("train_grpo", "local-x-abc123") == "abc123-train_grpo"
    ctx = PipelineContext(overrides=["tracking.run_name=baseline"], run_id="local-x-abc123")
    assert ctx.parent_name() == "baseline"  # tracking.run_name works


def test_evaluation_headline_has_deltas_per_metric_and_task():
    from flowgrpo_core.tracking import evaluation_headline

    metrics = {
        "eval/base/geneval_mean": 0.5,
        "eval/policy/geneval_mean": 0.6,
        "eval/policy/geneval_mean_se": 0.01,
        "eval/delta/geneval": 0.1,
        "eval/win_rate/geneval": 0.4,
        "eval/base/geneval/counting": 0.25,
        "eval/policy/geneval/counting": 0.5,
        "eval/base/geneval/accuracy/overall": 0.3,
        "eval/policy/geneval/accuracy/overall": 0.4,
        "eval/policy/geneval/accuracy/overall_se": 0.02,
    }
    out = evaluation_headline(metrics)
    assert out == {
        "eval/base/geneval_mean": 0.5,
        "eval/policy/geneval_mean": 0.6,
        "eval/delta/geneval": 0.1,
        "eval/win_rate/geneval": 0.4,
        "eval/delta/geneval/counting": 0.25,
        "eval/delta/geneval/accuracy/overall": pytest.approx(0.1),
    }


@pytest.mark.parametrize(
    ("model_input", "prompts", "seeds"),
    [
        ({"prompt": ["a", "b"]}, ["a", "b"], [3, 4]),  # MLflow makes this ONE row of lists
        ({"prompt": ["a", "b"], "seed": [5, 9]}, ["a", "b"], [5, 9]),
        ({"prompt": ["a"], "seed": [5]}, ["a"], [5]),
    ],
)
def test_prompts_given_as_a_dict_of_lists_are_one_image_each(model_input, prompts, seeds):
    from mlflow.models.utils import _enforce_schema

    from flowgrpo_core.config import load_config
    from flowgrpo_core.mlflow_model import _prompts_and_seeds
    from flowgrpo_core.registry import policy_signature

    enforced = _enforce_schema(model_input, policy_signature(load_config("tiny")).inputs)
    assert _prompts_and_seeds(enforced, 3) == (prompts, seeds)
