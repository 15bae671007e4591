"""Held-out GenEval accuracy in the shapes world: the base model, then Flow-GRPO, Flow-GRPO-Fast and DiffusionNFT
trained side by side under the same CPU budget (issue 7; the number the README publishes), next to a supervised
reference.

Both methods start from the packaged base model (``shapes:sd3``) with the ``shapes`` preset, train on
``builtin:shapes_train`` and are evaluated on ``builtin:shapes_test`` (no prompt in common, and held out from
pre-training too) with the preset's evaluation: ODE sampling, fixed seeds, the EMA weights, GenEval's strict
rules judged by the shapes detector; overall = the mean of the six task accuracies. Fast differs from the
full method only by ``--fast-set`` (default: a 2-step SDE window in the first half of the schedule).
DiffusionNFT ("nft") trains from ``--nft-preset`` (default ``shapes-nft``: the shapes preset's model, reward,
prompts and evaluation with NFT's objective, CFG-free ODE roll-outs of its old policy), under the same budget
and evaluation; its gradient noise scale is ``benchmarks/gradient_noise_scale.py --preset shapes-nft``.

The supervised reference ("supervised") spends the same budget continuing the base model's pre-training:
rectified flow on ground-truth renders of fresh captions of the six task types (none with a test prompt's
requirements), the whole model trained as in ``flowgrpo pretrain-shapes``, at ``--supervised-lr``. It learns
from the right answer instead of a reward, so it shows what this budget can buy this model at best: a
reward-driven method that far exceeds it would be learning faster than from ground truth.

Time is the CPU time of the method's process (``resource.getrusage``: user + system, every thread) spent in
training epochs (sampling, rewards, optimisation), not wall time, because the machine is shared; evaluation
is excluded. Each method is evaluated every ``--eval-every`` CPU-minutes and at the end of its budget. The
methods run side by side in their own processes (``--jobs``), ``--threads`` torch threads each.

    python benchmarks/shapes_geneval.py [--cpu-minutes 30] [--eval-every 2.5] [--methods full,fast,nft,supervised]
        [--set KEY=VALUE] [--nft-set KEY=VALUE] [--json out.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import json
import math
import multiprocessing
import resource
import sys
import tempfile
import time

import numpy as np
import torch

from flowgrpo_core.config import FlowGRPOConfig, load_config
from flowgrpo_core.models import adapter_for
from flowgrpo_core.models.loading import parse_source
from flowgrpo_core.pretrain.config import PretrainConfig
from flowgrpo_core.pretrain.flow_matching import CaptionSampler, Phase, train_transformer
from flowgrpo_core.pretrain.run import load_trained_parts, shapes_accuracy
from flowgrpo_core.pretrain.shapes_model import build_shapes_sd3
from flowgrpo_core.prompts import load_prompts
from flowgrpo_core.prompts.vocabulary import TAGS
from flowgrpo_core.registry import gate
from flowgrpo_core.trainer import FlowGRPOTrainer

METHODS = {
    "full": "Flow-GRPO",
    "fast": "Flow-GRPO-Fast",
    "nft": "DiffusionNFT",
    "supervised": "supervised reference",
}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def held_out_accuracy(adapter, cfg: FlowGRPOConfig) -> dict[str, float]:
    """The model's accuracy on the preset's evaluation prompts, with the preset's evaluation settings."""
    e = cfg.eval
    prompts = load_prompts(cfg.prompts.eval)
    prompts = prompts.take(list(range(min(e.num_prompts, len(prompts)))))
    return shapes_accuracy(
        adapter,
        prompts,
        images_per_prompt=e.images_per_prompt,
        min_images_per_tag=e.min_images_per_tag,
        num_steps=e.num_steps,
        guidance_scale=e.guidance_scale,
        seed=e.seed,
        batch_size=e.batch_size,
        max_sequence_length=cfg.sampling.max_sequence_length,
    )


