"""Paper B's toy bandit (Figure 1): train every method, write summary.json, summary.md and regret.png.

    python pipelines/bandit.py                                                # paper's settings, 5 seeds
    python pipelines/bandit.py bandit.epochs=500 out_dir=results/bandit/long  # the long run
    python pipelines/bandit.py bandit.rewards=[1,0,3,2] bandit.mu1=[0.25,0.25,0.25,0.25] \
        bandit.mu2=[0.1,0.6,0.1,0.2] bandit.ref=[0.4,0.2,0.2,0.2] bandit.seed=0 out_dir=...  # any bandit
    python pipelines/bandit.py bandit.lengths=[1,3,2] bandit.length_power=1 out_dir=...  # averaged h / |y|
    python pipelines/bandit.py bandit.mode=online out_dir=...  # pairs from the current policy every step
    python pipelines/bandit.py bandit.mode=iterative bandit.rounds=3 bandit.reference=previous out_dir=...

Every number lives in conf/bandit.yaml; results/bandit/README.md records the reference runs. Each method's
population fixed point under the run's mode (src/directalign/bandit.py derives them) is stored beside its
trained policy; an iterative run also stores each round's.
"""

import json
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from directalign.bandit import BanditConfig, regret_figure, run, summary_table
from directalign.errors import ConfigError


@hydra.main(config_path="../conf", config_name="bandit", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        config = BanditConfig.from_mapping(OmegaConf.to_container(cfg.bandit, resolve=True))
    except ConfigError as error:
        # Bad input is the user's to fix: one line naming it, not a traceback.
        raise SystemExit(f"directalign: {error}") from None
    started = time.perf_counter()
    summary = run(config)
    summary["train_seconds"] = round(time.perf_counter() - started, 2)

    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    table = summary_table(summary)
    (out_dir / "summary.md").write_text(table)
    regret_figure(summary).savefig(out_dir / "regret.png", dpi=150)
    print(
        table,
        f"Trained in {summary['train_seconds']} s; wrote {out_dir}/summary.json, summary.md, regret.png",
    )


if __name__ == "__main__":
    main()
