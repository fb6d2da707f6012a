"""A command's whole job, one per module, callable from Python as from the CLI: each takes the command's
`Context` (and for a trained run, the `TrainedRun` that `trained.open_run` opened) and returns its result.

training (one run) · seeds (`train --seeds`) · evaluation (`eval`, the paper check) · ensemble · sweep ·
sync · perturb · reconstruct · visualize; `pictures` is where their images go.
"""
