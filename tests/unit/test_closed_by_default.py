"""Closed by default, the newer routes too (issue 24): one test per finding of the hostile-tenant review.

Each runs the real routes, services, billing core and fine-tuning manager over in-process fakes of the
stages and of Ray's Jobs API (`tests.unit.test_fine_tuning.Rig`), most of them under a route prefix, as
Serve mounts an application with `route_prefix` set.
"""

from __future__ import annotations

import httpx
import pytest

from deployments.openai.routes import Access, route_declaration
from tests.unit.test_fine_tuning import GOOD, Rig, _upload
from tests.unit.test_probe import _envelope as _error

PREFIX = "/maas"


@pytest.fixture
def rig(tmp_path):
    from deployments.openai.operations import OperationsService
    from tests.fakes import FakeFleet

    r = Rig(tmp_path, prefix=PREFIX, operations=OperationsService(FakeFleet(), "m"))
    with r.server:
        yield r


def test_every_route_declares_who_may_call_it(tmp_path):
    """Item 1: the app with every optional part mounted; a route added without a declaration fails here."""
    rig = Rig(tmp_path)
    with rig.server:
        app = rig.server.app
        undeclared = [f"{sorted(getattr(r, 'methods', None) or [])} {r.path}" for r in app.router.routes if route_declaration(r) is None]
        assert not undeclared, f"routes without an access declaration: {undeclared}"
        by_path = {(r.path, m): route_declaration(r)["x-maas-access"] for r in app.router.routes for m in (getattr(r, "methods", None) or ())}
        assert by_path[("/healthz", "GET")] == Access.PUBLIC
        assert by_path[("/v1/files", "POST")] == by_path[("/v1/fine_tuning/jobs", "POST")] == Access.TENANT
        assert all(v == Access.ADMIN for (path, _), v in by_path.items() if path.startswith("/admin"))
        assert {p for (p, _), v in by_path.items() if v == Access.PUBLIC} <= {"/healthz", "/console", "/console/", "/console/{name}", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


def test_a_route_prefix_does_not_turn_authentication_off(rig):
    """Item 1: under `route_prefix: /maas`, Serve keeps the whole path; the admin and tenant routes still need their keys."""
    base = rig.server.base
    for method, path in [("GET", "/admin/keys"), ("POST", "/admin/traffic"), ("GET", "/admin/fine_tuning/jobs"), ("GET", "/v1/files"), ("POST", "/v1/completions"), ("POST", "/v1/keys")]:
        resp = httpx.request(method, base + path, json={}, timeout=10)
        assert resp.status_code == 401, (method, path, resp.status_code, resp.text)
        assert resp.json()["error"]["code"] is not None
    tenant = {"Authorization": f"Bearer {rig.server.key}"}
    assert httpx.get(base + "/admin/keys", headers=tenant).status_code == 403
    assert httpx.get(base + "/v1/files", headers=tenant).status_code == 200
    assert httpx.get(base + "/healthz").status_code == 200
    assert httpx.post(base + "/nowhere", content=b"x" * 10_000_000).status_code == 404  # no route: 404, the body unread
    assert httpx.get(base + "/nowhere", headers=tenant).status_code == 404


def _post(rig, path: str, key: str, **kwargs) -> httpx.Response:
    return httpx.post(rig.server.base + path, headers={"Authorization": f"Bearer {key}"}, timeout=30, **kwargs)


def test_deleting_a_file_a_job_uses_changes_nothing_and_a_job_that_cannot_start_fails_alone(rig):
    """Item 2: the job trains on its own pinned copy; a job whose start breaks fails with a readable reason, and the queue goes on."""
    acme = rig.client(rig.server.key)
    globex = rig.client(rig.server.core.create_key("globex")[0])
    rig.cluster.free = 0.0  # both wait in the queue
    first = acme.fine_tuning.jobs.create(model="m", training_file=(f := _upload(acme)))
    acme.files.delete(f)  # allowed: the job has its copy
    broken = globex.fine_tuning.jobs.create(model="m", training_file=_upload(globex))
    (rig.store / ".fine_tunes" / broken.id / "data" / "training.jsonl").unlink()  # its data gone: its start cannot even be written
    for upload in globex.files.list().data:
        globex.files.delete(upload.id)
    third = rig.client(rig.server.core.create_key("initech")[0])
    queued_behind = third.fine_tuning.jobs.create(model="m", training_file=_upload(third))
    rig.cluster.free = 8.0
    rig.manager.tick()
    assert acme.fine_tuning.jobs.retrieve(first.id).status == "running"  # on its pinned copy
    failed = globex.fine_tuning.jobs.retrieve(broken.id)
    assert failed.status == "failed" and failed.error.code == "job_start_failed" and "store" not in failed.error.message
    rig.manager.tick()
    assert third.fine_tuning.jobs.retrieve(queued_behind.id).status == "running"  # the queue went on


def test_the_dataset_is_pinned_before_training_and_a_failed_job_bills_what_it_trained(rig, tmp_path):
    """Item 3: the checksum is taken when the job is created and checked before training; failing late is not free."""
    import yaml

    from training.config import load_train_config
    from training.finetune import run

    acme = rig.client(rig.server.key)
    job = acme.fine_tuning.jobs.create(model="m", training_file=_upload(acme))
    rig.manager.tick()
    ray_id = next(iter(rig.cluster.submitted))
    cfg = yaml.safe_load(open(rig.cluster.submitted[ray_id]))
    assert len(cfg["data"]["sha256"]) == 64 and cfg["data"]["path"].endswith(f"{job.id}/data/training.jsonl")
    changed = tmp_path / "train.yaml"
    cfg["data"]["path"] = str(tmp_path / "swapped.jsonl")
    (tmp_path / "swapped.jsonl").write_bytes(GOOD + GOOD)
    changed.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="changed after the job was created"):
        run(load_train_config(str(changed), {}))
    rig.cluster.train(ray_id, steps=3, tokens_per_step=100, finish=False)
    rig.cluster.states[ray_id] = ("FAILED", "Traceback (most recent call last): File /srv/secret/path.py ... RuntimeError: boom")
    rig.manager.tick()
    failed = acme.fine_tuning.jobs.retrieve(job.id)
    assert failed.status == "failed" and failed.trained_tokens == 300
    assert "Traceback" not in failed.error.message and "/srv/secret" not in failed.error.message  # item 12: Ray's log is the operator's
    (row,) = [e for e in rig.server.core.ledger.events() if e.request_id == job.id]
    assert row.prompt_tokens == 300


