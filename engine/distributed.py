"""Distribution, applied from outside the model code: `torchrun --nproc_per_node N -m engine.train ...` with
`run.distributed = "ddp" | "fsdp2"`. torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; the process group is gloo
on CPU and NCCL on GPUs (one GPU per rank, cuda:LOCAL_RANK).

- DDP wraps the model (torch.nn.parallel.DistributedDataParallel); FSDP2 shards it with `fully_shard`, every
  encoder layer first, then the root, with a bf16 / fp32-reduce mixed precision policy on GPUs.
- `run.batch_size`-style settings stay global: every rank draws the same global batch and takes its own
  slice (`local_part`); gradients are normalised by the global number of loss terms (tokens or examples,
  summed over micro-batches and ranks: `global_count`), so 2 ranks x b give the gradient of 1 rank x 2b.
- Rank 0 alone writes logs, predictions and results (`is_main`) and evaluates, on the plain model (under FSDP2
  the trained weights are gathered into it first), so the scores are the 1-process ones; the other ranks wait
  at a barrier meanwhile, for up to `run.collective_timeout_min`.
"""
from __future__ import annotations

import gc
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

MODES = ("none", "ddp", "fsdp2")


@dataclass(frozen=True)
class Dist:
    mode: str = "none"
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_CURRENT = Dist()


def current() -> Dist:
    return _CURRENT


def launched_world() -> int:
    """The world size torchrun launched this process in (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(mode: str, device_type: str, timeout_min: int = 240) -> Dist:
    """Join the process group torchrun prepared (once); mode "none" with one process is a no-op. `timeout_min`:
    how long a collective may wait (rank 0 evaluates while the others wait at a barrier)."""
    global _CURRENT
    world = launched_world()
    if world > 1 and mode == "none":  # every process would act as rank 0 and write the same files
        from .config import ConfigError  # engine.config imports this module's users: import it here
        raise ConfigError(f"run.distributed 'none' under torchrun (WORLD_SIZE={world}): use ddp or fsdp2, or "
                          "launch one process")
    if world == 1:
        _CURRENT = Dist()
        return _CURRENT
    if not dist.is_initialized():
        # torch.distributed.nn's functions take `group=group.WORLD` as a default argument, bound at import: imported
        # after init (DDP imports it) they hold the process group forever, so destroy_process_group cannot free it
        # and gloo's worker threads outlive shutdown(); a worker still releasing a finished collective's tensors
        # when the interpreter exits needs the GIL and aborts the rank ("terminate called without an active
        # exception", seen in CI). Imported first, those defaults are None. tests/engine/dist_train.py (run by
        # tests/engine/test_distributed.py) checks that shutdown() leaves no thread behind.
        import torch.distributed.nn  # noqa: F401
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_min))
    _CURRENT = Dist(mode, dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return _CURRENT


def device_for(d: Dist, device: torch.device) -> torch.device:
    return torch.device("cuda", d.local_rank) if device.type == "cuda" and d.active else device


def wrap(model: torch.nn.Module, d: Dist, bf16: bool) -> torch.nn.Module:
    """The module to train: `model` itself (one process), DDP around it, or `model` sharded in place (FSDP2)."""
    if not d.active:
        return model
    if d.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=True)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device_type = next(model.parameters()).device.type
    on_gpu = device_type == "cuda"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if (bf16 and on_gpu) else None,
                                  reduce_dtype=torch.float32 if on_gpu else None)
    mesh = init_device_mesh(device_type, (d.world,))
    _MESHES.append(mesh)
    encoder = getattr(model, "encoder", model)
    for layer in encoder.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


# FSDP2's device meshes: each holds the process group in its registry and outlives the model (DTensor's sharding
# caches keep it), so shutdown() empties them (see there)
_MESHES: list = []


@contextmanager
def gradient_sync(trained: torch.nn.Module, last: bool):
    """Gradients are reduced over ranks on the last micro-batch of a step only (DDP's no_sync, FSDP2's
    set_requires_gradient_sync)."""
    if hasattr(trained, "no_sync") and not last:
        with trained.no_sync():
            yield
        return
    if hasattr(trained, "set_requires_gradient_sync"):
        trained.set_requires_gradient_sync(last)
    yield


@contextmanager
def full_params(model: torch.nn.Module):
    """Evaluation of an FSDP2-sharded model: its parameters gathered whole on every rank for the duration (any
    submodule may then be called on its own, e.g. the encoder for retrieval); a no-op otherwise."""
    sharded = [m for m in model.modules() if hasattr(m, "unshard") and hasattr(m, "reshard")]
    for m in sharded:
        m.unshard()
    try:
        yield
    finally:
        for m in sharded:
            m.reshard()


def local_part(items: list, d: Dist) -> list:
    """This rank's share of a global batch's items (strided, so that length-sorted batches stay balanced)."""
    return items[d.rank::d.world] if d.active else items


def all_sum(x: torch.Tensor) -> torch.Tensor:
    if current().active:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_min(x: torch.Tensor) -> torch.Tensor:
    if current().active:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.MIN)
    return x


def barrier() -> None:
    if current().active:
        dist.barrier()


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not current().active:
        return [obj]
    out = [None] * current().world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if not current().active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----- state dicts and checkpoints of sharded (FSDP2) models: torch.distributed.checkpoint ---------------------
def full_model_state(module: torch.nn.Module) -> dict:
    """The module's weights as plain tensors, gathered whole on every rank (FSDP2), or its own state dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))


def save_sharded(module: torch.nn.Module, opt, folder: Path) -> str:
    """Every rank writes its shards of the model and optimizer state with torch.distributed.checkpoint, into a
    temporary folder that rank 0 renames to `folder` when all are done (readable at any world size)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    tmp = folder.with_name(f".{folder.name}.tmp")
    if current().is_main and tmp.exists():
        shutil.rmtree(tmp)
    barrier()
    dcp.save({"model": get_model_state_dict(module), "optim": get_optimizer_state_dict(module, opt)},
             checkpoint_id=str(tmp))
    barrier()
    if current().is_main:
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    barrier()
    return folder.name


def load_sharded(module: torch.nn.Module, opt, folder: Path) -> None:
    """A torch.distributed.checkpoint folder into the module and optimizer, sharded (FSDP2, any world size) or
    plain (one process or DDP)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    state = {"model": get_model_state_dict(module), "optim": get_optimizer_state_dict(module, opt)}
    dcp.load(state, checkpoint_id=str(folder), no_dist=not current().active)
    set_model_state_dict(module, state["model"])
    set_optimizer_state_dict(module, opt, state["optim"])


def shutdown() -> None:
    global _CURRENT
    if dist.is_initialized():
        # destroy_process_group must drop the last reference to the group, so that the backend joins its threads
        # now and not while the interpreter exits (see setup). Other holders: FSDP2's device meshes, and a DDP
        # wrapper left in a reference cycle (collected here).
        _drop_group_holders()
        dist.barrier()  # every rank reaches the end before any tears its connections down
        dist.destroy_process_group()
    _CURRENT = Dist()


def _drop_group_holders() -> None:
    for mesh in _MESHES:
        getattr(mesh, "_pg_registry", {}).clear()
    _MESHES.clear()
    gc.collect()


def abandon() -> None:
    """Close the process group where shutdown() did not (a run that failed): no barrier, the peers may be
    gone or failing too."""
    global _CURRENT
    if dist.is_initialized():
        dist.destroy_process_group()
    _CURRENT = Dist()
