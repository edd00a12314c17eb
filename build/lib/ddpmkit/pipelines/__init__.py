"""What users ask for in one call, on a loaded model: guided sampling through the one guidance
door (guided.py), generation in chunks with per-sample seeds (generate.py), the voyage (voyage.py)."""
from .generate import Generated, generate, save_generated
from .guided import GuidanceRequest, guided_model

__all__ = ["Generated", "GuidanceRequest", "generate", "guided_model", "save_generated"]