def test_a_keys_own_budget_and_allow_list_reach_fine_tuning(rig):
    """Item 4: a key with a budget of 0, or an allow-list without the base model, cannot start fine-tuning."""
    core = rig.server.core
    broke, _ = core.create_key("acme", policy={"monthly_budget": "0"})
    elsewhere, _ = core.create_key("acme", policy={"models": ["other-model"]})
    file_id = _upload(rig.client(rig.server.key))
    _error(_post(rig, "/v1/fine_tuning/jobs", broke, json={"model": "m", "training_file": file_id}), 429, "insufficient_quota")
    _error(_post(rig, "/v1/fine_tuning/jobs", elsewhere, json={"model": "m", "training_file": file_id}), 403, "model_not_allowed", "model")
    assert rig.manager.list(None)["data"] == []


def test_a_short_lived_key_never_mints_or_widens_a_key_that_outlives_it(rig):
    """Item 5: a key with `expires_in_s` makes keys that expire with it, and may not lift a longer-lived key's limits."""
    core = rig.server.core
    brief, record = core.create_key("acme", expires_in_s=600)
    made = _post(rig, "/v1/keys", brief, json={}).json()
    assert made["expires_at"] is not None and made["expires_at"] <= record.expires_at + 1
    _error(_post(rig, "/v1/keys", brief, json={"expires_in_s": 10**6}), 403, "expiry_beyond_own", "expires_in_s")
    _, limited = core.create_key("acme", policy={"rpm": 5})
    _error(_post(rig, f"/v1/keys/{limited.key_id}", brief, json={"rpm": None}), 403, "expiry_beyond_own")
    admin, _ = core.create_key("ops", role="admin", expires_in_s=600)
    minted = _post(rig, "/admin/keys", admin, json={"tenant": "acme"}).json()
    assert minted["expires_at"] is not None  # an admin key is bound the same way


