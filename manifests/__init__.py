"""Manifest, label and corpus creation scripts."""