def policy_accuracy(trainer: FlowGRPOTrainer, cfg: FlowGRPOConfig) -> dict[str, float]:
    """The policy's held-out accuracy, with the EMA weights when EMA is on."""
    with trainer.evaluation_weights():
        return held_out_accuracy(trainer.adapter, cfg)


def train_under_budget(
    name: str, cfg: FlowGRPOConfig, cpu_budget_s: float, eval_every_s: float, threads: int = 1
) -> list[dict]:
    """Train epoch after epoch until the CPU budget is spent; returns the evaluation points
    ``{"method", "epoch", "cpu_min", <tag>: accuracy, "overall"}`` (the first at 0 CPU-minutes)."""
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as out:
        trainer = FlowGRPOTrainer(cfg, out, progress=False)
        points = [{"method": name, "epoch": 0, "cpu_min": 0.0, **policy_accuracy(trainer, cfg)}]
        print(_row(points[-1]), flush=True)
        spent, next_eval, epoch = 0.0, eval_every_s, 0
        while spent < cpu_budget_s:
            started = cpu_seconds()
            # run_epoch, not train(): train() writes a checkpoint each call, which is not part of the method
            with contextlib.redirect_stderr(io.StringIO()):
                metrics = trainer.run_epoch(epoch)
            spent += cpu_seconds() - started
            trainer.history.append(metrics)
            epoch = trainer.epoch = epoch + 1
            if spent >= next_eval or spent >= cpu_budget_s:
                points.append(
                    {"method": name, "epoch": epoch, "cpu_min": spent / 60, **policy_accuracy(trainer, cfg)}
                )
                print(_row(points[-1]) + f"   (train reward {metrics['reward/total']:.3f})", flush=True)
                next_eval += eval_every_s
        return points


def supervised_under_budget(
    name: str,
    cfg: FlowGRPOConfig,
    cpu_budget_s: float,
    eval_every_s: float,
    threads: int = 1,
    learning_rate: float = 3e-4,
    seed: int = 2,
) -> list[dict]:
    """Continue pre-training the preset's packaged shapes model for the CPU budget (rectified flow on
    ground-truth renders, ``flowgrpo pretrain-shapes --init-from``) and evaluate it as the RL methods are.
    Evaluation points as ``train_under_budget``'s; "epoch" counts optimiser steps of 8 scenes."""
    torch.set_num_threads(threads)
    folder = parse_source(cfg.model.source).location
    pre = PretrainConfig(
        init_from=folder, seed=seed, learning_rate=learning_rate, threads=threads, eval_every=1
    )
    pipe = build_shapes_sd3(pre.model, seed=pre.seed)
    load_trained_parts(pipe, folder)
    adapter = adapter_for(pipe, cfg.model.source)
    sampler = CaptionSampler(pre.tag_weights, load_prompts(pre.held_out).metadata)
    points = [{"method": name, "epoch": 0, "cpu_min": 0.0, **held_out_accuracy(adapter, cfg)}]
    print(_row(points[-1]), flush=True)
    start = cpu_seconds()
    # the deadline moves on by each evaluation's CPU time: evaluations are not training, as for the RL methods
    phase = Phase(steps=sys.maxsize, deadline=start + cpu_budget_s, clock=cpu_seconds)
    excluded, next_eval = 0.0, eval_every_s

    def evaluate(step: int) -> None:  # called every step, with the EMA weights swapped in
        nonlocal excluded, next_eval
        spent = cpu_seconds() - start - excluded
        if spent < next_eval:
            return
        began = cpu_seconds()
        points.append(
            {"method": name, "epoch": step, "cpu_min": spent / 60, **held_out_accuracy(adapter, cfg)}
        )
        print(_row(points[-1]), flush=True)
        excluded += cpu_seconds() - began
        phase.deadline = start + cpu_budget_s + excluded
        next_eval += eval_every_s

    data, noise = np.random.default_rng(pre.seed), torch.Generator().manual_seed(pre.seed)
    steps = len(train_transformer(pipe, sampler, pre, phase, data, noise, evaluate, progress=False))
    # the pipeline now holds the EMA weights, the ones evaluated above
    spent = cpu_seconds() - start - excluded
    points.append({"method": name, "epoch": steps, "cpu_min": spent / 60, **held_out_accuracy(adapter, cfg)})
    print(_row(points[-1]), flush=True)
    return points


