"""The engine: model loading, precision, compilation, samplers and the denoising loop.

Importing this package is cheap; torch and diffusers load when an Engine is built.
"""
