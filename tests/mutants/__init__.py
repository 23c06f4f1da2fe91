"""Mutation runs of the model-based test: each planted bug must make it fail (see run.py)."""