def first_reaching(points: list[dict], target: float) -> float | None:
    """CPU-minutes at the first evaluation whose overall accuracy reaches ``target``."""
    return next((p["cpu_min"] for p in points if p["overall"] >= target - 1e-9), None)


def significant_gain(a: dict, b: dict) -> bool:
    """Whether ``b``'s overall accuracy exceeds ``a``'s by more than two standard errors of the difference
    (the two evaluations' binomial errors combined as if independent): the registry's gate at k = 2."""
    return gate(b["overall"], a["overall"], 0.0, math.hypot(a["overall_se"], b["overall_se"]), 2.0)[0]


def _row(p: dict) -> str:
    tags = " | ".join(f"{p[t]:.2f}" for t in TAGS)
    return f"| {p['method']} | {p['epoch']} | {p['cpu_min']:.1f} | {tags} | **{p['overall']:.3f}** ± {p['overall_se']:.3f} |"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="shapes", help="preset both methods start from (default: shapes)")
    parser.add_argument(
        "--cpu-minutes", type=float, default=30.0, help="training CPU budget per method (default 30)"
    )
    parser.add_argument(
        "--eval-every", type=float, default=2.5, help="CPU-minutes between evaluations (default 2.5)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override for both methods (repeatable)",
    )
    parser.add_argument(
        "--fast-set",
        dest="fast",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="what makes Flow-GRPO-Fast (default: sampling.sde_window_size=2)",
    )
    parser.add_argument(
        "--nft-preset", default="shapes-nft", help="preset DiffusionNFT starts from (default: shapes-nft)"
    )
    parser.add_argument(
        "--nft-set",
        dest="nft",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override for DiffusionNFT only (repeatable), after --set",
    )
    parser.add_argument(
        "--methods",
        default="full,fast,nft,supervised",
        help="comma-separated subset of full,fast,nft,supervised (default: all four)",
    )
    parser.add_argument(
        "--supervised-lr",
        type=float,
        default=3e-4,
        help="learning rate of the supervised reference (default 3e-4)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per method (default 1)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="methods trained at the same time, one process each (default: all of them)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write every evaluation point as JSON")
    args = parser.parse_args()
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        parser.error(f"--methods: unknown {', '.join(unknown)}; choose from {','.join(METHODS)}")
    fast_overrides = args.fast or ["sampling.sde_window_size=2"]
    overrides = {
        "full": args.overrides,
        "fast": [*args.overrides, *fast_overrides],
        "nft": [*args.overrides, *args.nft],
        "supervised": args.overrides,
    }
    presets = {m: args.nft_preset if m == "nft" else args.preset for m in METHODS}
    configs = {METHODS[m]: load_config(presets[m], overrides=overrides[m]) for m in METHODS if m in methods}
    evaluations = {cfg.eval.model_dump_json() + cfg.prompts.eval for cfg in configs.values()}
    if len(evaluations) > 1:  # one base row for all: every method must be judged alike
        parser.error(
            f"--nft-preset {args.nft_preset}: its eval settings or prompts differ from {args.preset}'s"
        )
    if "supervised" in methods and not configs[METHODS["supervised"]].model.source.startswith("shapes:"):
        parser.error(
            "--methods supervised: the preset's model.source must be a packaged shapes model (shapes:sd3)"
        )
    print(
        f"preset {args.preset}, {args.cpu_minutes:g} CPU-minutes of training per method, {args.threads} thread(s)"
    )
    for name, cfg in configs.items():
        print(f"{name}: {cfg.describe()}")
    e = next(iter(configs.values())).eval
    print(
        f"held-out: {e.num_prompts} prompts of {next(iter(configs.values())).prompts.eval} x {e.images_per_prompt} images (at least {e.min_images_per_tag} per task), "
        f"{e.num_steps} ODE steps, CFG {e.guidance_scale:g}\n"
    )
    header = (
        "| method | epochs (supervised: steps) | CPU-min | "
        + " | ".join(TAGS)
        + " | overall ± standard error |\n|---|---|---|"
        + "---|" * len(TAGS)
        + "---|"
    )
    print(header)
    started = time.monotonic()
    budget = (60 * args.cpu_minutes, 60 * args.eval_every, args.threads)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: torch threads are per process
    with concurrent.futures.ProcessPoolExecutor(args.jobs or len(configs), mp_context=context) as pool:
        futures = {
            name: pool.submit(supervised_under_budget, name, cfg, *budget, args.supervised_lr)
            if name == METHODS["supervised"]
            else pool.submit(train_under_budget, name, cfg, *budget)
            for name, cfg in configs.items()
        }
        curves = {name: future.result() for name, future in futures.items()}
    print(f"\nwall time {(time.monotonic() - started) / 60:.1f} min\n")
    print(header)
    for points in curves.values():
        for p in points:
            print(_row(p))
    print()
    base = next(iter(curves.values()))[0]
    for name, points in curves.items():
        final = points[-1]
        gain = final["overall"] - base["overall"]
        error = math.hypot(base["overall_se"], final["overall_se"])
        verdict = (
            "significant" if significant_gain(base, final) else "within two standard errors: not significant"
        )
        print(
            f"{name}: base {base['overall']:.3f} -> {final['overall']:.3f} after {final['cpu_min']:.1f} CPU-min "
            f"({100 * gain:+.1f} ± {100 * error:.1f} points, {verdict})"
        )
    if "Flow-GRPO" in curves and "Flow-GRPO-Fast" in curves:
        print(speedup_line(base, curves["Flow-GRPO"], curves["Flow-GRPO-Fast"]))
    supervised = curves.get(METHODS["supervised"])
    for name in (n for n in curves if n != METHODS["supervised"]):
        if supervised is not None:
            print(share_line(name, base, curves[name][-1], supervised[-1]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "curves": curves}, f, indent=1)


def share_line(name: str, base: dict, final: dict, supervised: dict) -> str:
    """A method's final gain as a share of the supervised reference's (what this budget buys from ground truth)."""
    gain, reference = final["overall"] - base["overall"], supervised["overall"] - base["overall"]
    if reference <= 0:
        return f"{name}: no share of the supervised reference's gain (the reference gained nothing)"
    return f"{name}: {100 * gain / reference:.0f} % of the supervised reference's gain ({100 * reference:+.1f} points)"


def speedup_line(base: dict, full: list[dict], fast: list[dict]) -> str:
    """How much sooner Fast first reaches the full method's final accuracy, or why that is not measured."""
    if not significant_gain(base, full[-1]):
        # the target is Flow-GRPO's final accuracy; when that is noise, a time to reach it is noise too
        return "no speed-up measured: Flow-GRPO's final accuracy is not significantly above the base"
    target = full[-1]["overall"]
    full_t, fast_t = first_reaching(full, target), first_reaching(fast, target)
    speedup = (
        "never within its budget"
        if fast_t is None
        else "at once"
        if fast_t == 0
        else f"{full_t / fast_t:.1f}x sooner"
    )
    return (
        f"first reaching Flow-GRPO's final accuracy {target:.3f}: Flow-GRPO at {full_t:.1f} CPU-min, "
        f"Flow-GRPO-Fast at {'-' if fast_t is None else f'{fast_t:.1f}'} CPU-min ({speedup})"
    )


if __name__ == "__main__":
    main()
