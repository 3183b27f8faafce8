"""The diffusion PET/CT family (in progress): so far the global-noise DDIM sampler (``sampler.py``)."""
