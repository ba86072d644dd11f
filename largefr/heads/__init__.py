"""Classification heads: the margin family and the sharded Partial FC head with its optimizers."""
from largefr.heads import margins
from largefr.heads.partial_fc import PartialFC
from largefr.heads.row_grad import SparseRowGrad
from largefr.heads.row_optim import RowSparseAdamW, RowSparseSGD, build_row_optimizer

__all__ = ["PartialFC", "SparseRowGrad", "RowSparseAdamW", "RowSparseSGD", "build_row_optimizer", "margins"]
