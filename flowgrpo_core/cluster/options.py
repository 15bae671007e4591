"""What a pipeline compiled for a cluster asks of it: GPUs, nodes, placement, a shared volume, secrets.

``ClusterOptions`` is chosen at compile time (``flowgrpo compile --gpus 8 --nodes 2 --pvc ...``). The
pipeline applies it to every task through kfp-kubernetes, and also hands it to every step as JSON in
``$FLOWGRPO_CLUSTER``, because the objects the steps create themselves (reward Deployments, the
PyTorchJob) need the same placement, volume and secrets. A step without that variable runs outside a
cluster-compiled pipeline (``flowgrpo run``), and then nothing in ``flowgrpo_core.cluster`` is used.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, fields

CLUSTER_ENV = "FLOWGRPO_CLUSTER"
DEFAULT_MOUNT_PATH = "/mnt/flowgrpo"
DEFAULT_ACCELERATOR = "nvidia.com/gpu"
EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")
_LABEL_KEY = re.compile(r"([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")


class ClusterOptionsError(ValueError):
    """Invalid cluster options; the message names the option."""


@dataclass(frozen=True)
class Toleration:
    """A pod toleration; an empty ``value`` tolerates the taint whatever its value (operator Exists)."""

    key: str
    effect: str = "NoSchedule"
    value: str = ""

    @classmethod
    def parse(cls, text: str) -> Toleration:
        """``KEY[=VALUE][:EFFECT]``, the syntax of ``kubectl taint`` (``nvidia.com/gpu:NoSchedule``)."""
        head, _, effect = text.partition(":")
        key, _, value = head.partition("=")
        return cls(key.strip(), effect.strip() or "NoSchedule", value.strip())

    def __post_init__(self) -> None:
        if not _LABEL_KEY.fullmatch(self.key):
            raise ClusterOptionsError(f"toleration key {self.key!r} is not a valid taint key")
        if self.effect not in EFFECTS:
            raise ClusterOptionsError(
                f"toleration effect {self.effect!r}: expected one of {', '.join(EFFECTS)}"
            )
        if not _LABEL_VALUE.fullmatch(self.value):
            raise ClusterOptionsError(f"toleration value {self.value!r} is not a valid taint value")

    @property
    def operator(self) -> str:
        return "Equal" if self.value else "Exists"

    def to_k8s(self) -> dict[str, str]:
        out = {"key": self.key, "operator": self.operator, "effect": self.effect}
        if self.value:
            out["value"] = self.value
        return out


@dataclass(frozen=True)
class SecretBinding:
    """Environment variable ``env`` of a container <- key ``key`` of Secret ``secret``."""

    env: str
    secret: str
    key: str
    optional: bool


# The keys each kind of Secret may hold; the convention is that a key is named after the variable it
# fills (`kubectl create secret generic s3-creds --from-literal=AWS_ACCESS_KEY_ID=...`). Required keys make
# a pod fail to start when missing (a typo'd secret is caught at once); optional ones may be left out.
SECRET_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "s3": (
        ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
        ("AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"),
    ),
    # basic auth or a bearer token, whichever the tracking server uses
    "mlflow": ((), ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")),
    # gated hub models (SD3.5, FLUX.1-dev)
    "hf": (("HF_TOKEN",), ()),
    # the bearer token of the reward servers, and of the UnifiedReward judge behind one of them
    "reward_token": (("FLOWGRPO_REWARD_TOKEN",), ()),
}
# variables filled from another key of the same secret (the judge and its client share one token)
SECRET_ALIASES = {"UNIFIEDREWARD_API_KEY": ("reward_token", "FLOWGRPO_REWARD_TOKEN")}


@dataclass(frozen=True)
class ClusterOptions:
    # GPUs of each model-running stage (calibrate, train, evaluate), and of each training node
    gpus: int = 0
    # training nodes; more than one runs training as a PyTorchJob of `nodes` pods (needs `pvc`)
    nodes: int = 1
    # the extended resource GPUs are requested as
    accelerator: str = DEFAULT_ACCELERATOR
    # node labels the GPU pods must match, e.g. (("cloud.google.com/gke-accelerator", "nvidia-h100-80gb"),)
    node_selector: tuple[tuple[str, str], ...] = ()
    # taints the GPU pods tolerate (GPU node pools are usually tainted nvidia.com/gpu:NoSchedule)
    tolerations: tuple[Toleration, ...] = ()
    # a ReadWriteMany PVC mounted by every step (and reward server, and training node) at `mount_path`:
    # the work folder (checkpoints, the shared policy) and the model caches live on it
    pvc: str = ""
    mount_path: str = DEFAULT_MOUNT_PATH
    # Secret names (SECRET_KEYS says which keys each may hold); empty: not used
    s3_secret: str = ""
    mlflow_secret: str = ""
    hf_secret: str = ""
    reward_token_secret: str = ""
    # image of the pipeline steps and training nodes; empty: components.images.TRAINER_IMAGE
    trainer_image: str = ""
    image_pull_secrets: tuple[str, ...] = ()
    # CPU and memory of each training node of a multi-node run
    worker_cpu: str = "8"
    worker_memory: str = "64Gi"
    # extra labels on every pod the steps create (cost attribution, policy engines)
    pod_labels: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        # JSON gives lists where the dataclass wants tuples; normalise so equality and hashing work
        object.__setattr__(self, "node_selector", tuple((str(k), str(v)) for k, v in self.node_selector))
        object.__setattr__(self, "pod_labels", tuple((str(k), str(v)) for k, v in self.pod_labels))
        object.__setattr__(
            self,
            "tolerations",
            tuple(t if isinstance(t, Toleration) else Toleration(**t) for t in self.tolerations),
        )
        object.__setattr__(self, "image_pull_secrets", tuple(self.image_pull_secrets))
        if self.gpus < 0:
            raise ClusterOptionsError(f"gpus: {self.gpus} must be >= 0")
        if self.nodes < 1:
            raise ClusterOptionsError(f"nodes: {self.nodes} must be >= 1")
        if self.nodes > 1 and not self.pvc:
            raise ClusterOptionsError(
                f"nodes: {self.nodes} training nodes share checkpoints and the trained policy through a "
                "ReadWriteMany volume: give its PersistentVolumeClaim with --pvc"
            )
        if not _LABEL_KEY.fullmatch(self.accelerator):
            raise ClusterOptionsError(f"accelerator: {self.accelerator!r} is not a resource name")
        for key, value in (*self.node_selector, *self.pod_labels):
            if not _LABEL_KEY.fullmatch(key) or not _LABEL_VALUE.fullmatch(value):
                raise ClusterOptionsError(f"label {key}={value}: not a valid Kubernetes label")
        for option in ("pvc", "s3_secret", "mlflow_secret", "hf_secret", "reward_token_secret"):
            value = getattr(self, option)
            if value and not _DNS_SUBDOMAIN.fullmatch(value):
                raise ClusterOptionsError(f"{option}: {value!r} is not a valid Kubernetes object name")
        for name in self.image_pull_secrets:
            if not _DNS_SUBDOMAIN.fullmatch(name):
                raise ClusterOptionsError(f"image pull secret {name!r} is not a valid Kubernetes object name")
        if not self.mount_path.startswith("/") or self.mount_path.rstrip("/") in ("", "/tmp"):
            raise ClusterOptionsError(
                f"mount_path: {self.mount_path!r} must be an absolute path other than / and /tmp"
            )
        for option in ("worker_cpu", "worker_memory"):
            if not _QUANTITY.fullmatch(getattr(self, option)):
                raise ClusterOptionsError(f"{option}: {getattr(self, option)!r} is not a Kubernetes quantity")

    @property
    def distributed_training(self) -> bool:
        """Training runs as a PyTorchJob (several nodes) instead of inside the pipeline step."""
        return self.nodes > 1

    def secret_bindings(self) -> list[SecretBinding]:
        """Every environment variable filled from a Secret, for pipeline steps and the pods they create."""
        names = {
            "s3": self.s3_secret,
            "mlflow": self.mlflow_secret,
            "hf": self.hf_secret,
            "reward_token": self.reward_token_secret,
        }
        out = []
        for kind, secret in names.items():
            if not secret:
                continue
            required, optional = SECRET_KEYS[kind]
            out += [SecretBinding(key, secret, key, False) for key in required]
            out += [SecretBinding(key, secret, key, True) for key in optional]
        for env, (kind, key) in SECRET_ALIASES.items():
            if names[kind]:
                out.append(SecretBinding(env, names[kind], key, False))
        return out

    def cache_env(self) -> dict[str, str]:
        """Model caches on the shared volume, so weights are downloaded once per cluster, not once per pod."""
        if not self.pvc:
            return {}
        root = self.mount_path.rstrip("/") + "/cache"
        return {"HF_HOME": f"{root}/huggingface", "FLOWGRPO_CACHE": f"{root}/flowgrpo"}

    def on_volume(self, path: str) -> bool:
        """Whether ``path`` lies on the shared volume (absolute, under the mount path)."""
        mount = self.mount_path.rstrip("/") + "/"
        return bool(self.pvc) and os.path.normpath(path).startswith(mount)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ClusterOptions:
        data = json.loads(text)
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:  # a step image older or newer than the compiler: say so rather than guess
            raise ClusterOptionsError(f"${CLUSTER_ENV} has unknown options {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_env(cls) -> ClusterOptions | None:
        """The options the pipeline was compiled with, or None outside a cluster-compiled pipeline."""
        text = os.environ.get(CLUSTER_ENV)
        return cls.from_json(text) if text else None


def parse_key_value(text: str, what: str) -> tuple[str, str]:
    """``KEY=VALUE`` from the command line."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ClusterOptionsError(f"{what} {text!r}: expected KEY=VALUE")
    return key.strip(), value.strip()
