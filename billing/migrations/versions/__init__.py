"""The ledger's revisions, oldest first (`0001_*` is the schema of ray-maas 0.1.0 before migrations)."""
