"""The work of each pipeline stage, with plain paths in and plain dicts out.

``components/`` wraps each function as a KFP component (artifacts -> paths); tests and the CLI call them
directly. Every stage logs into its own nested MLflow run under the pipeline's parent run.
"""

from flowgrpo_core.stages.common import PipelineContext

__all__ = ["PipelineContext"]
