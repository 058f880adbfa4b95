"""unnoise: diffusion models, correct to the last formula.

Sigma-space is the common language (``x = x0 + sigma n``); see the README and DESIGN notes.
"""

from unnoise.model import DiffusionModel
from unnoise.sampling.front import sample
from unnoise.sampling.samplers import SAMPLERS
from unnoise.schedules import DiscreteSchedule, make_schedule

__all__ = ["SAMPLERS", "DiffusionModel", "DiscreteSchedule", "make_schedule", "sample"]
__version__ = "0.1.0"
