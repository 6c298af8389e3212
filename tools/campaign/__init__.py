"""fusefs-campaign: fault-injection campaigns and simulated power cuts.

`tools.campaign.cli` is the command; `run` one run of a campaign, `mount` the
image and mount it runs on, `workloads`, `meta` and `fsx` the workloads,
`report` the outcome matrix, `plan` the run list and its expected costs (what
``--shard`` splits), `merge` the folding of shards' reports.
``python -m tools.campaign`` runs the command.
"""
