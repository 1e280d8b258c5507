"""Paper A's length study from the length sweep's jobs: `python pipelines/length_report.py` (run by
`make length`; config conf/length_report.yaml: the sweep folder, the output folder, the KLs of the matched
table and the claims). Writes the sweep report, length_vs_score.png and claims.json/claims.md into `out`.
"""

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from directalign.length_study import CurveClaim, write_length_report

log = logging.getLogger(__name__)


@hydra.main(config_path="../conf", config_name="length_report", version_base="1.3")
def main(cfg: DictConfig) -> None:
    claims = [
        CurveClaim(**(spec | {"contrast": tuple(spec["contrast"])}))
        for spec in OmegaConf.to_container(cfg.claims, resolve=True)
    ]
    out = write_length_report(Path(cfg.sweep_dir), Path(cfg.out), claims, list(cfg.matched_kl))
    if out is None:
        sys.exit(f"no evaluated job (results/policies.json) under {cfg.sweep_dir}")
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
