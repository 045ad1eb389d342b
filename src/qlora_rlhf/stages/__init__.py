"""Thin stage entries for the foundation verbs (the training stages are modules of their own)."""
