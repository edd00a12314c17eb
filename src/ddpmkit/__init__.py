"""ddpmkit: denoising diffusion models, correct to the equation."""
from .analytic import GaussianMixture
from .losses import training_losses
from .parameterization import Denoiser
from .process import q_posterior_mean_variance, q_sample
from .sampling import SampleResult, sample
from . import viz
from .schedules import NoiseSchedule

__all__ = ["Denoiser", "GaussianMixture", "NoiseSchedule", "SampleResult", "q_posterior_mean_variance", "q_sample", "sample", "training_losses"]
