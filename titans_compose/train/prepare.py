"""Getting a model ready for a training step: activation checkpointing per layer, data parallelism over the ranks
(:mod:`titans_compose.train.distributed`) and ``torch.compile``, in that order."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from titans_compose.train.distributed import Parallel, World, wrap


def _checkpointed(program: Any) -> Any:
    """``program.run`` that keeps only its input for the backward pass and runs the layer again there, trading a
    second forward of the layer for its activations' memory. Without gradients it is ``program.run`` itself."""

    def run(x: torch.Tensor, cur: dict[str, Any], position: int, checks: list[Any] | None) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return program.run(x, cur, position, checks)

        before = dict(cur)  # the recomputation in the backward pass starts from these states, not the updated ones

        def body(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any], list[Any] | None]:
            # the state updates and checks are returned, not written to the caller's dictionary and list: the
            # recomputation must leave those alone
            states, found = dict(before), None if checks is None else []
            return program.run(x, states, position, found), states, found

        out, states, found = checkpoint(body, x, use_reentrant=False)
        cur.update(states)
        if checks is not None:
            checks.extend(found)
        return out

    return run


def checkpoint_layers(model: torch.nn.Module) -> None:
    """Run each layer of ``model`` (a :class:`~titans_compose.nn.model.TitansLM`) under activation checkpointing.
    Raises ValueError for a model without layer programs."""
    if not hasattr(model, "layer_runners") or not hasattr(model, "layers"):
        raise ValueError(
            f"activation checkpointing runs each layer of a titans_compose model again; a {type(model).__name__} "
            "has no layers to run"
        )
    model.layer_runners = [_checkpointed(program) for program in model.layers]


def prepare(
    model: torch.nn.Module,
    *,
    world: World,
    parallel: Parallel = "ddp",
    activation_checkpointing: bool = False,
    compile: bool = False,
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The module a training step calls and the one evaluation calls: ``model`` with its layers checkpointed, made
    data-parallel when there is more than one rank (FSDP2 shards ``model``'s parameters in place), and, for the
    step, compiled. Evaluation calls the model itself, except under FSDP2, whose root gathers the weights for any
    forward. Optimizers and checkpoints use ``model``."""
    if activation_checkpointing:
        checkpoint_layers(model)
    parallel_model = wrap(model, parallel, world)
    evaluated = model if isinstance(parallel_model, torch.nn.parallel.DistributedDataParallel) else parallel_model
    return (torch.compile(parallel_model) if compile else parallel_model), evaluated
