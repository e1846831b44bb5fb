"""nextchar.core: the NumPy character-level RNN — vocabulary, cells, training, sampling, model files."""

from nextchar.core.model import CharRNN, ModelConfig
from nextchar.core.vocab import UNK, Vocab

__all__ = ["UNK", "CharRNN", "ModelConfig", "Vocab"]
