"""The champion gate and promotion, on a real sqlite MLflow registry with real policy folders."""

import pytest

from flowgrpo_core.cli import main
from flowgrpo_core.config import load_config
from flowgrpo_core.registry import CANDIDATE, CHAMPION, register_policy
from flowgrpo_core.trainer import FlowGRPOTrainer


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("policy")
    trainer = FlowGRPOTrainer(
        load_config("tiny", overrides=["train.checkpoint_every=0", "sampling.num_steps=4"]),
        root / "run",
        progress=False,
    )
    trainer.train(epochs=1)
    return trainer.save_policy(root / "policy")


@pytest.fixture()
def registry(tmp_path):
    import mlflow

    from flowgrpo_core.tracking import configure, ensure_experiment

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    configure(uri)
    # the Default experiment would put artifacts in ./mlruns of the working directory
    mlflow.set_experiment(experiment_id=ensure_experiment("registry-test", uri))
    yield uri
    mlflow.set_tracking_uri(None)


def _register(policy_dir, run_id, policy_value, base_value=1.0, margin=0.0):
    import mlflow

    metrics = {"eval/policy/reward_mean": policy_value, "eval/base/reward_mean": base_value}
    with mlflow.start_run():
        return register_policy(
            policy_dir, "tiny:sd3", None, "flowgrpo-test", metrics, "eval/policy/reward_mean", margin, run_id
        )


def test_champion_moves_only_through_the_gate(policy_dir, registry):
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    worse_than_base = _register(policy_dir, "run-a", 0.9)
    assert not worse_than_base.gate_passed and worse_than_base.champion is None
    assert "against the base model" in worse_than_base.gate_reason
    first = _register(policy_dir, "run-b", 1.2)
    assert first.gate_passed and first.champion == first.version == "2"
    tie = _register(policy_dir, "run-c", 1.2)  # no better than the champion: stays a candidate
    assert not tie.gate_passed and tie.champion == "2" and "against champion v2" in tie.gate_reason
    assert client.get_model_version_by_alias("flowgrpo-test", CANDIDATE).version == 3
    within_margin = _register(policy_dir, "run-d", 1.25, margin=0.1)
    assert not within_margin.gate_passed
    better = _register(policy_dir, "run-e", 1.5, margin=0.1)
    assert better.gate_passed and client.get_model_version_by_alias("flowgrpo-test", CHAMPION).version == 5
    assert client.get_model_version("flowgrpo-test", "4").tags["gate.decision"] == "failed"


def test_promote_command_respects_the_gate_and_force(policy_dir, registry, capsys):
    from mlflow.tracking import MlflowClient

    _register(policy_dir, "run-a", 1.5)  # v1 champion
    _register(policy_dir, "run-b", 1.2)  # v2 candidate, worse
    assert main(["promote", "--model", "flowgrpo-test", "--version", "2", "--tracking-uri", registry]) == 1
    assert "not promoted" in capsys.readouterr().out
    assert (
        main(["promote", "--model", "flowgrpo-test", "--version", "2", "--force", "--tracking-uri", registry])
        == 0
    )
    assert "[forced]" in capsys.readouterr().out
    assert MlflowClient().get_model_version_by_alias("flowgrpo-test", CHAMPION).version == 2
    assert MlflowClient().get_model_version("flowgrpo-test", "2").tags["gate.decision"] == "forced"


def test_unknown_gate_metric_is_an_error(policy_dir, registry):
    import mlflow

    with mlflow.start_run(), pytest.raises(ValueError, match="gate metric 'eval/policy/nope' is not among"):
        register_policy(
            policy_dir,
            "tiny:sd3",
            None,
            "flowgrpo-test",
            {"eval/policy/reward_mean": 1.0},
            "eval/policy/nope",
            0.0,
            "r",
        )


def _register_accuracy(policy_dir, run_id, policy, base, se, k=2.0):
    import mlflow

    key = "eval/policy/shapes_geneval/accuracy/overall"
    base_key = key.replace("/policy/", "/base/")
    metrics = {key: policy, f"{key}_se": se, base_key: base, f"{base_key}_se": se}
    with mlflow.start_run():
        return register_policy(
            policy_dir, "tiny:sd3", None, "flowgrpo-test", metrics, key, 0.0, run_id, gate_standard_errors=k
        )


