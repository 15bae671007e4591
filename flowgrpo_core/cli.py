"""``flowgrpo``: the command line. Every sub-command explains itself with ``--help``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from flowgrpo_core.train_command import TRAIN_DESCRIPTION, add_config_arguments, add_train_arguments

EPILOG = """examples:
  flowgrpo run --preset shapes                               # the whole DAG locally, tracked in MLflow (make run)
  flowgrpo run --preset tiny                                 # the same on a random tiny SD3, in about a minute
  flowgrpo compile --preset sd3-geneval -o flowgrpo.yaml     # KFP IR YAML for a cluster
  flowgrpo compile --preset sd3-ocr --gpus 8 --nodes 2 --pvc flowgrpo-work --s3-secret s3-creds \\
      --node-selector cloud.google.com/gke-accelerator=nvidia-h100-80gb --toleration nvidia.com/gpu:NoSchedule
  flowgrpo submit --host https://kfp.example --preset sd3-ocr --tracking-uri http://mlflow:5000
  flowgrpo promote --model flowgrpo-sd3 --version 7
  flowgrpo plan --preset flux-pickscore --gpus 8 --gpu-memory 80   # memory per GPU: does it fit?
  flowgrpo train --preset tiny --epochs 3 --out runs/x       # the trainer alone, no pipeline
  flowgrpo serve-reward ocr --port 18001
  flowgrpo pretrain-shapes --out runs/shapes-sd3             # rebuild the shapes world's base model
  flowgrpo presets
