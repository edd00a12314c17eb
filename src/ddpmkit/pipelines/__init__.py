"""What users ask for in one call, on a loaded model: guided sampling through the one guidance
door (guided.py), generation in chunks with per-sample seeds (generate.py), cascades of a base
model and super-resolution stages (cascade.py), the voyage (voyage.py)."""
from .cascade import CascadeError, Stage, cascade, super_resolve
from .generate import Generated, generate, save_generated
from .guided import GuidanceRequest, guided_model

__all__ = ["CascadeError", "Generated", "GuidanceRequest", "Stage", "cascade", "generate", "guided_model", "save_generated",
           "super_resolve"]
