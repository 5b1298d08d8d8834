"""Deep generative models in Pyro: the VAE family (later: Kalman VAE, HRSSM)."""
from .vae import ARCHITECTURES, GUIDES, VAE, IAFGuide, KLWeights, NormalGuide, VAEConfig, build_vae, sample_latent

__all__ = ["ARCHITECTURES", "GUIDES", "VAE", "IAFGuide", "KLWeights", "NormalGuide", "VAEConfig", "build_vae", "sample_latent"]