"""


TRACKING_URI_HELP = (
    "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///flowgrpo-runs/mlflow.db)"
)


def config_from_args(args: argparse.Namespace, extra: Sequence[str] = ()):
    from flowgrpo_core.config import load_config

    return load_config(args.preset, args.config, [*args.overrides, *extra])


def _cmd_presets(args: argparse.Namespace) -> int:
    from flowgrpo_core.config import load_config
    from flowgrpo_core.presets import preset_description, preset_names

    for name in preset_names():
        cfg = load_config(name)
        s, t = cfg.sampling, cfg.train
        rewards = ", ".join(f"{k} {v:g}" for k, v in cfg.rewards.items())
        print(f"{name}\n    {preset_description(name)}")
        print(
            f"    model {cfg.model.source} ({cfg.model.dtype}) | {s.resolution}px, T={s.num_steps}, cfg {s.guidance_scale:g}, "
            + (
                "noise-free roll-outs"
                if t.algorithm == "nft"
                else f"{s.sde_type} noise {s.noise_level:g}"
                + (f", Fast window {s.sde_window_size}" if s.sde_window_size else "")
            )
        )
        objective = (
            f"DiffusionNFT beta {t.nft_beta:g}, KL {t.nft_kl_beta:g}, {t.nft_solver} roll-outs"
            if t.algorithm == "nft"
            else f"beta {t.beta:g} ({t.kl_form} KL), clip {_clip_text(t.clip_bounds())}"
        )
        print(
            f"    reward {rewards} | group {s.group_size} x {s.groups_per_epoch} prompts, batch {s.batch_size} | "
            f"{objective}, lr {t.learning_rate:g}, "
            f"{'LoRA r' + str(t.lora_rank) + '/a' + format(t.lora_alpha, 'g') if t.lora else 'full fine-tuning'}"
        )
    return 0


def _clip_text(bounds: tuple[float, float]) -> str:
    low, high = bounds
    return f"{low:g}" if low == high else f"-{low:g}/+{high:g}"


def _cmd_train(args: argparse.Namespace) -> int:
    from flowgrpo_core.checkpoint import latest_checkpoint
    from flowgrpo_core.trainer import FlowGRPOTrainer

    extra = [f"train.epochs={args.epochs}"] if args.epochs is not None else []
    cfg = config_from_args(args, extra)
    if args.show_config:
        print(cfg.to_yaml(), end="")
        return 0
    out = Path(args.out)
    if latest_checkpoint(out / "checkpoints") is not None and not args.resume:
        raise ValueError(
            f"{out} already holds checkpoints: pass --resume to continue that run, or choose another --out"
        )
    reward = gold = None
    if args.endpoints:
        from flowgrpo_core.stages.common import build_gold_metrics, build_training_reward, read_endpoints

        if not Path(args.endpoints).is_file():
            raise FileNotFoundError(f"endpoints file {args.endpoints!r} does not exist")
        endpoints = read_endpoints(args.endpoints)
        reward = build_training_reward(cfg, endpoints)
        gold = build_gold_metrics(cfg, endpoints) if cfg.eval.every_epochs else None
    trainer = FlowGRPOTrainer(cfg, out, reward=reward, progress=not args.no_progress, gold=gold)
    if args.resume and not trainer.resume() and trainer.dist.is_main:
        print(f"[flowgrpo] no checkpoint in {out / 'checkpoints'}; starting from scratch", file=sys.stderr)
    history = trainer.train()
    policy = trainer.save_policy(out / "policy")
    if history and trainer.dist.is_main:
        first, last = history[0]["reward/total"], history[-1]["reward/total"]
        print(f"[flowgrpo] reward {first:.4f} -> {last:.4f} over {len(history)} epochs; policy in {policy}")
        if trainer.watch.records:
            summary = trainer.watch.summary(trainer.epoch)
            print(f"[flowgrpo] exported epoch {summary['exported_epoch']} ({summary['exported_because']})")
    trainer.close()
    return 0


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    """The pipeline's parameters (``PipelineContext``'s fields) as options."""
    from flowgrpo_core.stages.common import DEFAULT_WORKDIR

    add_config_arguments(parser, config_file=False)
    group = parser.add_argument_group("pipeline parameters")
    group.add_argument(
        "--model-source",
        default="",
        help="base model (tiny:sd3|flux|qwenimage, folder, s3://bucket/prefix, hub id); default: the config's",
    )
    group.add_argument("--model-revision", default="", help="hub revision of --model-source")
    group.add_argument("--tracking-uri", default=None, help=TRACKING_URI_HELP)
    group.add_argument("--experiment", default="", help="MLflow experiment (default: the preset name)")
    group.add_argument(
        "--workdir",
        default=DEFAULT_WORKDIR,
        help="folder for checkpoints and reward-server pid files (a PVC path on a cluster)",
    )


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """Where and how the compiled pipeline runs on Kubernetes (``compile`` and ``submit``)."""
    group = parser.add_argument_group("cluster (Kubernetes resources of the compiled pipeline)")
    group.add_argument(
        "--gpus",
        type=int,
        default=0,
        help="GPUs of each model-running stage, and of each training node (default 0)",
    )
    group.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="training nodes; > 1 trains as a PyTorchJob (Kubeflow training operator), needs --pvc (default 1)",
    )
    group.add_argument(
        "--accelerator",
        default="nvidia.com/gpu",
        help="resource name GPUs are requested as (default: nvidia.com/gpu)",
    )
    group.add_argument(
        "--node-selector",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="node label the GPU pods must match, e.g. cloud.google.com/gke-accelerator=nvidia-h100-80gb (repeatable)",
    )
    group.add_argument(
        "--toleration",
        action="append",
        default=[],
        metavar="KEY[=VALUE][:EFFECT]",
        help="taint the GPU pods tolerate, e.g. nvidia.com/gpu:NoSchedule (repeatable)",
    )
    group.add_argument(
        "--pvc",
        default="",
        help="ReadWriteMany PersistentVolumeClaim mounted by every step: work folder (checkpoints), model caches",
    )
    group.add_argument(
        "--pvc-mount",
        default="/mnt/flowgrpo",
        metavar="PATH",
        help="where the PVC is mounted; the default --workdir moves to PATH/work (default: /mnt/flowgrpo)",
    )
    group.add_argument(
        "--s3-secret",
        default="",
        metavar="NAME",
        help="Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY [, AWS_ENDPOINT_URL, MLFLOW_S3_ENDPOINT_URL, ...]",
    )
    group.add_argument(
        "--mlflow-secret",
        default="",
        metavar="NAME",
        help="Secret with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN",
    )
    group.add_argument(
        "--hf-secret", default="", metavar="NAME", help="Secret with HF_TOKEN (gated hub models)"
    )
    group.add_argument(
        "--reward-token-secret",
        default="",
        metavar="NAME",
        help="Secret with FLOWGRPO_REWARD_TOKEN, the reward servers' bearer token",
    )
    group.add_argument(
        "--image",
        default="",
        help="image of every step and training node (default: $FLOWGRPO_TRAINER_IMAGE "
        "or ghcr.io/flowgrpo/flowgrpo-trainer:<version>)",
    )
    group.add_argument(
        "--image-pull-secret",
        action="append",
        default=[],
        metavar="NAME",
        help="Secret for pulling the images from a private registry (repeatable)",
    )
    group.add_argument(
        "--gpu-memory",
        type=float,
        metavar="GIB",
        help="memory of one GPU: check the memory plan first and refuse a run that would not fit (`flowgrpo plan`)",
    )
    group.add_argument(
        "--worker-cpu", default="8", help="CPU of each training node when --nodes > 1 (default 8)"
    )
    group.add_argument(
        "--worker-memory", default="64Gi", help="memory of each training node when --nodes > 1 (default 64Gi)"
    )


def add_kfp_auth_arguments(parser: argparse.ArgumentParser) -> None:
    """How ``submit`` reaches a multi-user Kubeflow (``kfp.Client``'s namespace and credentials). Secrets are
    read from environment variables or files, never from the command line (``ps`` shows it)."""
    group = parser.add_argument_group("Kubeflow Pipelines connection")
    group.add_argument(
        "--namespace",
        default=None,
        help="Kubeflow profile namespace to run in (multi-user Kubeflow; default: the server's or the user's)",
    )
    group.add_argument(
        "--token-env",
        metavar="VAR",
        default=None,
        help="environment variable holding a bearer token for the KFP API (kfp.Client existing_token)",
    )
    group.add_argument(
        "--sa-token-path",
        metavar="FILE",
        default=None,
        help="projected service-account token file, re-read as it rotates (kfp.Client credentials; in-cluster "
        "clients usually mount it at /var/run/secrets/kubeflow/pipelines/token)",
    )
    group.add_argument(
        "--cookies-env",
        metavar="VAR",
        default=None,
        help="environment variable holding session cookies for an auth proxy such as Dex/oauth2-proxy, "
        "e.g. 'authservice_session=...' (kfp.Client cookies)",
    )
    group.add_argument(
        "--ssl-ca-cert", metavar="FILE", default=None, help="CA bundle to verify the KFP host's certificate"
    )


def _cluster_options(args: argparse.Namespace):
    from flowgrpo_core.cluster.options import ClusterOptions, Toleration, parse_key_value

    return ClusterOptions(
        gpus=args.gpus,
        nodes=args.nodes,
        accelerator=args.accelerator,
        node_selector=tuple(parse_key_value(text, "--node-selector") for text in args.node_selector),
        tolerations=tuple(Toleration.parse(text) for text in args.toleration),
        pvc=args.pvc,
        mount_path=args.pvc_mount,
        s3_secret=args.s3_secret,
        mlflow_secret=args.mlflow_secret,
        hf_secret=args.hf_secret,
        reward_token_secret=args.reward_token_secret,
        trainer_image=args.image,
        image_pull_secrets=tuple(args.image_pull_secret),
        worker_cpu=args.worker_cpu,
        worker_memory=args.worker_memory,
    )


def _pipeline_args(args: argparse.Namespace):
    from flowgrpo_core.stages import PipelineContext
    from flowgrpo_core.tracking import default_tracking_uri

    return PipelineContext(
        preset=args.preset,
        overrides=list(args.overrides),
        model_source=args.model_source,
        model_revision=args.model_revision,
        tracking_uri=args.tracking_uri or default_tracking_uri(),
        experiment=args.experiment,
        workdir=args.workdir,
    )


def _warn_if_pod_local(ctx, cluster) -> None:
    """A sqlite tracking URI in a compiled or submitted pipeline is a file inside each step's pod (unless it
    lies on the shared volume): every step would write its own database, lost with the pod."""
    from flowgrpo_core.tracking import sqlite_path

    db = sqlite_path(ctx.tracking_uri)
    if db is not None and not (cluster.pvc and cluster.on_volume(str(db))):
        print(
            f"[flowgrpo] warning: tracking URI {ctx.tracking_uri} is a file inside each step's pod: the steps do "
            "not share it and it is lost with the pods; pass --tracking-uri http://<mlflow server> "
            "(or set MLFLOW_TRACKING_URI), or keep it on the --pvc volume",
            file=sys.stderr,
        )


def _cmd_run(args: argparse.Namespace) -> int:
    import dataclasses

    from pipelines.runner import (
        LOG_NAME,
        PipelineInterrupted,
        StepFailed,
        new_run_id,
        resolve_resume,
        run_local,
    )

    pipeline_args = _pipeline_args(args)
    pipeline_args.validate()  # bad input fails here, before a run id is given out
    if args.resume:
        run_id = resolve_resume(pipeline_args, args.resume)
        print(f"[flowgrpo] continuing run {run_id}")
    else:
        run_id = new_run_id()
        print(f"[flowgrpo] run {run_id}")
    pipeline_args = dataclasses.replace(pipeline_args, run_id=run_id)
    if not args.verbose:
        print(f"[flowgrpo] every step's output: {pipeline_args.run_dir / LOG_NAME} (--verbose shows it here)")
    try:
        result = run_local(pipeline_args, pipeline_root=args.pipeline_root, verbose=args.verbose)
    except PipelineInterrupted as interrupted:
        print(f"\n[flowgrpo] {interrupted}", file=sys.stderr)
        return 130
    except StepFailed as failed:
        if not args.verbose:  # with --verbose the step's output is on the screen already
            print(f"[flowgrpo] the last lines of the step's output ({failed.log}):", file=sys.stderr)
            print("\n".join("    " + line for line in failed.tail), file=sys.stderr)
        print(f"flowgrpo run: error: {failed}", file=sys.stderr)
        return 1
    print(f"\n[flowgrpo] pipeline finished in {result.seconds:.0f}s (run {result.run_id})")
    if result.resumed_from_epoch != "none":
        print(f"[flowgrpo] training resumed from its checkpoint at epoch {result.resumed_from_epoch}")
    print(f"[flowgrpo] MLflow experiment {result.experiment!r}, parent run {result.parent_run_id}")
    print(f"[flowgrpo] registered model version: {result.registered or 'none'}")
    if result.gate:
        print(f"[flowgrpo] gate: {result.gate}")
    if pipeline_args.tracking_uri.startswith("sqlite:///"):
        print(f"[flowgrpo] look at it: mlflow ui --backend-store-uri {pipeline_args.tracking_uri}")
    else:
        print(f"[flowgrpo] look at it: {pipeline_args.tracking_uri}")
    return 0


def _check_memory_plan(args: argparse.Namespace) -> None:
    """--gpu-memory: refuse a cluster job whose training would not fit its GPUs."""
    if args.gpu_memory is None:
        return
    from flowgrpo_core.plan_command import check_cluster_plan

    overrides = [*args.overrides] + ([f"model.source={args.model_source}"] if args.model_source else [])
    fits = check_cluster_plan(args.preset, overrides, args.gpus, args.nodes, args.gpu_memory)
    print(f"[flowgrpo] memory plan: {fits}")


def _cmd_compile(args: argparse.Namespace) -> int:
    from pipelines.runner import compile_pipeline

    _check_memory_plan(args)
    ctx, cluster = _pipeline_args(args), _cluster_options(args)
    _warn_if_pod_local(ctx, cluster)
    path = compile_pipeline(ctx, args.output, cluster=cluster)
    print(f"[flowgrpo] compiled {path}")
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from pipelines.runner import KfpConnection, submit

    _check_memory_plan(args)
    ctx, cluster = _pipeline_args(args), _cluster_options(args)
    _warn_if_pod_local(ctx, cluster)
    connection = KfpConnection(
        host=args.host,
        namespace=args.namespace,
        token_env=args.token_env,
        sa_token_path=args.sa_token_path,
        cookies_env=args.cookies_env,
        ssl_ca_cert=args.ssl_ca_cert,
    )
    run_id = submit(
        ctx,
        connection,
        run_name=args.run_name,
        kfp_experiment=args.kfp_experiment,
        cluster=cluster,
    )
    print(f"[flowgrpo] submitted run {run_id} to {args.host}")
    return 0


def _cmd_promote(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from flowgrpo_core.registry import promote
    from flowgrpo_core.tracking import check_store_exists, configure, default_tracking_uri

    tracking_uri = args.tracking_uri or default_tracking_uri()
    check_store_exists(tracking_uri)  # promoting in a database created on the spot can only fail
    configure(tracking_uri)
    try:
        moved, reason = promote(args.model, args.version, force=args.force)
    except MlflowException as error:  # e.g. no such model or version: the registry's words, not a traceback
        raise ValueError(f"{tracking_uri}: {error.message}") from None
    print(f"[flowgrpo] {args.model} v{args.version}: {'champion' if moved else 'not promoted'} ({reason})")
    return 0 if moved else 1


def version_text() -> str:
    """``flowgrpo X (mlflow Y, kfp Z, torch W)``: what a bug report needs."""
    from importlib.metadata import PackageNotFoundError, version

    from flowgrpo_core import __version__

    parts = []
    for package in ("mlflow", "kfp", "torch"):
        try:
            parts.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            parts.append(f"{package} not installed")
    return f"flowgrpo {__version__} ({', '.join(parts)})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowgrpo",
        description="Flow-GRPO for flow-matching text-to-image models (SD3, FLUX, Qwen-Image), as a Kubeflow "
        "pipeline tracked in MLflow.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=version_text(), help="print versions and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    presets = sub.add_parser(
        "presets", help="list the named presets and their key values", description="List the presets."
    )
    presets.set_defaults(func=_cmd_presets)

    train = sub.add_parser(
        "train",
        help="train a policy with Flow-GRPO in this process (no pipeline, no MLflow)",
        description=TRAIN_DESCRIPTION,
    )
    add_train_arguments(train)
    train.set_defaults(func=_cmd_train)

    run = sub.add_parser(
        "run",
        help="run the whole pipeline locally (kfp.local, no containers) tracked in MLflow",
        description="Run download -> reward servers -> calibration -> training -> evaluation -> registration in this "
        "machine's processes with kfp.local, log everything to MLflow and register the policy. Ctrl-C (or SIGTERM) "
        "stops the step running and the reward servers, marks the MLflow runs KILLED and prints how to continue: "
        "the same command with --resume RUN_ID resumes training from its last checkpoint.",
    )
    add_pipeline_arguments(run)
    run.add_argument(
        "--pipeline-root", default="flowgrpo-runs/kfp", help="where kfp.local keeps each task's artifacts"
    )
    run.add_argument(
        "--verbose",
        action="store_true",
        help="show every step's output here (kfp.local's and the executor's lines included); by default it "
        "goes to <workdir>/<run id>/pipeline.log and only flowgrpo's own lines are shown",
    )
    run.add_argument(
        "--resume",
        metavar="RUN_ID",
        help="continue an interrupted run (its work folder and MLflow runs; training from its last checkpoint); "
        "'last' continues the newest unfinished run of the experiment. The config must be the run's.",
    )
    run.set_defaults(func=_cmd_run)

    compile_ = sub.add_parser(
        "compile",
        help="compile the pipeline to KFP IR YAML",
        description="Compile the pipeline with "
        "these parameters as defaults, for upload to Kubeflow Pipelines.",
    )
    add_pipeline_arguments(compile_)
    add_cluster_arguments(compile_)
    compile_.add_argument(
        "-o", "--output", default="flowgrpo.yaml", help="output YAML file (default: flowgrpo.yaml)"
    )
    compile_.set_defaults(func=_cmd_compile)

    submit_ = sub.add_parser(
        "submit", help="submit the pipeline to a Kubeflow Pipelines server", description="Submit a run."
    )
    add_pipeline_arguments(submit_)
    submit_.add_argument(
        "--host", required=True, help="KFP API endpoint, e.g. https://kfp.example.com/pipeline"
    )
    submit_.add_argument("--run-name", help="KFP run name (default: flowgrpo-<preset>)")
    submit_.add_argument("--kfp-experiment", help="KFP experiment (default: flowgrpo-<preset>)")
    add_kfp_auth_arguments(submit_)
    add_cluster_arguments(submit_)
    submit_.set_defaults(func=_cmd_submit)

    promote_ = sub.add_parser(
        "promote",
        help="move the 'champion' alias to a registered version if it passes the gate",
        description="Compare the version's recorded gate metric with the current champion's (or, with none, the base "
        "model's) and move the 'champion' alias when it wins by the recorded margin. Exit code 1 when it does not.",
    )
    promote_.add_argument("--model", required=True, help="registered model name, e.g. flowgrpo-sd3")
    promote_.add_argument("--version", required=True, help="model version to promote")
    promote_.add_argument(
        "--force", action="store_true", help="move the alias even if the gate fails (recorded as forced)"
    )
    promote_.add_argument("--tracking-uri", default=None, help=TRACKING_URI_HELP)
    promote_.set_defaults(func=_cmd_promote)

    from flowgrpo_core.plan_command import add_plan_parser
    from flowgrpo_core.pretrain.config import add_pretrain_shapes_parser
    from flowgrpo_core.serving.commands import add_serve_reward_parser

    add_plan_parser(sub)

    add_serve_reward_parser(sub)
    add_pretrain_shapes_parser(sub).set_defaults(func=_cmd_pretrain_shapes)
    return parser


def _cmd_pretrain_shapes(args: argparse.Namespace) -> int:
    from flowgrpo_core.pretrain.config import config_from_args
    from flowgrpo_core.pretrain.run import pretrain_shapes

    pretrain_shapes(config_from_args(args), args.out, progress=not args.no_progress)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from flowgrpo_core.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    # OSError: files and disks (a missing file, a full disk while checkpointing), connections
    except (ConfigError, ValueError, OSError) as error:
        print(f"flowgrpo {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
