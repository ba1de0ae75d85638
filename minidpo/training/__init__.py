"""The training loop every method shares: the step loop, checkpoints, distributed helpers, run folders and the
frontier log. Imports formats and the shared leaves."""
