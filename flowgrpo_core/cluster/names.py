"""Kubernetes names and labels for the objects one pipeline run creates.

Names must be DNS-1035 labels (Services: lower-case alphanumerics and '-', a letter first, at most 63
characters); label values at most 63 characters. KFP run ids are UUIDs, but nothing guarantees it, so both
are derived defensively: a readable prefix plus a short hash of the full run id, which keeps two runs apart
even when their sanitised ids would collide.
"""

from __future__ import annotations

import hashlib
import re

# Every object a run creates carries these labels, so the exit handler deletes them with one selector.
PART_OF_LABEL = "app.kubernetes.io/part-of"
COMPONENT_LABEL = "app.kubernetes.io/component"
RUN_LABEL = "flowgrpo/run"
REWARD_LABEL = "flowgrpo/reward"
PART_OF = "flowgrpo"
# the raw KFP run id (annotations have no length or character limits)
RUN_ID_ANNOTATION = "flowgrpo/kfp-run-id"

_MAX = 63


def short_hash(text: str, length: int = 8) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:length]


def dns_label(text: str, max_length: int = _MAX) -> str:
    """``text`` as a DNS-1035 label: lower case, '-' for anything else, a letter first, no '-' at the end."""
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    if not label or not label[0].isalpha():
        label = "x-" + label
    return label[:max_length].rstrip("-")


def run_label(run_id: str) -> str:
    """The value of RUN_LABEL for ``run_id``: the id itself when it is a valid label value, else a hash."""
    if re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?", run_id):
        return run_id
    return "h-" + short_hash(run_id, 16)


def object_name(kind: str, run_id: str, max_length: int = 52) -> str:
    """``flowgrpo-<kind>-<hash of run id>``; 52 characters at most so that controllers can append their
    own suffixes (a Deployment's ReplicaSets and pods, a PyTorchJob's ``-master-0``) within 63."""
    suffix = short_hash(run_id)
    head = dns_label(f"flowgrpo-{kind}", max_length - len(suffix) - 1)
    return f"{head}-{suffix}"


def run_selector(run_id: str) -> str:
    """The label selector of everything ``run_id`` created."""
    return f"{PART_OF_LABEL}={PART_OF},{RUN_LABEL}={run_label(run_id)}"


def run_labels(run_id: str, component: str) -> dict[str, str]:
    return {PART_OF_LABEL: PART_OF, COMPONENT_LABEL: component, RUN_LABEL: run_label(run_id)}
