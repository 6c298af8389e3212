"""fusefs-fsx: xfstests-style fsx for fusefs (and any other directory).

`tools.fsx.cli` is the command; `tools.fsx.model` the pure part (data, ops,
model, generator, minimizer); `tools.fsx.target` the syscalls, fallocate
backends and control directory; `tools.fsx.procs` the ``--procs`` runs.
``python -m tools.fsx`` runs the command.
"""
