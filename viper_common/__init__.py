"""Code shared by the JAX trainer and the PyTorch synthesis jobs.

Imports neither JAX nor torch, so both sides (and their separate installs) can use it.
"""
