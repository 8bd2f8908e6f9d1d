"""Cluster-level pieces of ray-maas: configuration, environment, the model store and the `maas` CLI."""
