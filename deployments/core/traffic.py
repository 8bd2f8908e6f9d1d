"""Which model versions serve a public model name, and with what share of traffic.

Decisions as data: `canary`, `promote` and `rollback` are pure functions from one
`TrafficPlan` to the next.  The live plan of an application is a small JSON file
in the model store (`<store>/.traffic/<app>/<model>.json`), replaced atomically
under a lock; ingress replicas re-read it when it changes, so a switch takes
effect within a poll interval without redeploying anything.  `pick_versions`
spreads requests by smooth weighted round-robin, so a 10% canary gets exactly
one request in ten from each replica.  Each version runs as its own Serve application,
named by `version_app_name`.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

from common.errors import EngineNotReadyError, InvalidRequestError


def version_app_name(app_name: str, model: str, version: str) -> str:
    """The Serve application that serves one store version of a model (its generator, and postprocessor when deployed)."""
    return f"{app_name}--{model}--{version}"


class TrafficError(InvalidRequestError):
    """A traffic change that cannot be made (e.g. promoting with no canary)."""


@dataclass(frozen=True)
class TrafficPlan:
    """The versions of one model an application serves."""

    model: str
    stable: str  # takes all traffic the canary does not
    canary: str | None = None
    canary_weight: int = 0  # percent of requests to the canary
    previous: str | None = None  # the stable version before the last promote: kept deployed for an instant rollback
    revision: int = 0
    action: str = "deploy"
    updated_by: str = ""
    updated_at: float = 0.0

    def weights(self) -> dict[str, int]:
        """Percent of requests per version (only versions that get any)."""
        if self.canary is None or self.canary_weight <= 0:
            return {self.stable: 100}
        if self.canary_weight >= 100:
            return {self.canary: 100}
        return {self.stable: 100 - self.canary_weight, self.canary: self.canary_weight}

    def deployed(self) -> list[str]:
        """Versions that must be running: those with traffic, and the rollback target."""
        out = [self.stable] + [v for v in (self.canary, self.previous) if v]
        return list(dict.fromkeys(out))

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(data: dict) -> "TrafficPlan":
        return TrafficPlan(**data)


def _next(plan: TrafficPlan, action: str, who: str, now: float, **changes) -> TrafficPlan:
    return replace(plan, revision=plan.revision + 1, action=action, updated_by=who, updated_at=now, **changes)


def canary(plan: TrafficPlan, version: str, weight: int, who: str = "", now: float = 0.0) -> TrafficPlan:
    """Send `weight`% of requests to `version`; the rest stay on the stable version.

    Starting a canary drops the previous rollback target: the fleet moves forward.
    """
    if not 0 < weight <= 100:
        raise TrafficError(f"Canary weight must be between 1 and 100, not {weight}.", param="weight")
    if version == plan.stable:
        raise TrafficError(f"{plan.model} {version} is already the stable version.", param="version")
    return _next(plan, "canary", who, now, canary=version, canary_weight=weight, previous=None)


def promote(plan: TrafficPlan, version: str | None = None, who: str = "", now: float = 0.0) -> TrafficPlan:
    """Make `version` (default: the canary) the stable version; the old stable stays up as the rollback target."""
    target = version or plan.canary
    if target is None:
        raise TrafficError(f"{plan.model} has no canary to promote; name a version.", param="version")
    if target == plan.stable:
        raise TrafficError(f"{plan.model} {target} is already the stable version.", param="version")
    return _next(plan, "promote", who, now, stable=target, canary=None, canary_weight=0, previous=plan.stable)


def rollback(plan: TrafficPlan, who: str = "", now: float = 0.0) -> TrafficPlan:
    """Undo the last step: stop a running canary, or else return to the version before the last promote."""
    if plan.canary is not None:
        return _next(plan, "rollback", who, now, canary=None, canary_weight=0)
    if plan.previous is not None:
        return _next(plan, "rollback", who, now, stable=plan.previous, previous=None)
    raise TrafficError(f"{plan.model} has nothing to roll back to (no canary, no previous version).")


def plan_change(action: str, version: str | None, weight: int | None, who: str) -> Callable[[TrafficPlan], TrafficPlan]:
    """The pure change an operator asks for by name (`canary` needs a version and a weight; `promote` may name a version)."""
    now = time.time()
    if action == "canary":
        if not version or weight is None:
            raise TrafficError("A canary needs a version and a weight.", param="version" if not version else "weight")
        return lambda p: canary(p, version, weight, who, now)
    if action == "promote":
        return lambda p: promote(p, version, who, now)
    if action == "rollback":
        return lambda p: rollback(p, who, now)
    raise TrafficError(f"Unknown traffic action `{action}`; use canary, promote or rollback.", param="action")


class SmoothWeightedPicker:
    """nginx's smooth weighted round-robin: over any 100 picks each version gets exactly its weight, interleaved."""

    def __init__(self, weights: dict[str, int]):
        self._weights = {v: w for v, w in weights.items() if w > 0}
        self._current = dict.fromkeys(self._weights, 0)
        self._total = sum(self._weights.values())

    def pick(self) -> str:
        for version, weight in self._weights.items():
            self._current[version] += weight
        best = max(self._current, key=self._current.__getitem__)
        self._current[best] -= self._total
        return best


