"""The repository root, on the ground floor's ground floor: `common.envs` and `common.runtime` both anchor paths at it."""

from __future__ import annotations

from pathlib import Path

# Ray ships the repository root as `working_dir`; relative paths in configs are anchored here.
REPO_ROOT = Path(__file__).resolve().parent.parent
