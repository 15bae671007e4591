"""The `flowgrpo` command line, run as a real subprocess."""

import subprocess
import sys

import pytest

from flowgrpo_core.cli import build_parser, main


def _run(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "flowgrpo_core.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


def test_help_explains_every_command_and_option():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert {"train", "presets"} <= set(sub.choices)
    for name, command in sub.choices.items():
        for action in command._actions:
            if action.dest != "help":
                assert action.help, (
                    f"`flowgrpo {name}` option {action.option_strings or action.dest} has no help"
                )
    assert "train" in _run("--help").stdout


def test_presets_lists_key_values(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in (
        "tiny",
        "sd3-geneval",
        "sd3-ocr",
        "sd3-pickscore",
        "sd3-pickscore-fast",
        "flux-pickscore-fast",
    ):
        assert name in out
    assert "beta 0.04 (reference KL)" in out and "cps noise 0.8, Fast window 3" in out


def test_train_prints_per_epoch_reward_writes_a_policy_and_resumes(tmp_path):
    out = tmp_path / "x"
    result = _run("train", "--preset", "tiny", "--epochs", "2", "--out", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert (
        "epoch 0: reward" in result.stderr + result.stdout
        and "epoch 1: reward" in result.stderr + result.stdout
    )
    assert (out / "policy" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "policy" / "ema" / "pytorch_lora_weights.safetensors").is_file()
    again = _run("train", "--preset", "tiny", "--epochs", "3", "--out", str(out), "--no-progress")
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = _run(
        "train", "--preset", "tiny", "--epochs", "3", "--out", str(out), "--resume", "--no-progress"
    )
    assert resumed.returncode == 0, resumed.stderr
    text = resumed.stderr + resumed.stdout
    assert "resumed from" in text and "epoch 2: reward" in text and "epoch 0: reward" not in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--preset", "nope"], "unknown preset"),
        (["train", "--set", "train.beta=-1"], "train.beta"),
        (["train", "--set", "oops"], "malformed override"),
    ],
)
def test_bad_input_exits_2_with_a_message(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_show_config(capsys):
    assert main(["train", "--preset", "tiny", "--set", "train.beta=0.5", "--show-config"]) == 0
    assert "beta: 0.5" in capsys.readouterr().out
