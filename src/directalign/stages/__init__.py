"""The pipeline stages, each declared once as a ``Stage`` (``stages/base.py``): the five of the
pipeline, and the frozen trunk's states that alignment on the top layers only starts from."""

from directalign.stages.align import ALIGN, ALIGN_ON_TRUNK
from directalign.stages.evaluate import EVALUATE
from directalign.stages.generate import GENERATE, GENERATE_ROUND
from directalign.stages.reward import REWARD
from directalign.stages.sft import SFT
from directalign.stages.trunk import TRUNK

__all__ = ["ALIGN", "ALIGN_ON_TRUNK", "EVALUATE", "GENERATE", "GENERATE_ROUND", "REWARD", "SFT", "TRUNK"]
