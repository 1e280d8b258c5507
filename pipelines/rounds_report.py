"""Iterative against offline alignment, read on the reward-KL frontier: `python pipelines/rounds_report.py`
(run by `make rounds`; config conf/rounds_report.yaml: the sweep folder, the output folder, the power
targets and the claims).
"""

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from directalign.frontier_report import claim_specs
from directalign.rounds_report import log_rounds_wandb, write_rounds_report

log = logging.getLogger(__name__)


@hydra.main(config_path="../conf", config_name="rounds_report", version_base="1.3")
def main(cfg: DictConfig) -> None:
    out = Path(cfg.out)
    specs, targets = claim_specs(cfg), OmegaConf.to_container(cfg.power_targets)
    claims, table = write_rounds_report(Path(cfg.sweep_dir), out, specs, targets)
    log.info("wrote %s", out)
    if cfg.wandb:
        run_dir = log_rounds_wandb(
            claims,
            table,
            out,
            mode="offline" if cfg.wandb.offline else "online",
            dir=HydraConfig.get().runtime.output_dir,
            project=cfg.wandb.project,
            entity=cfg.wandb.entity,
            name=f"rounds_report_{out.name}",
            job_type="rounds_report",
        )
        log.info("wandb run in %s", run_dir)


if __name__ == "__main__":
    main()
