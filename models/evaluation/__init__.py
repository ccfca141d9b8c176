"""Supervised evaluation of (reverse-distilled) embeddings: ProteinGym DMS linear probes."""
