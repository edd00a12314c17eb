"""ddpmkit: denoising diffusion models, correct to the equation."""
# isort: off
from . import threads  # noqa: F401  (first: it configures OpenMP before torch loads it)
from . import heap  # noqa: F401  (malloc keeps freed activations for the next step)
from . import inductor_cache  # noqa: F401  (torch.compile's kernels cached apart under a CPU capability cap)
# isort: on
from . import viz
from .analytic import GaussianMixture
from .config import load_config
from .losses import training_losses
from .models import DiffusionModel, load
from .parameterization import Denoiser
from .pipelines import GuidanceRequest, Stage, cascade, generate, super_resolve
from .process import q_posterior_mean_variance, q_sample
from .sampling import SampleResult, sample
from .schedules import NoiseSchedule

__all__ = ["Denoiser", "DiffusionModel", "GaussianMixture", "GuidanceRequest", "NoiseSchedule", "SampleResult", "Stage", "cascade", "generate",
           "load", "load_config", "q_posterior_mean_variance", "q_sample", "sample", "super_resolve", "training_losses", "viz"]
