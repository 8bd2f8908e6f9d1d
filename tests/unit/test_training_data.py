"""The SFT data path and version registration as plain functions (no Ray): validation, assistant-only labels, split, schedule, atomic publish."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from common.model_store import LocalModelStore
from common.runtime import REPO_ROOT
from training.config import load_train_config
from training.data import IGNORE_INDEX, DatasetError, collate, encode_chat, is_eval, lr_at, read_chats, validate_chat

SAMPLE = REPO_ROOT / "training" / "datasets" / "pirate_sft.jsonl"


@pytest.fixture(scope="module")
def tokenizer():
    from common.config import load_config
    from common.model_store import open_store
    from deployments.core.tokenizer import load_hf_tokenizer

    config = load_config()
    try:
        return load_hf_tokenizer(open_store(config.store_root()).resolve(config.model.name).path)
    except Exception:
        pytest.skip("the default model is not in the store (`make model`)")


def test_sample_dataset_is_valid_and_on_theme():
    chats = read_chats(SAMPLE)
    assert len(chats) >= 200
    assert all(c[-1]["role"] == "assistant" and c[-1]["content"].startswith("Arr, matey!") for c in chats)


@pytest.mark.parametrize(
    "line, reason",
    [
        ("not json", "Expecting value"),
        ('{"messages": []}', "expected"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "role"),
        ('{"messages": [{"role": "user", "content": "only a question"}]}', "no assistant"),
    ],
)
def test_bad_lines_are_named(tmp_path, line, reason):
    path = tmp_path / "d.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n\n' + line + "\n")
    with pytest.raises(DatasetError, match=reason) as info:
        read_chats(path)
    assert info.value.line == 3 and str(path) in str(info.value)


def test_validate_keeps_only_role_and_content():
    assert validate_chat({"messages": [{"role": "assistant", "content": "a", "name": "x"}]}) == [{"role": "assistant", "content": "a"}]


def test_labels_cover_exactly_the_assistant_replies(tokenizer):
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Arr, matey!"},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "Yo ho ho!"},
    ]
    enc = encode_chat(tokenizer, chat, 512)
    full = tokenizer.apply_chat_template(chat, tokenize=True)
    assert enc.input_ids == (full if isinstance(full, list) else full["input_ids"])  # what serving's tokenizer renders
    learned = tokenizer.decode([t for t, l in zip(enc.input_ids, enc.labels) if l != IGNORE_INDEX])
    assert learned == "Arr, matey!<|im_end|>\nYo ho ho!<|im_end|>\n"
    assert "assistant" not in learned and "Hi" not in learned


def test_truncation_that_leaves_nothing_to_learn_drops_the_example(tokenizer):
    chat = [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "Arr"}]
    assert encode_chat(tokenizer, chat, 16) is None
    assert len(encode_chat(tokenizer, chat, 4096).input_ids) > 100


def test_eval_split_is_stable_and_about_the_fraction():
    chats = read_chats(SAMPLE)
    held = [is_eval(c, 0.1, 0) for c in chats]
    assert held == [is_eval(c, 0.1, 0) for c in chats]  # any reader, any order, same answer
    assert 0.05 < sum(held) / len(held) < 0.2
    assert not any(is_eval(c, 0.0, 0) for c in chats)


def test_collate_pads_and_masks():
    batch = collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}], pad_id=0)
    assert batch["input_ids"] == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"] == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"] == [[-100, 2, 3], [4, -100, -100]]


def test_schedule_warms_up_then_decays_to_a_tenth():
    lrs = [lr_at(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(1.0 - 0.9 * 89 / 90) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_shipped_training_configs_load():
    for path in sorted((REPO_ROOT / "training" / "configs").glob("*.yaml")):
        cfg = load_train_config(path)
        assert cfg.data_path().is_file(), path
    with pytest.raises(Exception, match="warmup"):
        load_train_config(REPO_ROOT / "training/configs/tiny.yaml", {"optim": {"max_steps": 2, "warmup_steps": 5}})


def _hf(tmp_path: Path, n_files: int = 3) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(n_files):
        (src / f"model-{i}.safetensors").write_bytes(b"x" * 1000)
    (src / "optimizer.pt").write_bytes(b"o")
    return src


def test_publish_skips_training_state_and_records_lineage(tmp_path):
    store = LocalModelStore(tmp_path / "store")
    mv = store.publish("m", _hf(tmp_path), {"lineage": {"base": {"name": "b", "version": "v1"}}}, ignore=("optimizer.pt",))
    assert mv.version == "v1" and not (mv.path / "optimizer.pt").exists()
    assert mv.metadata["lineage"]["base"] == {"name": "b", "version": "v1"} and len(mv.metadata["sha256"]) == 3


def test_a_failed_publish_leaves_no_version_and_no_staging(tmp_path):
    store = LocalModelStore(tmp_path / "store")
    src = _hf(tmp_path)
    calls = []

    def explode(directory, names):  # copytree's ignore hook: fail half way through the copy
        calls.append(directory)
        raise OSError("disk full")

    with pytest.raises(OSError):
        _publish_with(store, src, explode)
    assert store.versions("m") == [] and not list((store.root / "m").glob(".staging-*"))


def _publish_with(store, src, ignore_hook):
    import shutil
    from unittest import mock

    real = shutil.copytree
    with mock.patch("common.model_store.shutil.copytree", lambda s, d, ignore=None: real(s, d, ignore=ignore_hook)):
        return store.publish("m", src, {})


def test_a_writer_killed_mid_publish_never_shows_a_partial_version(tmp_path):
    store = LocalModelStore(tmp_path / "store")
    src = _hf(tmp_path, n_files=1)
    (src / "big.safetensors").write_bytes(b"\0" * (200 << 20))
    code = f"""
import os, shutil
from common.model_store import LocalModelStore
real = shutil.copy2
def copy2(s, d, **kw):
    if s.endswith("big.safetensors"):
        os.kill(os.getpid(), 9)  # SIGKILL in the middle of the copy
    return real(s, d, **kw)
real_tree = shutil.copytree
shutil.copytree = lambda s, d, ignore=None: real_tree(s, d, ignore=ignore, copy_function=copy2)
LocalModelStore({str(store.root)!r}).publish("m", {str(src)!r}, {{}})
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, timeout=120)
    assert proc.returncode == -9
    assert store.versions("m") == [] and store.models() == []
    leftovers = list((store.root / "m").glob(".staging-*"))
    assert leftovers  # what the killed writer left is hidden...
    assert store.clean_staging("m", older_than_s=0) == leftovers and not list((store.root / "m").glob(".staging-*"))  # ...and cleaned
    assert store.publish("m", src, {}).version == "v1"
