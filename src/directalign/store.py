"""Content-addressed stage artifacts.

Each stage output lives in ``<root>/<stage>/<key>/``, where ``key`` hashes the stage's own config
and its upstream keys. A stage is complete only once its ``manifest.json`` (config, upstream keys,
metrics, files with sizes and hashes) has been written atomically as the very last step, so a
killed stage leaves no manifest and is redone, resuming from whatever checkpoint it left.
"""

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
KEY_LENGTH = 16


class CorruptArtifactError(RuntimeError):
    """A completed artifact whose files no longer match its manifest."""


@dataclass(frozen=True)
class Artifact:
    stage: str
    key: str
    path: Path
    manifest: dict[str, Any]

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest["metrics"]


def stage_key(stage: str, config: dict[str, Any], upstream: Sequence[Artifact]) -> str:
    """Hash of the stage name, its config and its upstream keys (order-independent in upstream)."""
    payload = {"stage": stage, "config": config, "upstream": sorted(f"{a.stage}/{a.key}" for a in upstream)}
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:KEY_LENGTH]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write, fsync, then rename: readers see the old file or the whole new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2, sort_keys=True, default=str)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Store:
    """Stage artifacts under one root folder, shared by every run and sweep job."""

    def __init__(self, root: str | Path, scratch_dirs: Sequence[str] = ("checkpoints",)):
        self.root = Path(root)
        self.scratch_dirs = tuple(scratch_dirs)

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def load(self, stage: str, key: str) -> Artifact | None:
        """The completed artifact, verified against its manifest, or None if it is not complete."""
        folder = self.path(stage, key)
        manifest_path = folder / MANIFEST
        if not manifest_path.is_file():
            return None
        manifest = json.loads(manifest_path.read_text())
        for entry in manifest["files"]:
            file = folder / entry["path"]
            if (
                not file.is_file()
                or file.stat().st_size != entry["size"]
                or file_sha256(file) != entry["sha256"]
            ):
                raise CorruptArtifactError(
                    f"{file} does not match {manifest_path}: delete {folder} to recompute it"
                )
        return Artifact(stage, key, folder, manifest)

    def run(
        self,
        stage: str,
        config: dict[str, Any],
        upstream: Sequence[Artifact],
        compute: Callable[[Path], dict[str, Any]],
    ) -> Artifact:
        """Return the stage's artifact, computing it first unless a complete one exists.

        ``compute(folder)`` writes the stage's files into ``folder`` and returns its metrics.
        Concurrent jobs needing the same artifact serialise on a file lock: one computes, the
        others wait and then load it.
        """
        key = stage_key(stage, config, upstream)
        folder = self.path(stage, key)
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder) + ".lock"):
            done = self.load(stage, key)
            if done is not None:
                log.info("%s: reusing %s", stage, folder)
                return done
            folder.mkdir(exist_ok=True)
            log.info("%s: computing into %s", stage, folder)
            metrics = compute(folder)
            self._remove_scratch(folder)
            manifest = {
                "stage": stage,
                "key": key,
                "config": config,
                "upstream": sorted(f"{a.stage}/{a.key}" for a in upstream),
                "metrics": metrics,
                "files": self._file_list(folder),
            }
            write_json_atomic(folder / MANIFEST, manifest)
            return Artifact(stage, key, folder, manifest)

    def _remove_scratch(self, folder: Path) -> None:
        """Resume checkpoints are only useful while a stage is incomplete."""
        for name in self.scratch_dirs:
            shutil.rmtree(folder / name, ignore_errors=True)

    @staticmethod
    def _file_list(folder: Path) -> list[dict[str, Any]]:
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
        return [
            {"path": str(p.relative_to(folder)), "size": p.stat().st_size, "sha256": file_sha256(p)}
            for p in files
        ]
