"""Reverse-distilled protein language model embeddings: families, fit, artifacts, projection.

Nothing here knows about HTTP; the service in ``app`` calls into this package.
"""

__version__ = "0.1.0"
