"""How gradients become parameter updates: plain torch, or a DeepSpeed ZeRO-1/2/3 engine.

The trainer's loop only says "backward this loss" and "step"; a backend does the rest and reports whether the
step was applied (a non-finite gradient norm skips it, on every rank alike). Both use the same AdamW.

- :class:`TorchBackend`: gradients summed over ranks by hand before clipping (so every rank computes the same
  norm), fp16 loss scaling on CUDA.
- :class:`DeepSpeedBackend`: the engine reduces gradients inside backward (ZeRO-2) and clips and steps its
  partition of the optimiser state; it checkpoints that partition itself, from every rank. Under ZeRO-3 each
  rank also holds only a slice of every weight of the transformer (frozen base and trainable): a forward
  gathers a layer's weights just before it runs and frees them after. Whoever reads or writes whole weights
  outside a forward (EMA, checkpoints, export, resume) does it inside :meth:`DeepSpeedBackend.gathered`, on
  every rank at once.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from flowgrpo_core.distributed import DistributedContext


class TorchBackend:
    # a rank may make fewer backward calls than another: its gradients are summed explicitly in step()
    pads_backward_calls = False
    # the module training calls instead of the transformer (None: the transformer itself)
    training_wrapper = None
    # every rank holds whole weights
    partitions_parameters = False

    def __init__(
        self,
        parameters: list[torch.nn.Parameter],
        optimizer: torch.optim.Optimizer,
        dist: DistributedContext,
        max_grad_norm: float,
        fp16_scaling: bool,
        device: torch.device,
    ) -> None:
        self.parameters, self.optimizer, self.dist, self.max_grad_norm = (
            parameters,
            optimizer,
            dist,
            max_grad_norm,
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=fp16_scaling)

    def backward_calls(self, local: int) -> int:
        """How many backward calls this rank makes in an optimiser step that needs ``local`` of them."""
        return local

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> tuple[float, bool]:
        """All-reduce, clip and step; returns the gradient norm and whether the step was applied."""
        self.dist.all_reduce_grads(self.parameters)
        self.scaler.unscale_(self.optimizer)
        norm = float(torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm))
        if math.isfinite(norm):
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, math.isfinite(norm)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def close(self) -> None:
        """Release what the backend holds beyond the optimiser (nothing here)."""

    def load_state_dict(self, state: dict, checkpoint: Path) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])

    def save_partitions(self, checkpoint_dir: Path, epoch: int) -> bool:
        """Write what only this rank holds into the checkpoint's staging folder (every rank calls this);
        True when the checkpoint is then completed in that folder."""
        return False

    def gathered(
        self, parameters: Iterable[torch.nn.Parameter], modify: bool = False
    ) -> contextlib.AbstractContextManager:
        """Whole ``parameters`` readable (and, with ``modify``, writable) inside the block: they already are."""
        return contextlib.nullcontext()

    def snapshot(self, named: Mapping[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
        """The whole current values of ``named`` (every rank calls this); views of the live weights here."""
        return {name: p.detach() for name, p in named.items()}


class DeepSpeedBackend:
    # ZeRO-2 reduces gradients inside backward, in buckets matched across ranks: every rank must make the same
    # number of backward calls per optimiser step
    pads_backward_calls = True

    def __init__(
        self,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        dist: DistributedContext,
        stage: int,
        micro_batch: int,
        max_grad_norm: float,
        mixed_precision: str,
        device: torch.device,
        offload_optimizer: bool = False,
        offload_params: bool = False,
    ) -> None:
        """A ZeRO-1/2/3 engine around ``module`` with ``optimizer`` as its client optimiser (no DeepSpeed op
        has to be compiled for it, offloaded or not). Training calls the module through ``self.engine`` (its
        forward does bookkeeping its backward relies on)."""
        import deepspeed

        if not torch.distributed.is_initialized():
            # DeepSpeed needs a process group even alone; without a launcher, make a private one.
            for var, value in {
                "RANK": "0",
                "WORLD_SIZE": "1",
                "LOCAL_RANK": "0",
                "MASTER_ADDR": "127.0.0.1",
            }.items():
                os.environ.setdefault(var, value)
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            deepspeed.init_distributed(
                dist_backend="nccl" if device.type == "cuda" else "gloo", auto_mpi_discovery=False
            )
        zero: dict = {"stage": stage}
        if offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu"}
        if offload_params:
            zero["offload_param"] = {"device": "cpu"}
        config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": 1,  # steps are closed by hand (set_gradient_accumulation_boundary)
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,
            # the offloaded step runs our torch AdamW on the CPU copies: the same update as without offload
            # (DeepSpeedCPUAdam would be faster but is a compiled op with its own rounding)
            "zero_force_ds_cpu_optimizer": False,
            "gradient_clipping": max_grad_norm,
            "bf16": {"enabled": mixed_precision == "bf16"},
            "fp16": {"enabled": mixed_precision == "fp16"},
            "steps_per_print": 2**30,
        }
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=config
        )
        self.training_wrapper = self.engine
        self.dist = dist
        self.partitions_parameters = stage == 3
        # kept only so that checkpoints have the same keys whichever backend wrote them
        self.scaler = torch.amp.GradScaler(device.type, enabled=False)

    def backward_calls(self, local: int) -> int:
        return max(self.dist.all_gather_objects(local))

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last)
        # DeepSpeed averages gradients over ranks; our losses are already normalised globally, so undo it.
        self.engine.backward(loss * torch.distributed.get_world_size(), scale_wrt_gas=False)

    def step(self) -> tuple[float, bool]:
        """The engine clips and steps; in fp32 it skips a step whose global gradient norm is not finite, which
        ``was_step_applied`` reports."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else math.nan
        return norm, bool(self.engine.was_step_applied()) and math.isfinite(norm)

    def state_dict(self) -> dict:
        return {"optimizer": {}, "scaler": self.scaler.state_dict()}  # the engine keeps its own

    def close(self) -> None:
        """Remove the engine's hooks and stop its helpers (ZeRO-3's parameter coordinator, offload)."""
        self.engine.destroy()

    def load_state_dict(self, state: dict, checkpoint: Path) -> None:
        self.engine.load_checkpoint(
            str(checkpoint / "deepspeed"),
            tag="state",
            load_module_strict=False,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        self.scaler.load_state_dict(state["scaler"])

    def save_partitions(self, checkpoint_dir: Path, epoch: int) -> bool:
        """Every rank writes its optimiser partition into the same staging folder, which rank 0 made."""
        from flowgrpo_core.checkpoint import staging_dir

        if self.dist.is_main:
            staging_dir(checkpoint_dir, epoch)
        self.dist.barrier()
        staging = staging_dir(checkpoint_dir, epoch, fresh=False)
        self.engine.save_checkpoint(str(staging / "deepspeed"), tag="state", exclude_frozen_parameters=True)
        self.dist.barrier()
        return True

    def gathered(
        self, parameters: Iterable[torch.nn.Parameter], modify: bool = False
    ) -> contextlib.AbstractContextManager:
        """Under ZeRO-3, the whole ``parameters`` on every rank inside the block (a collective: every rank
        enters it). With ``modify``, rank 0's values are written back into every rank's partition when the
        block ends (all ranks must then write the same values); without, changes are discarded."""
        if not self.partitions_parameters:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(parameters), modifier_rank=0 if modify else None)

    def snapshot(self, named: Mapping[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
        if not self.partitions_parameters:
            return {name: p.detach() for name, p in named.items()}
        with self.gathered(named.values()):
            return {name: p.detach().clone() for name, p in named.items()}


def build_backend(
    train,
    transformer: torch.nn.Module,
    parameters: list[torch.nn.Parameter],
    dist: DistributedContext,
    device: torch.device,
    micro_batch: int,
) -> TorchBackend | DeepSpeedBackend:
    """AdamW over ``parameters`` (``train``: a config's ``train`` section) behind DeepSpeed when
    ``train.deepspeed_stage`` is set (offloaded as ``train.offload_*`` say), else plain torch. ``micro_batch``
    is the sampling batch size."""
    optimizer = torch.optim.AdamW(
        parameters,
        lr=train.learning_rate,
        betas=train.adam_betas,
        weight_decay=train.weight_decay,
        eps=train.adam_epsilon,
    )
    if train.deepspeed_stage:
        return DeepSpeedBackend(
            transformer,
            optimizer,
            dist,
            train.deepspeed_stage,
            micro_batch,
            train.max_grad_norm,
            train.mixed_precision,
            device,
            offload_optimizer=train.offload_optimizer,
            offload_params=train.offload_params,
        )
    return TorchBackend(
        parameters,
        optimizer,
        dist,
        train.max_grad_norm,
        fp16_scaling=train.mixed_precision == "fp16" and device.type == "cuda",
        device=device,
    )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
