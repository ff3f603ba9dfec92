"""PyTorch modules compiled from specs (imports torch)."""

from titans_compose.nn.memory import NeuralMemory, NeuralMemoryState
from titans_compose.nn.model import LMOutput, ModelState, TitansLM

__all__ = ["LMOutput", "ModelState", "NeuralMemory", "NeuralMemoryState", "TitansLM"]
