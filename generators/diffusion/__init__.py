"""Diffusion backends through diffusers: the shared pipeline plumbing, the model families, the noise
tables, the guiders, the ``sd`` sampling loop and the ``noise`` backend."""
