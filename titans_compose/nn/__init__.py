"""PyTorch modules compiled from specs (imports torch)."""

from titans_compose.nn.memory import NeuralMemory, NeuralMemoryState

__all__ = ["NeuralMemory", "NeuralMemoryState"]
