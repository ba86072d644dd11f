"""Classification heads: the margin family and the sharded Partial FC head with its optimizers; the
global-batch pair/triplet losses and the class-sharded centre loss."""
from largefr.heads import margins
from largefr.heads.center import ShardedCenterLoss
from largefr.heads.metric import ContrastiveLoss, TripletLoss
from largefr.heads.partial_fc import PartialFC
from largefr.heads.row_grad import SparseRowGrad
from largefr.heads.row_optim import RowSparseAdamW, RowSparseSGD, build_row_optimizer

__all__ = ["ContrastiveLoss", "ShardedCenterLoss", "TripletLoss", "PartialFC", "SparseRowGrad", "RowSparseAdamW", "RowSparseSGD", "build_row_optimizer", "margins"]
