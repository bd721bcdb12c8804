"""Integrations of ckpt with training frameworks (installed from the top-level integrations/ folder)."""