def test_uploads_stream_within_the_limit_off_the_loop_and_plans_bound_files_and_calls(tmp_path):
    """Item 6: 413 while reading a body sent without a length; the loop answers while a large file is checked; the plan bounds files, bytes and calls."""
    import threading
    import time

    rig = Rig(tmp_path, prefix=PREFIX, max_file_bytes=12 * 2**20)
    with rig.server:
        key = rig.server.key

        def chunks(total: int):
            boundary = b"--b0\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n"
            yield boundary
            for _ in range(total // 65536):
                yield GOOD[:65536].ljust(65536, b"\n")
            yield b"\r\n--b0\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n--b0--\r\n"

        headers = {"Authorization": f"Bearer {key}", "Content-Type": "multipart/form-data; boundary=b0"}
        _error(httpx.post(rig.server.base + "/v1/files", content=chunks(16 * 2**20), headers=headers, timeout=60), 413, "request_too_large")
        big = GOOD * (8 * 2**20 // len(GOOD))  # 8 MiB of valid examples
        gaps: list[float] = []
        done = threading.Event()

        def probe():
            while not done.is_set():
                t0 = time.monotonic()
                httpx.get(rig.server.base + "/healthz", timeout=30)
                gaps.append(time.monotonic() - t0)

        prober = threading.Thread(target=probe)
        prober.start()
        created = rig.client(key).files.create(file=("big.jsonl", big), purpose="fine-tune")
        done.set()
        prober.join()
        assert created.bytes == len(big) and gaps and max(gaps) < 1.0, max(gaps)  # the check ran on a thread: /healthz kept answering

        core = rig.server.core
        small, _ = core.create_key("smallco", plan="small")
        client = rig.client(small)
        _error(_post(rig, "/v1/files", small, files={"file": ("d.jsonl", GOOD * 10)}, data={"purpose": "fine-tune"}), 403, "storage_limit_reached")
        for _ in range(2):
            client.files.create(file=("a.jsonl", GOOD), purpose="fine-tune")
        _error(_post(rig, "/v1/files", small, files={"file": ("c.jsonl", GOOD)}, data={"purpose": "fine-tune"}), 403, "file_limit_reached")

        slow_key, _ = core.create_key("slowco", plan="slow")
        statuses = [_post(rig, "/v1/keys", slow_key, json={}).status_code for _ in range(5)]
        assert statuses.count(200) <= 3 and 429 in statuses  # key, file and job calls pass rate admission


def test_a_deeply_nested_line_is_a_400_naming_it(rig):
    """Item 7: `[[[[...` in a dataset was a RecursionError and a 500."""
    nested = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
    err = _error(_post(rig, "/v1/files", rig.server.key, files={"file": ("n.jsonl", GOOD + nested)}, data={"purpose": "fine-tune"}), 400, "invalid_file_format", "file")
    assert "line 13" in err["message"] and "nested" in err["message"]


def test_queued_jobs_and_keys_per_tenant_are_bounded(rig):
    """Item 8: the plan bounds the jobs a tenant may queue and the keys it may hold."""
    core = rig.server.core
    key, _ = core.create_key("smallco", plan="small")
    client = rig.client(key)
    rig.cluster.free = 0.0
    file_id = _upload(client)
    client.fine_tuning.jobs.create(model="m", training_file=file_id)
    _error(_post(rig, "/v1/fine_tuning/jobs", key, json={"model": "m", "training_file": file_id}), 429)
    made = [_post(rig, "/v1/keys", key, json={}).status_code for _ in range(3)]
    assert made == [200, 200, 403]  # three live keys, the plan's limit
    _error(_post(rig, "/v1/keys", key, json={}), 403, "key_limit_reached")


def test_a_batch_larger_than_a_node_holds_is_a_400_saying_the_limit(rig):
    """Item 9: batch_size up to 256 was taken with no accumulation (about 13 GB of logits)."""
    file_id = _upload(rig.client(rig.server.key))
    body = {"model": "m", "training_file": file_id, "hyperparameters": {"batch_size": 256}}
    err = _error(_post(rig, "/v1/fine_tuning/jobs", rig.server.key, json=body), 400, param="hyperparameters.batch_size")
    assert "16" in err["message"]


def test_the_budget_hold_counts_bytes_not_characters():
    """Item 12: a byte-level BPE makes up to one token per UTF-8 byte: non-ASCII text must not be held at one token per character."""
    import json

    from common.datasets import check_upload
    from deployments.core.fine_tunes import estimate_tokens

    text = "海賊の宝はどこ" * 20
    data = (json.dumps({"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": text}]}) + "\n").encode()
    stats = check_upload(data, "x.jsonl")
    assert stats.content_bytes == 3 * stats.characters
    assert estimate_tokens(stats.content_bytes, stats.messages, 1) >= 2 * len(text.encode())


