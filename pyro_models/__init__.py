"""Deep generative models in Pyro, one subpackage each: the VAE family (:mod:`.vae`), the Kalman VAE
(:mod:`.kvae`), the hierarchical recurrent state-space model of Variational Temporal Abstraction
(:mod:`.hrssm`) and the deep Markov model (:mod:`.dmm`). Shared parts: distributions, networks, KL
weights, exact linear-Gaussian state-space inference (:mod:`.lgssm`) and the data sets
(:mod:`.datasets`). Nothing here imports training, plotting or run directories (:mod:`inference`)."""
from .dmm import DMM, DMMConfig, DMMGuide, build_dmm
from .hrssm import HRSSM, HRSSMConfig, HRSSMGuide, build_hrssm
from .kvae import KVAE, KVAEConfig, KVAEGuide, build_kvae
from .vae import ARCHITECTURES, GUIDES, VAE, IAFGuide, KLWeights, NormalGuide, VAEConfig, build_vae, sample_latent

__all__ = [
    "ARCHITECTURES", "GUIDES", "VAE", "IAFGuide", "KLWeights", "NormalGuide", "VAEConfig", "build_vae", "sample_latent",
    "KVAE", "KVAEConfig", "KVAEGuide", "build_kvae",
    "HRSSM", "HRSSMConfig", "HRSSMGuide", "build_hrssm",
    "DMM", "DMMConfig", "DMMGuide", "build_dmm",
]
