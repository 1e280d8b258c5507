"""The claims of a sweep read on the reward-KL frontier: `python pipelines/frontier_report.py` (run by
`make headlines`; config conf/frontier_report.yaml: the sweep folder, the output folder, the matched KLs,
each method's picked beta, the power targets and the claims). `--config-name length_report` is paper A's
length study (run by `make length`), which adds the length plots and distributions.
"""

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from directalign.frontier_report import claim_specs, log_frontier_wandb, write_frontier_report
from directalign.length_study import write_length_report

log = logging.getLogger(__name__)


@hydra.main(config_path="../conf", config_name="frontier_report", version_base="1.3")
def main(cfg: DictConfig) -> None:
    specs, targets = claim_specs(cfg), OmegaConf.to_container(cfg.power_targets)
    out = Path(cfg.out)
    if cfg.length_plots:
        claims = write_length_report(Path(cfg.sweep_dir), out, specs, targets, list(cfg.matched_kl))
    else:
        picks = OmegaConf.to_container(cfg.picks) if cfg.picks else None
        claims = write_frontier_report(Path(cfg.sweep_dir), out, specs, picks, targets, list(cfg.matched_kl))
    log.info("wrote %s", out)
    if cfg.wandb:
        mode = "offline" if cfg.wandb.offline else "online"
        run_dir = log_frontier_wandb(
            claims,
            out,
            mode=mode,
            dir=HydraConfig.get().runtime.output_dir,
            project=cfg.wandb.project,
            entity=cfg.wandb.entity,
            name=f"frontier_report_{out.name}",
            job_type="frontier_report",
        )
        log.info("wandb run in %s", run_dir)


if __name__ == "__main__":
    main()