def test_a_hostile_tenant_probing_the_new_routes_gets_only_4xx_envelopes_and_touches_nothing_of_anyone_else(rig):
    """Upload, fine-tune, key and alert abuse from one tenant against another's objects, bounded in count and time."""
    import time

    core = rig.server.core
    victim = rig.client(rig.server.key)
    victim_file = _upload(victim)
    rig.cluster.free = 0.0
    victim_job = victim.fine_tuning.jobs.create(model="m", training_file=victim_file)
    _, victim_key = core.create_key("acme", name="victim's")
    attacker, _ = core.create_key("mallory")
    before = {"files": victim.files.list().data, "keys": [k.key_id for k in core.list_keys("acme")]}
    traversal = ["..%2F..%2Fetc%2Fpasswd", "file-" + "0" * 24, victim_file.upper(), victim_file + "%00", "%2e%2e"]
    probes = [
        *[("GET", f"/v1/files/{f}", None) for f in [victim_file, *traversal]],
        *[("GET", f"/v1/files/{f}/content", None) for f in [victim_file, *traversal]],
        ("DELETE", f"/v1/files/{victim_file}", None),
        ("POST", "/v1/fine_tuning/jobs", {"model": "m", "training_file": victim_file}),
        ("POST", f"/v1/fine_tuning/jobs/{victim_job.id}/cancel", {}),
        ("GET", f"/v1/fine_tuning/jobs/{victim_job.id}/events", None),
        ("POST", f"/v1/keys/{victim_key.key_id}", {"rpm": None}),
        ("POST", f"/v1/keys/{victim_key.key_id}/revoke", {}),
        ("POST", "/v1/keys", {"role": "admin"}),
        ("POST", "/v1/keys", {"tenant": "acme"}),
        ("POST", "/v1/keys", {"plan": "free"}),
        ("POST", "/v1/keys", {"expires_in_s": -1}),
        ("POST", "/v1/keys", {"metadata": {"k": "v" * 5000}}),
        ("GET", "/admin/alerts", None),
        ("GET", "/admin/fine_tuning/jobs", None),
        ("POST", f"/admin/fine_tuning/jobs/{victim_job.id}/cancel", {}),
        ("GET", "/v1/usage?tenant=acme", None),
        ("POST", "/v1/fine_tuning/jobs", {"model": "m", "training_file": "file-" + "1" * 24, "method": {"type": "full"}}),
        ("POST", "/v1/fine_tuning/jobs", {"model": "m", "training_file": victim_file, "hyperparameters": {"n_epochs": 10**9}}),
    ]
    deadline = time.monotonic() + 60
    for method, path, body in probes:
        assert time.monotonic() < deadline, "the probe is bounded in time"
        resp = httpx.request(method, rig.server.base + path, json=body, headers={"Authorization": f"Bearer {attacker}"}, timeout=10)
        assert 400 <= resp.status_code < 500, (method, path, resp.status_code, resp.text[:200])
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and "Traceback" not in err["message"], (path, err)
    for junk in (b"\xff\xfe" * 100, b"{}\n" * 10, b'{"messages": "x"}\n', b"\x00" * 1000):
        _error(_post(rig, "/v1/files", attacker, files={"file": ("j.jsonl", junk)}, data={"purpose": "fine-tune"}), 400, "invalid_file_format")
    assert victim.files.list().data == before["files"] and [k.key_id for k in core.list_keys("acme")] == before["keys"]
    assert victim.fine_tuning.jobs.retrieve(victim_job.id).status == "queued"
    assert all(k.valid_at(time.time()) for k in core.list_keys("acme"))
