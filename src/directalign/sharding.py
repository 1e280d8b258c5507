"""Fully sharded data parallelism (torch's FSDP2, ``fully_shard``) through Lightning's
``ModelParallelStrategy``: ``trainer=fsdp`` on GPUs, ``trainer=fsdp_cpu`` on CPU ranks over gloo.

Every rank holds a shard of each parameter, gradient and optimiser state; a decoder layer gathers its
weights for its forward and backward only. Lightning's older ``FSDPStrategy`` (FSDP1) refuses a CPU
accelerator, which left the sharded path untestable without a GPU; FSDP2 runs on a CPU device mesh.
"""

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from transformers import PreTrainedModel

from directalign.errors import ConfigError

log = logging.getLogger(__name__)

# trainer.precision -> the dtype the sharded layers compute in (master weights, optimiser state and the
# gradient reduction stay float32).
PARAM_DTYPES = {"32-true": None, "bf16-mixed": torch.bfloat16}
# What Lightning itself gets: FSDP2 casts per layer, so Lightning's autocast stays off.
LIGHTNING_PRECISION = "32-true"


class FullyShardedStrategy(ModelParallelStrategy):
    """Data parallelism over every rank with each model sharded per decoder layer (``shard``).

    ``precision`` is ``trainer.precision``: ``bf16-mixed`` becomes FSDP2's ``MixedPrecisionPolicy``
    (layers compute in bf16, gradients are reduced in float32). ``layer_classes`` names module classes
    to shard on their own besides those a transformers model declares in ``_no_split_modules`` (its
    decoder layers; BERT declares none). Checkpoints are sharded (one file per rank) and replace the
    previous one only once complete, so a run killed while saving resumes from the last whole one.
    """

    def __init__(self, precision: str, layer_classes: Sequence[str] = (), **kwargs: Any):
        if precision not in PARAM_DTYPES:
            raise ConfigError(
                f"trainer.precision={precision} under trainer=fsdp: use one of {', '.join(PARAM_DTYPES)}"
            )
        super().__init__(tensor_parallel_size=1, save_distributed_checkpoint=True, **kwargs)
        param_dtype = PARAM_DTYPES[precision]
        self.mixed_precision = MixedPrecisionPolicy(
            param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None
        )
        self.layer_classes = set(layer_classes)

    def setup_environment(self) -> None:
        # Every rank is one data-parallel replica (Lightning's default splits nodes and devices into
        # data- and tensor-parallel dimensions).
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def shard(self, model: torch.nn.Module) -> None:
        """``fully_shard`` each decoder layer, then the whole model (embeddings, head, norms); the
        outputs of the whole model come back in float32 under mixed precision."""
        if isinstance(model, FSDPModule):
            return
        mesh = self.device_mesh["data_parallel"]
        names = self.layer_classes | {
            name
            for module in model.modules()
            if isinstance(module, PreTrainedModel)
            for name in module._no_split_modules or ()
        }
        layers = [module for module in model.modules() if type(module).__name__ in names]
        if not layers:
            log.warning("fsdp: no layer of %s among %s: the model is one sharded unit", type(model), names)
        for layer in layers:
            fully_shard(layer, mesh=mesh, mp_policy=self.mixed_precision)
        policy = self.mixed_precision
        if policy.param_dtype is not None:
            policy = MixedPrecisionPolicy(policy.param_dtype, policy.reduce_dtype, output_dtype=torch.float32)
        fully_shard(model, mesh=mesh, mp_policy=policy)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """Write into ``<path>.partial`` and move it onto ``path`` once every rank wrote its shard: the
        parent class writes into ``path`` itself, where a kill mid-save would mix two checkpoints."""
        path = Path(self.broadcast(str(filepath)))
        partial = path.with_name(path.name + ".partial")
        if self.global_rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        self.barrier()
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier()
        if self.global_rank == 0:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
            partial.rename(path)


def is_sharded(strategy: Strategy) -> bool:
    return isinstance(strategy, FullyShardedStrategy)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The sharded ``model``'s whole state dict, gathered on rank 0 in CPU memory (empty on the other
    ranks). Every rank must call it: each contributes its shards."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
