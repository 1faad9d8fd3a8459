"""Integrations with training libraries: ``fastdpo.integrations.trl``."""
