"""Training building blocks: LR schedule, sharded checkpoints (DCP), loggers. Import the submodules."""
