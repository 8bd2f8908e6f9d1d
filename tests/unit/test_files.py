"""OpenAI's Files API over the real routes and a real file store (no Ray): uploads checked whole, each tenant's files its own."""

from __future__ import annotations

import re

import json

import httpx
import pytest

from common.datasets import DatasetError, check_upload
from common.file_store import FileStore
from common.errors import NotFoundError
from common.runtime import REPO_ROOT
from tests.fakes import ScriptedEngine
from tests.unit.test_metering import Server

SAMPLE = REPO_ROOT / "training/datasets/pirate_sft.jsonl"
GOOD = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "arr"}]}\n'


@pytest.mark.parametrize(
    "data, line, reason",
    [
        (GOOD + b"not json\n", 2, "Expecting value"),
        (GOOD + b'{"messages": []}\n', 2, "expected"),
        (b'{"messages": [{"role": "user", "content": "only a question"}]}\n', 1, "no assistant message"),
        (b'{"messages": [{"role": "wizard", "content": "x"}]}\n', 1, "role"),
        (GOOD + b"\xff\xfe\n", 2, "UTF-8"),
        (b"\n\n", 0, "empty"),
    ],
)
def test_a_bad_dataset_names_its_line(data, line, reason):
    with pytest.raises(DatasetError, match=reason) as info:
        check_upload(data, "up.jsonl")
    assert info.value.line == line


def test_the_store_keeps_each_tenants_files_apart(tmp_path):
    store = FileStore(tmp_path)
    a = store.create("acme", "a.jsonl", "fine-tune", GOOD, 1, now=100)
    b = store.create("..", "b.jsonl", "fine-tune", GOOD * 2, 2, now=200)  # a tenant name that is a path component stays one folder
    assert store.get("acme", a.id) == a and store.list("acme") == [a] and store.list("..") == [b]
    folders = sorted(p.name for p in (tmp_path / ".files").iterdir())
    assert len(folders) == 2 and all(re.fullmatch(r"t_[0-9a-f]{32}", f) for f in folders)  # named by a digest: no name is a path
    assert store.data_path("..", b.id).read_bytes() == GOOD * 2
    for tenant, file_id in (("globex", a.id), ("Acme", a.id), ("acme", b.id), ("acme", "file-../../x"), ("acme", "../acme")):
        with pytest.raises(NotFoundError):
            store.get(tenant, file_id)
    assert store.list("Acme") == []  # another name, even on a case-insensitive disk: another folder
    store.delete("acme", a.id)
    assert store.list("acme") == [] and not any(p.name.startswith((".staging", ".deleted")) for f in folders for p in (tmp_path / ".files" / f).iterdir())


def test_a_record_of_another_tenant_is_never_served_from_a_shared_folder(tmp_path):
    """Item 12: the older `t_<tenant>` layout on a case-insensitive disk put `Acme` and `acme` in one folder; `get` checks the record."""
    store = FileStore(tmp_path)
    a = store.create("acme", "a.jsonl", "fine-tune", GOOD, 1)
    legacy = tmp_path / ".files" / "t_Acme"  # what a case-insensitive disk would show `Acme` for the old `t_acme`
    legacy.mkdir(parents=True)
    (store._tenant_dirs("acme")[0] / a.id).rename(legacy / a.id)
    for call in (lambda: store.get("Acme", a.id), lambda: store.data_path("Acme", a.id), lambda: store.delete("Acme", a.id)):
        with pytest.raises(NotFoundError):
            call()
    assert store.list("Acme") == []


def test_files_api_with_the_official_client(tmp_path):
    from openai import BadRequestError, NotFoundError as OpenAINotFound, OpenAI

    with Server(tmp_path, ScriptedEngine()) as srv:
        base = f"http://127.0.0.1:{srv.port}/v1"
        client = OpenAI(base_url=base, api_key=srv.key, max_retries=0)
        other_key, _ = srv.core.create_key("globex")
        other = OpenAI(base_url=base, api_key=other_key, max_retries=0)

        made = client.files.create(file=SAMPLE.open("rb"), purpose="fine-tune")
        assert made.id.startswith("file-") and made.bytes == SAMPLE.stat().st_size and made.filename == "pirate_sft.jsonl" and made.purpose == "fine-tune"
        assert [f.id for f in client.files.list()] == [made.id] and client.files.retrieve(made.id).bytes == made.bytes
        assert client.files.content(made.id).content == SAMPLE.read_bytes()
        # Another tenant sees nothing of it: not in its list, 404 by id (as an id that never existed).
        assert list(other.files.list()) == []
        for call in (lambda: other.files.retrieve(made.id), lambda: other.files.delete(made.id), lambda: other.files.content(made.id)):
            with pytest.raises(OpenAINotFound):
                call()

        with pytest.raises(BadRequestError) as bad:
            client.files.create(file=("bad.jsonl", GOOD + b'{"messages": "nope"}\n'), purpose="fine-tune")
        err = bad.value.body
        assert err["code"] == "invalid_file_format" and err["param"] == "file" and "line 2" in err["message"]
        with pytest.raises(BadRequestError) as bad:
            client.files.create(file=("x.jsonl", GOOD), purpose="assistants")
        assert bad.value.body["param"] == "purpose"
        assert [f.id for f in client.files.list()] == [made.id]  # nothing half-created

        auth = {"Authorization": f"Bearer {srv.key}"}
        missing = httpx.post(base + "/files", data={"purpose": "fine-tune"}, headers=auth)
        assert missing.status_code == 400 and missing.json()["error"]["param"] == "file"
        huge = httpx.post(base + "/files", files={"file": ("big.jsonl", GOOD * (2**25 // len(GOOD) + 1))}, data={"purpose": "fine-tune"}, headers=auth)
        assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
        assert httpx.get(base + "/files").status_code == 401  # closed without a key

        assert client.files.delete(made.id).deleted is True
        assert list(client.files.list()) == []
        assert json.loads(httpx.get(base + f"/files/{made.id}", headers=auth).text)["error"]["code"] == "not_found"
