"""S3-compatible object storage through boto3 (AWS, MinIO, Ceph, moto...).

The endpoint comes from the argument, else ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``, else
``MLFLOW_S3_ENDPOINT_URL`` (which MLflow users already set); path-style addressing works with every
S3-compatible server.
"""

from __future__ import annotations

import os
from pathlib import Path


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")``."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an S3 URI: {uri!r} (expected s3://bucket/prefix)")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"S3 URI {uri!r} has no bucket")
    return bucket, prefix.strip("/")


def endpoint_from_env() -> str | None:
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
        if os.environ.get(var):
            return os.environ[var]
    return None


def s3_client(endpoint_url: str | None = None):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url or endpoint_from_env(),
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 5, "mode": "standard"},
            connect_timeout=10,
        ),
    )


def download_prefix(uri: str, destination: str | os.PathLike, endpoint_url: str | None = None) -> list[Path]:
    """Copy every object under ``uri`` into ``destination``, keeping relative paths. Returns the files."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = parse_s3_uri(uri)
    destination = Path(destination)
    client = s3_client(endpoint_url)
    files: list[Path] = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""
        ):
            for obj in page.get("Contents", []):
                relative = obj["Key"][len(prefix) :].lstrip("/") if prefix else obj["Key"]
                if not relative or relative.endswith("/"):
                    continue
                target = destination / relative
                if ".." in Path(relative).parts:
                    raise ValueError(f"refusing S3 key {obj['Key']!r}: it escapes the destination folder")
                target.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, obj["Key"], str(target))
                files.append(target)
    except (BotoCoreError, ClientError) as error:
        raise RuntimeError(f"cannot download {uri}: {error}") from error
    if not files:
        raise FileNotFoundError(f"no objects under {uri}")
    return files


def upload_folder(folder: str | os.PathLike, uri: str, endpoint_url: str | None = None) -> int:
    """Upload every file of ``folder`` under ``uri``. Returns the number of files."""
    bucket, prefix = parse_s3_uri(uri)
    client = s3_client(endpoint_url)
    count = 0
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            key = "/".join(filter(None, [prefix, path.relative_to(folder).as_posix()]))
            client.upload_file(str(path), bucket, key)
            count += 1
    return count
