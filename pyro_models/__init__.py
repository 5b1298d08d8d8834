"""Deep generative models in Pyro: the VAE family (:mod:`.vae`), the Kalman VAE (:mod:`.kvae`) and the
hierarchical recurrent state-space model of Variational Temporal Abstraction (:mod:`.hrssm`).
Data sets are in :mod:`.datasets`."""
from .hrssm import HRSSM, HRSSMConfig, HRSSMGuide, build_hrssm
from .kvae import KVAE, KVAEConfig, KVAEGuide, build_kvae
from .vae import ARCHITECTURES, GUIDES, VAE, IAFGuide, KLWeights, NormalGuide, VAEConfig, build_vae, sample_latent

__all__ = [
    "ARCHITECTURES", "GUIDES", "VAE", "IAFGuide", "KLWeights", "NormalGuide", "VAEConfig", "build_vae", "sample_latent",
    "KVAE", "KVAEConfig", "KVAEGuide", "build_kvae",
    "HRSSM", "HRSSMConfig", "HRSSMGuide", "build_hrssm",
]
