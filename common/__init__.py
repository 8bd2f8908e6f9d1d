"""The ground floor of ray-maas: what every package shares and nothing of ours underneath.

Configuration (`config`), environment variables (`envs`), errors (`errors`), logging (`logs`), the
model store (`model_store`) and the local-cluster runtime basics (`runtime`: the repo root, the
loopback environment, ports).  `billing`, `training`, `deployments` and `cluster` import these;
modules here import none of those (a unit test reads every import and fails on a wrong direction).
"""
