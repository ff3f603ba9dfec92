"""Data-parallel training with torch.distributed: the process group from torchrun's environment, DDP or FSDP2
wrapping, each rank's rows of a step's batch, and the sums the ranks share.

Every rank takes its own contiguous rows of the step's global batch, drawn from the same deterministic source, so
``N`` ranks with ``B`` rows each see exactly the samples one process with ``N * B`` rows sees, in the same order. A
:class:`~titans_compose.train.data.RowSampler` (text windows, token files) reads only the rank's rows; another
source makes the whole batch, which is then cut.
Nothing here runs without ``torch.distributed``: one process is a world of size 1 and every helper is the identity.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import torch
import torch.distributed as dist

from titans_compose.train.data import Batch, RowSampler

Parallel = Literal["ddp", "fsdp"]


@dataclass(frozen=True)
class World:
    """This process's ``rank`` among ``size`` training processes (rank 0 of 1 without torch.distributed)."""

    rank: int = 0
    size: int = 1

    @property
    def writes(self) -> bool:
        """Whether this rank writes the run's files (metrics, checkpoints, the build): rank 0 only."""
        return self.rank == 0

    @classmethod
    def current(cls) -> World:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()


def launched_world_size() -> int:
    """The ``WORLD_SIZE`` torchrun set (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def join_launched_group(device: str | None) -> str | None:
    """Under torchrun with more than one process, join the process group its environment describes (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``...): nccl when training on CUDA, each rank on the GPU of its ``LOCAL_RANK``;
    gloo on the CPU. Returns the rank's device (``device`` itself without torchrun; None: the default)."""
    if launched_world_size() <= 1:
        return device
    where = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if where.type == "cuda":
        where = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(where)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if where.type == "cuda" else "gloo")
    return str(where)


def barrier() -> None:
    """Wait until every rank is here (nothing to wait for in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (after a barrier, so no rank exits while another still talks to it)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rows(batch: Batch, start: int, stop: int) -> Batch:
    """Rows ``start:stop`` of every per-row tensor of ``batch`` (tokens, masks, answers...), and the packed
    documents' boundaries (``cu_seqlens``, over the rows laid end to end) of those rows."""
    per_row = {
        f.name: value[start:stop]
        for f in fields(batch)
        if f.name != "cu_seqlens" and isinstance(value := getattr(batch, f.name), torch.Tensor) and value.dim() >= 1
    }
    if batch.cu_seqlens is not None:  # every row start is a boundary: keep those inside the rows, shifted to 0
        length = batch.tokens.shape[1]
        low, high = start * length, stop * length
        bounds = batch.cu_seqlens
        inside = bounds[(bounds > low) & (bounds < high)]
        ends = bounds.new_tensor([low, high])
        per_row["cu_seqlens"] = torch.cat([ends[:1], inside, ends[1:]]) - low
    return replace(batch, **per_row)


def micro_batch_rows(total: int, world: World, accumulate: int) -> tuple[int, int]:
    """Where this rank's rows of a global batch of ``total`` rows start, and how many each of its ``accumulate``
    micro-batches has. Raises ValueError if the rows do not split evenly."""
    parts = world.size * accumulate
    if total % parts:
        raise ValueError(f"a batch of {total} rows does not split into {world.size} ranks x {accumulate} micro-batches")
    size = total // parts
    return world.rank * accumulate * size, size


def micro_batches(batch: Batch, world: World, accumulate: int) -> list[Batch]:
    """This rank's share of a step's global ``batch``, as ``accumulate`` micro-batches of equal size. Raises
    ValueError if the rows do not split evenly."""
    first, size = micro_batch_rows(batch.tokens.shape[0], world, accumulate)
    return [rows(batch, first + i * size, first + (i + 1) * size) for i in range(accumulate)]


