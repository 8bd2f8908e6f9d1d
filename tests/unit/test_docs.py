"""The README stays a front door (at most 160 lines) and docs/api.md names every route the app serves."""

from __future__ import annotations

import re

from common.runtime import REPO_ROOT
from tests.unit.test_fine_tuning import Rig


def test_the_readme_is_a_front_door():
    lines = (REPO_ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 160, f"README.md has {len(lines)} lines: move detail into docs/"
    assert "docs/api.md" in "\n".join(lines)


def test_every_api_route_is_in_docs_api_md(tmp_path):
    documented = set(re.findall(r"/(?:v1|admin)/[A-Za-z0-9_{}/]+", (REPO_ROOT / "docs" / "api.md").read_text()))
    from deployments.openai.operations import OperationsService
    from tests.fakes import FakeFleet

    rig = Rig(tmp_path, operations=OperationsService(FakeFleet(), "m"))  # the app with every optional part mounted
    with rig.server:
        paths = {r.path for r in rig.server.app.router.routes if r.path.startswith(("/v1/", "/admin/"))}
    missing = sorted(p for p in paths if not any(p == d or p.startswith(d.rstrip("/") + "/") for d in documented))
    assert not missing, f"routes missing from docs/api.md: {missing}"