def test_gate_with_standard_errors_does_not_promote_noise(policy_dir, registry):
    # difference SE = hypot(0.03, 0.03) = 0.0424; two of them: 0.0849
    noise = _register_accuracy(policy_dir, "run-a", 0.390, 0.307, se=0.03)  # the +8.3 points of a noisy run
    assert not noise.gate_passed and "2 x standard error 0.0424" in noise.gate_reason
    real = _register_accuracy(policy_dir, "run-b", 0.400, 0.307, se=0.03)
    assert real.gate_passed and real.champion == "2"
    # against the champion, with its own standard error
    assert not _register_accuracy(policy_dir, "run-c", 0.480, 0.307, se=0.03).gate_passed
    assert _register_accuracy(policy_dir, "run-d", 0.490, 0.307, se=0.03).gate_passed


def test_gate_with_standard_errors_needs_the_metric_s_error(policy_dir, registry):
    import mlflow

    with mlflow.start_run(), pytest.raises(ValueError, match="reward_mean_se"):
        register_policy(
            policy_dir,
            "tiny:sd3",
            None,
            "flowgrpo-test",
            {"eval/policy/reward_mean": 1.0},
            "eval/policy/reward_mean",
            0.0,
            "r",
            gate_standard_errors=2.0,
        )


def test_an_alias_write_that_loses_a_uniqueness_race_is_retried(policy_dir, registry, monkeypatch):
    # MLflow reads the alias row, then inserts it: a second pipeline registering in the same moment gets the
    # store's uniqueness error, and must not fail its whole run for it
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    real, lost = MlflowClient.set_registered_model_alias, []

    def racy(self, name, alias, version):
        if alias not in lost:  # each alias loses its first write to "another pipeline"
            lost.append(alias)
            raise MlflowException(
                "(sqlite3.IntegrityError) UNIQUE constraint failed: registered_model_aliases"
            )
        real(self, name, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", racy)
    result = _register(policy_dir, "run-a", 1.2)
    assert result.gate_passed and result.champion == "1" and lost == [CANDIDATE, CHAMPION]
    assert MlflowClient().get_model_version_by_alias("flowgrpo-test", CANDIDATE).version == 1

    def broken(self, name, alias, version):  # any other error is not a race: it is raised at once
        lost.append("broken")
        raise MlflowException("permission denied")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", broken)
    with pytest.raises(MlflowException, match="permission denied"):
        _register(policy_dir, "run-b", 1.5)
    assert lost.count("broken") == 1


def test_two_registrations_at_once_keep_the_better_champion(policy_dir, registry, monkeypatch):
    # the registry has no compare-and-set: both judge against the same (absent) champion; the one that
    # moves the alias second reads it back and is judged again against the first
    from mlflow.tracking import MlflowClient

    import flowgrpo_core.registry as registry_module

    real_set = registry_module._set_alias
    state = {"interleaved": False}

    def interleave(client, name, alias, version, attempts=6):
        real_set(client, name, alias, version, attempts)
        if alias == registry_module.CHAMPION and not state["interleaved"]:
            state["interleaved"] = True  # the better version (registered first) takes champion right after us
            real_set(client, name, alias, "1", attempts)

    better = _register(policy_dir, "run-a", 1.5)  # v1, champion
    client = MlflowClient()
    client.delete_registered_model_alias("flowgrpo-test", CHAMPION)  # as if v1 were still being judged
    monkeypatch.setattr(registry_module, "_set_alias", interleave)
    worse = _register(policy_dir, "run-b", 1.2)  # passes against the base, then meets v1
    assert better.gate_passed and not worse.gate_passed
    assert "against champion v1" in worse.gate_reason
    assert client.get_model_version_by_alias("flowgrpo-test", CHAMPION).version == 1
    assert client.get_model_version("flowgrpo-test", "2").tags["gate.decision"] == "failed"