def step_batches(batches: Callable[[int], Batch], step: int, world: World, accumulate: int) -> list[Batch]:
    """This rank's micro-batches of step ``step`` (:func:`micro_batches`): a :class:`RowSampler` (text windows, token
    files) reads only this rank's rows; any other source makes the whole global batch, which is then cut."""
    if not isinstance(batches, RowSampler):
        return micro_batches(batches(step), world, accumulate)
    first, size = micro_batch_rows(batches.batch, world, accumulate)
    mine = batches(step, slice(first, first + accumulate * size))
    return [rows(mine, i * size, (i + 1) * size) for i in range(accumulate)]


def all_sum(value: torch.Tensor, world: World) -> torch.Tensor:
    """``value`` summed over the ranks (``value`` itself in one process)."""
    if world.size == 1:
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value


def wrap(model: torch.nn.Module, parallel: Parallel, world: World) -> torch.nn.Module:
    """``model`` made data-parallel over the ranks: DDP (replicated weights, gradients averaged) or FSDP2's
    ``fully_shard`` (the weights, gradients and optimizer state split over the ranks, gathered for each forward
    and backward). One process: the model itself."""
    if world.size == 1:
        return model
    if parallel == "ddp":
        on_cuda = next(model.parameters()).is_cuda
        device = [torch.cuda.current_device()] if on_cuda else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device)
    if parallel == "fsdp":
        return shard(model)
    raise ValueError(f"unknown parallel mode {parallel!r}: use 'ddp' or 'fsdp'")


class LayerBlock(torch.nn.Module):
    """One layer of a :class:`~titans_compose.nn.model.TitansLM` as a module: its nodes' modules as children and a
    forward that runs the layer (``run``, with ``_LayerProgram.run``'s signature). The model does not hold it, so
    the model's parameter names and state dict stay as they are; FSDP2 shards it as one unit."""

    def __init__(self, members: list[torch.nn.Module], run: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.run = run

    def forward(self, x: torch.Tensor, cur: dict[str, Any], position: int, checks: list[Any] | None) -> torch.Tensor:
        return self.run(x, cur, position, checks)


class Sharded(torch.nn.Module):
    """FSDP2's root: the model and its layer blocks as children, so that FSDP2 treats the blocks as inner units
    (each gathered for its own forward and backward, then sharded again). Calls go to the model."""

    def __init__(self, model: torch.nn.Module, blocks: list[LayerBlock]) -> None:
        super().__init__()
        self.model = model
        self.blocks = torch.nn.ModuleList(blocks)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` sharded over the ranks with FSDP2's ``fully_shard``: each layer as a unit (a titans_compose model,
    whose layers then run as :class:`LayerBlock` calls), and the root for the rest (embedding, head, final norm).
    Returns the module to call for training and evaluation; ``model``'s parameters become the ranks' shards."""
    from torch.distributed.fsdp import fully_shard

    layers = getattr(model, "layers", None)
    if layers is None or not hasattr(model, "layer_runners"):
        return fully_shard(model)
    runs = model.layer_runners or [program.run for program in layers]
    blocks = [LayerBlock(program.node_modules(), run) for program, run in zip(layers, runs, strict=True)]
    for block in blocks:
        fully_shard(block)
    model.layer_runners = list(blocks)
    # the model reaches the layers' modules through its own children too: the root leaves their parameters to the
    # blocks that shard them
    in_blocks = {p for block in blocks for p in block.parameters()}
    return fully_shard(Sharded(model, blocks), ignored_params=in_blocks)


@contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Within it, backward passes of ``model`` reduce the gradients over the ranks only if ``enabled``: the
    micro-batches before the last of an accumulated step skip the communication."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        model.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    yield


def full_tensor(value: Any) -> Any:
    """A sharded ``DTensor`` gathered into a plain tensor on every rank (a collective); anything else as it is."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def like(value: torch.Tensor, current: Any) -> torch.Tensor:
    """``value``, a full tensor that every rank holds, sharded like ``current`` when that is a ``DTensor``: each
    rank keeps its own shard, with no communication."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(current, DTensor) and tuple(value.shape) == tuple(current.shape):
        return distribute_tensor(value.to(current.device), current.device_mesh, current.placements, src_data_rank=None)
    return value
