"""Kubernetes for the pipeline's cluster half: what a compiled pipeline asks of the cluster, and the objects
its stages create there.

- ``options``: ``ClusterOptions`` (GPUs, nodes, PVC, secrets, placement), chosen at compile time and handed
  to every step in one environment variable.
- ``images``: the image each part runs in; every image has a recipe under ``images/``.
- ``reward_servers``: a Deployment + Service per reward (launch stage), deleted by run label (exit handler).
- ``trainjob``: a PyTorchJob (kubeflow.org/v1) for multi-node training, launched by the training stage.
- ``validation``: rendered manifests checked against the Kubernetes API models / the PyTorchJob schema.
- ``rbac``: the Role the pipeline's service account needs for all of the above.

Nothing here runs on ``flowgrpo run``: locally reward servers are child processes and training is in-process.
"""
