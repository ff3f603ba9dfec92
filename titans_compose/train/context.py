"""Context parallelism in training: the ranks form context groups, and each rank of a group takes its piece of the
group's rows.

``N`` consecutive ranks form a context group (rank = data rank x N + context rank). The groups are the data-parallel
ranks: each takes its rows of the global batch (:func:`~titans_compose.train.distributed.micro_batches`), and each
rank of a group its contiguous 1/N of every one of those rows' tokens (:func:`sequence_piece`). The model, split
over the group (:meth:`~titans_compose.nn.model.TitansLM.split_sequence`), exchanges what its sequence mixers need.
Every rank's gradients are its share of the step's: DDP or FSDP2 over all the ranks average them and the loop scales
each rank's loss by the number of ranks, so the step is the one a single process takes on the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.distributed as dist

from titans_compose.nn.context import ContextGroup
from titans_compose.train.data import Batch
from titans_compose.train.distributed import World


def check_processes(processes: int, size: int) -> None:
    """Raise ValueError unless ``processes`` split into groups of ``size`` context-parallel ranks."""
    if size < 1 or processes % size:
        raise ValueError(
            f"context parallelism over {size} ranks needs a multiple of {size} processes (torchrun "
            f"--nproc_per_node); there are {processes}"
        )


def split_world(world: World, size: int) -> tuple[World, ContextGroup | None]:
    """The data-parallel world (context groups as its ranks) and this rank's context group (None for ``size`` 1),
    for ``size`` ranks per sequence. Every rank must call it: it creates the groups' process groups. Raises
    ValueError if ``size`` does not divide the number of ranks."""
    check_processes(world.size, size)
    if size == 1:
        return world, None
    group, _ = dist.new_subgroups(group_size=size)
    return World(world.rank // size, world.size // size), ContextGroup(group, world.rank % size, size)


@dataclass(frozen=True)
class Piece:
    """What one rank scores of a batch: ``batch`` holds the targets of its logits, ``inputs`` the tokens its model
    takes (None: the batch's own, packed documents included)."""

    batch: Batch
    inputs: torch.Tensor | None = None


def sequence_piece(batch: Batch, context: ContextGroup | None) -> Piece:
    """This context rank's piece of ``batch`` (the whole batch when ``context`` is None). The model takes the
    rank's contiguous 1/N of every row's tokens; the piece's batch has those columns and the next rank's first,
    the target of the piece's last logit (the last rank has none), so the ranks' targets are exactly the batch's
    and their counts add up to its count. Raises ValueError for packed documents or a length that does not split
    into N equal pieces."""
    if context is None:
        return Piece(batch)
    if batch.cu_seqlens is not None:
        raise ValueError("context parallelism splits whole streams: packed documents (cu_seqlens) are not supported")
    length = batch.tokens.shape[1]
    if length % context.size:
        raise ValueError(f"a sequence of {length} tokens does not split into {context.size} equal pieces")
    size = length // context.size
    start = context.rank * size
    columns = {
        f.name: value[:, start : start + size + 1]
        for f in fields(batch)
        if isinstance(value := getattr(batch, f.name), torch.Tensor) and value.dim() >= 2
    }
    return Piece(replace(batch, **columns), batch.tokens[:, start : start + size])
