"""Run the pipeline: `python pipelines/run.py experiment=smoke` (Hydra overrides on the command line)."""

import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from directalign.errors import UserError
from directalign.pipeline import run_pipeline

log = logging.getLogger(__name__)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        rows = run_pipeline(cfg, HydraConfig.get().overrides.task)
    except UserError as error:
        # Bad input is the user's to fix: one line naming it, not a traceback.
        raise SystemExit(f"directalign: {error}") from None
    for row in rows or []:
        log.info("%s", row)


if __name__ == "__main__":
    main()
