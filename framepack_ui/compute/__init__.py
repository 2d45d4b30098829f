"""How the transformer and the VAE compute: compiled forwards, attention backends, fp8 Linear layers.

The memory plan decides (from `backends`, which imports no torch), the memory manager applies it once per load,
and the engine may ask how a lent model computes (for example whether the VAE decodes in even tiles).
"""