@dataclass
class TrafficFile:
    """The live plan of one model in one application, as a JSON file in the model store."""

    store_root: Path
    app: str
    model: str
    clock: Callable[[], float] = field(default=time.time)

    @property
    def path(self) -> Path:
        return Path(self.store_root) / ".traffic" / self.app / f"{self.model}.json"

    def load(self) -> TrafficPlan | None:
        try:
            return TrafficPlan.from_json(json.loads(self.path.read_text()))
        except FileNotFoundError:
            return None

    def stamp(self) -> tuple[int, int] | None:
        """A cheap change marker (mtime, size) for pollers."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.parent / f".{self.model}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def write(self, plan: TrafficPlan) -> None:
        tmp = self.path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(plan.to_json(), indent=2))
        os.replace(tmp, self.path)  # readers see the old plan or the new one, never half of one

    def update(self, change: Callable[[TrafficPlan | None], TrafficPlan]) -> tuple[TrafficPlan | None, TrafficPlan]:
        """Apply `change` to the current plan under an exclusive lock; returns (before, after)."""
        with self._locked():
            before = self.load()
            after = change(before)
            self.write(after)
            return before, after


class TrafficFollower:
    """Picks a backend per request by the live plan, re-reading the plan file when it changes.

    `make_backend(version)` builds whatever serves a version (the ingress: Serve handles
    to its version application); backends are made once and reused.  No Ray here.
    """

    def __init__(self, file: TrafficFile, make_backend: Callable[[str], object], initial: TrafficPlan | None = None):
        self._file = file
        self._make = make_backend
        self._backends: dict[str, object] = {}
        self._stamp: tuple[int, int] | None = None
        self.plan: TrafficPlan | None = None
        self._picker: SmoothWeightedPicker | None = None
        if initial is not None:
            self._adopt(initial)
        self.refresh()

    def _adopt(self, plan: TrafficPlan) -> None:
        for version in plan.weights():
            if version not in self._backends:
                self._backends[version] = self._make(version)
        self.plan, self._picker = plan, SmoothWeightedPicker(plan.weights())

    def refresh(self) -> bool:
        """Adopt the file's plan if it changed since the last look; True when a new plan was adopted."""
        stamp = self._file.stamp()
        if stamp is None or stamp == self._stamp:
            return False
        plan = self._file.load()
        self._stamp = stamp
        if plan is None or plan == self.plan:
            return False
        self._adopt(plan)
        return True

    def pick(self):  # -> the backend object make_backend built
        if self._picker is None:
            raise EngineNotReadyError()
        return self._backends[self._picker.pick()]

    def serving(self, version: str):  # -> the backend of a deployed version (with traffic or the rollback target), else None
        if self.plan is None or version not in self.plan.deployed():
            return None
        if version not in self._backends:
            self._backends[version] = self._make(version)
        return self._backends[version]
