"""download_model: the base model as a diffusers folder, with a sha256 manifest of every file."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from flowgrpo_core.stages.common import PipelineContext

MANIFEST = "manifest.json"


def sha256_manifest(folder: Path) -> dict[str, dict]:
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        files[path.relative_to(folder).as_posix()] = {
            "sha256": digest.hexdigest(),
            "bytes": path.stat().st_size,
        }
    return files


def model_family(folder: Path) -> str:
    from flowgrpo_core.models import ADAPTERS
    from flowgrpo_core.models.loading import pipeline_class

    name = pipeline_class(folder) or ""
    if name not in ADAPTERS:
        raise ValueError(f"{folder}: pipeline class {name!r} is not supported; supported: {sorted(ADAPTERS)}")
    return ADAPTERS[name].family


def download_model(ctx: PipelineContext, out_dir: str | Path) -> dict:
    """Copy (or build, for tiny:) the configured base model into ``out_dir``. Returns its metadata."""
    import mlflow

    from flowgrpo_core.models.loading import load_pipeline, parse_source, resolve_folder
    from flowgrpo_core.tracking import log_config, timed_work

    config = ctx.config()
    source, revision = config.model.source, config.model.revision
    parse_source(source)  # a malformed source fails here, before MLflow or any download
    out = Path(out_dir)
    with ctx.stage("download_model"):
        log_config(config)
        with timed_work():
            folder = resolve_folder(source, revision)
            if folder is None:  # tiny: built from its config and seed, then saved like any other model
                load_pipeline(source, revision).save_pretrained(out)
            else:
                shutil.copytree(
                    folder, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".cache", ".git*")
                )
            files = sha256_manifest(out)
        meta = {"family": model_family(out), "source": source, "revision": revision or "", "files": files}
        (out / MANIFEST).write_text(json.dumps(meta, indent=1))
        mlflow.log_dict(meta, MANIFEST)
        mlflow.log_params({"model.family": meta["family"], "model.files": len(files)})
        mlflow.log_metric("model/bytes", float(sum(f["bytes"] for f in files.values())))
    return {k: v for k, v in meta.items() if k != "files"} | {"num_files": len(files)}
