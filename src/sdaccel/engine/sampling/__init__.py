"""Sampling: schedulers from the catalogue, the denoising loop, its step policies and guider."""
