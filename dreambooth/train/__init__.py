"""Training building blocks: optimizers, learning-rate schedules and the EMA of the weights."""
