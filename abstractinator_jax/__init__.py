"""abstractinator_jax: the Abstractinator (hierarchical byte-level autoencoder and LM) in JAX/Flax."""

__version__ = "0.1.0"
