"""Content-addressed stage artifacts.

Each stage output lives in ``<root>/<stage>/<key>/``, where ``key`` hashes the stage's own config
and its upstream keys. A stage is complete only once its ``manifest.json`` (config, upstream keys,
metrics, files with sizes and hashes) has been written atomically as the very last step, so a
killed stage leaves no manifest and is redone, resuming from whatever checkpoint it left.

Under data-parallel training every rank runs the same pipeline, but only rank 0 locks and writes
manifests. What the other ranks do is the stage's declared rank behaviour (``Ranks``): join a
collective stage's compute (``trainer.fit`` needs every rank), join a sharded stage's compute once a
process group exists (it splits its prompts across ranks), or wait for rank 0's manifest.
"""

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from filelock import FileLock

from directalign.distributed import broadcast_from_rank_zero, is_rank_zero, world
from directalign.errors import CorruptArtifactError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
KEY_LENGTH = 16
# How long a non-zero rank waits for rank 0 to finish a stage (generation can take hours).
RANK_WAIT_TIMEOUT_S = 24 * 3600.0


class Ranks(Enum):
    """What the ranks other than 0 do while rank 0 computes a stage."""

    COLLECTIVE = "collective"  # every rank runs compute (it calls trainer.fit); rank 0 alone saves
    SHARDED = "sharded"  # once a process group exists every rank runs compute on its share of prompts
    RANK_ZERO = "rank0"  # rank 0 alone computes; the others wait for its manifest


class RankWaitTimeout(TimeoutError):
    """A non-zero rank gave up waiting for rank 0's manifest."""


@dataclass(frozen=True)
class Artifact:
    """A completed stage output: its folder and manifest. Stages subclass it with typed accessors."""

    stage: str
    key: str
    path: Path
    manifest: dict[str, Any]

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest["metrics"]

    @property
    def ref(self) -> str:
        """``<stage>/<key>``: how manifests and results name this artifact."""
        return f"{self.stage}/{self.key}"


ArtifactType = TypeVar("ArtifactType", bound=Artifact)


def upstream_refs(upstream: Mapping[str, Artifact]) -> dict[str, str]:
    """Each input's role (``sft``, ``policy``...) and the artifact that fills it."""
    return {role: artifact.ref for role, artifact in sorted(upstream.items())}


def stage_key(stage: str, config: dict[str, Any], upstream: Mapping[str, Artifact]) -> str:
    """Hash of the stage name, its config and its upstream artifacts by role."""
    payload = {"stage": stage, "config": config, "upstream": upstream_refs(upstream)}
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
        self, root: str | Path, wait_timeout_s: float = RANK_WAIT_TIMEOUT_S, poll_interval_s: float = 2.0
    ):
        self.root = Path(root)
        self.wait_timeout_s = wait_timeout_s
        self.poll_interval_s = poll_interval_s

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def load(self, stage: str, key: str, kind: type[ArtifactType] = Artifact) -> ArtifactType | None:
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
        return kind(stage, key, folder, manifest)

    def run(
        self,
        stage: str,
        config: dict[str, Any],
        upstream: Mapping[str, Artifact],
        compute: Callable[[Path], dict[str, Any]],
        *,
        ranks: Ranks = Ranks.RANK_ZERO,
        scratch: Sequence[str] = (),
        kind: type[ArtifactType] = Artifact,
    ) -> ArtifactType:
        """Return the stage's artifact, computing it first unless a complete one exists.

        ``compute(folder)`` writes the stage's files into ``folder`` and returns its metrics; the
        ``scratch`` folders it leaves (resume checkpoints) are removed once it succeeds. Concurrent
        jobs needing the same artifact serialise on a file lock: one computes, the others wait and then
        load it. A non-zero data-parallel rank takes no lock (rank 0 holds it through ``trainer.fit``,
        which this rank must join): it runs ``compute`` as ``ranks`` says, and then waits for rank 0's
        manifest. Once a process group exists, rank 0 tells the others whether it computes or reuses,
        so no rank enters a collective that rank 0 skips (another job may have finished it meanwhile).
        """
        key = stage_key(stage, config, upstream)
        folder = self.path(stage, key)
        if not is_rank_zero():
            return self._follow_rank_zero(stage, key, compute, ranks, kind)
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder) + ".lock"):
            done = self.load(stage, key, kind)
            broadcast_from_rank_zero(done is None)
            if done is not None:
                log.info("%s: reusing %s", stage, folder)
                return done
            folder.mkdir(exist_ok=True)
            log.info("%s: computing into %s", stage, folder)
            start = time.monotonic()
            metrics = compute(folder)
            for name in scratch:
                shutil.rmtree(folder / name, ignore_errors=True)
            manifest = {
                "stage": stage,
                "key": key,
                "config": config,
                "upstream": upstream_refs(upstream),
                "metrics": metrics,
                "files": self._file_list(folder),
                # This attempt's time (a resumed stage's earlier attempts not counted): stage times for
                # the budget of an experiment, read by `pipelines/stage_times.py`.
                "wall_seconds": round(time.monotonic() - start, 1),
            }
            write_json_atomic(folder / MANIFEST, manifest)
            log.info("%s: done in %.0f s", stage, manifest["wall_seconds"])
            return kind(stage, key, folder, manifest)

    def _follow_rank_zero(
        self,
        stage: str,
        key: str,
        compute: Callable[[Path], dict[str, Any]],
        ranks: Ranks,
        kind: type[ArtifactType],
    ) -> ArtifactType:
        grouped = world()[1] > 1
        # Without a group yet, rank 0 is computing (or about to) unless the artifact is complete.
        rank_zero_computes = broadcast_from_rank_zero(None) if grouped else self.load(stage, key) is None
        joins = ranks is Ranks.COLLECTIVE or (grouped and ranks is Ranks.SHARDED)
        if rank_zero_computes and joins:
            compute(self.path(stage, key))
        return self.wait_for(stage, key, kind)

    def wait_for(self, stage: str, key: str, kind: type[ArtifactType] = Artifact) -> ArtifactType:
        """Poll until rank 0 has written the stage's manifest; fail loudly rather than hang."""
        deadline = time.monotonic() + self.wait_timeout_s
        while (done := self.load(stage, key, kind)) is None:
            if time.monotonic() > deadline:
                raise RankWaitTimeout(
                    f"waited {self.wait_timeout_s:.0f} s for rank 0 to write"
                    f" {self.path(stage, key) / MANIFEST}: rank 0 failed or is still computing"
                    " (see its log); rerun once it has finished"
                )
            time.sleep(self.poll_interval_s)
        return done

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
