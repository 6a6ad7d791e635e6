"""Drop-in trainers of RL libraries with this package's KL penalties (``kl_estimation.integrations.trl``)."""
