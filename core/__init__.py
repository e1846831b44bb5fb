"""nextchar.core: the NumPy character-level RNN: configs, vocabulary, cells, training, inference, model files.

This package imports nothing itself: ``nextchar.core.config`` (the configs, free of
NumPy) must stay importable by a client that has no NumPy installed.
"""
