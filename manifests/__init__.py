"""Manifest, label and corpus creation scripts, installed as ``siamctc_manifests``."""
