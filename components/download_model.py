"""download_model: the base model as a diffusers folder with a sha256 manifest."""

from kfp import dsl
from kfp.dsl import Model, Output

from components.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def download_model(
    preset: str,
    overrides: list,
    model_source: str,
    model_revision: str,
    tracking_uri: str,
    experiment: str,
    workdir: str,
    run_id: str,
    kfp_run_id: str,
    model: Output[Model],
) -> str:
    """Copy or build the base model into a diffusers folder with a sha256 manifest; returns its family (sd3, flux, qwenimage)."""
    from flowgrpo_core.stages import PipelineContext
    from flowgrpo_core.stages.download import download_model as run

    ctx = PipelineContext.from_arguments(locals())
    meta = run(ctx, model.path)
    model.metadata.update(
        {
            "family": meta["family"],
            "source": meta["source"],
            "revision": meta["revision"],
            "files": meta["num_files"],
        }
    )
    return meta["family"]
