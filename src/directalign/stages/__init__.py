"""The five pipeline stages, each declared once as a ``Stage`` (``stages/base.py``)."""

from directalign.stages.align import ALIGN
from directalign.stages.evaluate import EVALUATE
from directalign.stages.generate import GENERATE
from directalign.stages.reward import REWARD
from directalign.stages.sft import SFT

__all__ = ["ALIGN", "EVALUATE", "GENERATE", "REWARD", "SFT"]
