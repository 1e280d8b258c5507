"""Content-addressed stage artifacts.

Each stage output lives in ``<root>/<stage>/<key>/``, where ``key`` hashes the stage's own config
and its upstream keys. A stage is complete only once its ``manifest.json`` (config, upstream keys,
metrics, files with sizes and hashes) has been written atomically as the very last step, so a
killed stage leaves no manifest and is redone, resuming from whatever checkpoint it left.

Under data-parallel training every rank runs the same pipeline, but only rank 0 locks and writes
manifests. Other ranks never write: they join the computation of the stages that train
(``trainer.fit`` needs every rank) and, once a process group exists, of the stages that shard their
prompts across ranks; otherwise they wait for rank 0's manifest.
"""

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from directalign.distributed import broadcast_from_rank_zero, world

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
KEY_LENGTH = 16
# The stages whose compute calls ``trainer.fit``, which every data-parallel rank must join.
COLLECTIVE_STAGES = ("sft", "reward", "align")
# The stages that split their prompts across the ranks of a process group (``distributed.py``).
SHARDED_STAGES = ("generate", "evaluate")
# How long a non-zero rank waits for rank 0 to finish a stage (generation can take hours).
RANK_WAIT_TIMEOUT_S = 24 * 3600.0
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK")


class CorruptArtifactError(RuntimeError):
    """A completed artifact whose files no longer match its manifest."""


class RankWaitTimeout(TimeoutError):
    """A non-zero rank gave up waiting for rank 0's manifest."""


def is_rank_zero() -> bool:
    """False in any process that torchrun (RANK), SLURM (SLURM_PROCID) or Lightning's DDP launcher
    (LOCAL_RANK, NODE_RANK) marked as another rank; True in a plain single process.

    Read from the environment because Lightning's launcher starts the other ranks only at the
    first ``trainer.fit``, as fresh runs of the same command, long before any process group exists.
    """
    return all(int(os.environ.get(name, "0")) == 0 for name in RANK_VARIABLES)


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

    def __init__(
        self,
        root: str | Path,
        scratch_dirs: Sequence[str] = ("checkpoints",),
        collective_stages: Sequence[str] = COLLECTIVE_STAGES,
        sharded_stages: Sequence[str] = SHARDED_STAGES,
        wait_timeout_s: float = RANK_WAIT_TIMEOUT_S,
        poll_interval_s: float = 2.0,
    ):
        self.root = Path(root)
        self.scratch_dirs = tuple(scratch_dirs)
        self.collective_stages = tuple(collective_stages)
        self.sharded_stages = tuple(sharded_stages)
        self.wait_timeout_s = wait_timeout_s
        self.poll_interval_s = poll_interval_s

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
        others wait and then load it. A non-zero data-parallel rank takes no lock (rank 0 holds it
        through ``trainer.fit``, which this rank must join): it runs ``compute`` only for the stages it
        must join, where the stage itself saves on rank 0 alone, and then waits for rank 0's manifest.
        Once a process group exists, rank 0 tells the others whether it computes or reuses, so no rank
        enters a collective that rank 0 skips (another job may have finished the artifact meanwhile).
        """
        key = stage_key(stage, config, upstream)
        folder = self.path(stage, key)
        if not is_rank_zero():
            return self._follow_rank_zero(stage, key, compute)
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder) + ".lock"):
            done = self.load(stage, key)
            broadcast_from_rank_zero(done is None)
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

    def _follow_rank_zero(self, stage: str, key: str, compute: Callable[[Path], dict[str, Any]]) -> Artifact:
        grouped = world()[1] > 1
        # Without a group yet, rank 0 is computing (or about to) unless the artifact is complete.
        rank_zero_computes = broadcast_from_rank_zero(None) if grouped else self.load(stage, key) is None
        joins = stage in self.collective_stages or (grouped and stage in self.sharded_stages)
        if rank_zero_computes and joins:
            compute(self.path(stage, key))
        return self.wait_for(stage, key)

    def wait_for(self, stage: str, key: str) -> Artifact:
        """Poll until rank 0 has written the stage's manifest; fail loudly rather than hang."""
        deadline = time.monotonic() + self.wait_timeout_s
        while (done := self.load(stage, key)) is None:
            if time.monotonic() > deadline:
                raise RankWaitTimeout(
                    f"waited {self.wait_timeout_s:.0f} s for rank 0 to write"
                    f" {self.path(stage, key) / MANIFEST}: rank 0 failed or is still computing"
                    " (see its log); rerun once it has finished"
                )
            time.sleep(self.poll_interval_s)
        return done

    def _remove_scratch(self, folder: Path) -> None:
        """Resume checkpoints are only useful while a stage is incomplete."""
        for name in self.scratch_dirs:
            shutil.rmtree(folder / name, ignore_errors=True)

    @staticmethod
    def _file_list(folder: Path) -> list[dict[str, Any]]:
        # A kill inside write_json_atomic can leave a temporary manifest behind: never list it.
        files = sorted(
            p
            for p in folder.rglob("*")
            if p.is_file() and p.name != MANIFEST and not p.name.startswith(f".{MANIFEST}.")
        )
        return [
            {"path": str(p.relative_to(folder)), "size": p.stat().st_size, "sha256": file_sha256(p)}
            for p in files
        ]
