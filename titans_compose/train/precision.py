"""Mixed-precision training: ``fp32``, ``bf16`` or ``fp16`` activations through ``torch.autocast`` on the run's
device, the parameters and the optimizer staying float32.

``fp16`` scales the loss with a ``torch.amp.GradScaler`` (float16's 5 exponent bits underflow small gradients);
a step whose gradients overflow is skipped by the scaler, which lowers the scale. ``bf16`` has float32's exponent
range and needs no scaler. The memory op keeps its state and arithmetic in float32 under any of them
(:mod:`titans_compose.ops.memory.precision`).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

#: precision name -> autocast dtype (None: no autocast)
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class MixedPrecision:
    """The autocast context and, for ``fp16``, the gradient scaler of a run on ``device``."""

    def __init__(self, name: str, device: torch.device | str) -> None:
        if name not in PRECISIONS:
            raise ValueError(f"unknown precision {name!r}; choose one of {', '.join(PRECISIONS)}")
        self.name, self.dtype = name, PRECISIONS[name]
        self.device_type = torch.device(device).type
        self.scaler = torch.amp.GradScaler(self.device_type) if name == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Where the forward pass (and the loss) runs: autocast to the run's dtype, or nothing for fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate ``loss`` (scaled with fp16); gradients of several micro-batches add up."""
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the accumulated gradients by the fp16 scale (once per step, before clipping); a no-op otherwise."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer step (with fp16, skipped by the scaler if a gradient is not finite)."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        """The scaler's state for a checkpoint (JSON-serialisable; empty without a scaler)."""
        return {} if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
