"""Replay for rounds (``stage.align.replay``): a later round trains on the samples of every round so
far, one dataset after another, with the rewards and reference log-probs each round stored. CoPG's
optimum, pi_ref exp(R / beta), does not depend on which policy drew the samples, so earlier rounds'
samples stay valid data for it (and for DPO and IPO, whose pairs carry their own rewards); their stored
reference must be the same model, SFT (validation refuses replay with ``method.reference=previous``)."""

from pathlib import Path

from directalign.artifacts import OffPolicyData
from directalign.stages.base import Stage
from directalign.stages.context import StageContext
from directalign.store import Ranks
from directalign.validation import require_columns

# What a row must hold to be trained on again.
REPLAYED_COLUMNS = ("prompt_ids", "completion_ids", "reward", "ref_logps")


def compute(ctx: StageContext, folder: Path, inputs: dict) -> dict:
    earlier, latest = inputs["earlier"].dataset(), inputs["latest"].dataset()
    for name, dataset in (("earlier", earlier), ("latest", latest)):
        require_columns(
            f"replay: the {name} rounds' dataset {inputs[name].path}", dataset.column_names, REPLAYED_COLUMNS
        )
    OffPolicyData.save(folder, earlier.to_list() + latest.to_list())
    return {"rows": len(earlier) + len(latest), "replayed_rows": len(earlier)}


REPLAY = Stage(
    name="replay",
    inputs=("earlier", "latest"),
    key=(),
    output=OffPolicyData,
    ranks=Ranks.RANK_ZERO,
    compute=compute,
)
