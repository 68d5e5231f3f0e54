"""Layers on the kernels: the Keras-style NumPy layer and population statistics."""
