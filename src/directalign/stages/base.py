"""A pipeline stage declared once: its inputs, the config that forms its store key, what it outputs and
what the data-parallel ranks do while it runs. ``Stage.run`` is the one driver of every stage."""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from directalign.stages.context import StageContext, plain
from directalign.store import Artifact, Ranks

Compute = Callable[[StageContext, Path, Mapping[str, Artifact]], dict[str, Any]]


@dataclass(frozen=True)
class Stage:
    """``compute(ctx, folder, inputs)`` writes the stage's files into ``folder`` and returns its metrics.

    ``key`` lists the config paths the result depends on (``trainer.precision`` for every stage that
    trains); the store adds the upstream artifacts' keys. ``excluded`` lists paths under ``key`` that do
    not change the result (settings proven to be speed-only, inputs the stage never reads), so changing
    them recomputes nothing. ``scratch`` folders (resume checkpoints) are removed once compute succeeds.
    """

    name: str
    inputs: tuple[str, ...]
    key: tuple[str, ...]
    output: type[Artifact]
    ranks: Ranks
    compute: Compute
    excluded: tuple[str, ...] = ()
    scratch: tuple[str, ...] = ()

    def key_config(self, cfg: DictConfig) -> dict[str, Any]:
        """The part of ``cfg`` that determines this stage's result, as plain JSON-able values."""
        config = {path: plain(OmegaConf.select(cfg, path, throw_on_missing=True)) for path in self.key}
        for path in self.excluded:
            parent = next(p for p in self.key if path.startswith(p + "."))
            *nodes, leaf = path.removeprefix(parent + ".").split(".")
            node = config[parent]
            for name in nodes:
                node = node[name]
            node.pop(leaf, None)
        return config

    def run(self, ctx: StageContext, inputs: Mapping[str, Artifact]) -> Artifact:
        """The stage's artifact for ``ctx.cfg`` and ``inputs`` (one per declared input), computed only if
        the store has no complete one."""
        if sorted(inputs) != sorted(self.inputs):
            raise TypeError(f"stage {self.name} takes inputs {self.inputs}, got {tuple(inputs)}")
        return ctx.store.run(
            self.name,
            self.key_config(ctx.cfg),
            inputs,
            lambda folder: self.compute(ctx, folder, inputs),
            ranks=self.ranks,
            scratch=self.scratch,
            kind=self.output,
        )
