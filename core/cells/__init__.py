"""Recurrent cells, one object per cell, each in its own file with its forward and backward side by side.

A cell advances a batch of states one step (``step``, inference), runs T steps
keeping what BPTT needs (``forward``), and turns dL/dh back into gradients
(``backward``). Conventions shared by every cell live in ``base``. Adding a cell
is one file here, its name in ``nextchar.core.config.CELLS``, and its gradient
check in tests/test_gradients.py.
"""

from __future__ import annotations

from nextchar.core.cells.base import Cell, LayerCache, Product, gate_blocks, rowwise, sigmoid, together
from nextchar.core.cells.gru import GRU
from nextchar.core.cells.lstm import LSTM
from nextchar.core.cells.rnn import RNN
from nextchar.core.config import CELLS as CELL_NAMES

CELLS: dict[str, Cell] = {cell.name: cell for cell in (RNN(), GRU(), LSTM())}
assert tuple(CELLS) == CELL_NAMES, "nextchar.core.config.CELLS must name exactly the cells defined here"

__all__ = ["CELLS", "Cell", "LayerCache", "Product", "gate_blocks", "rowwise", "sigmoid", "together"]
