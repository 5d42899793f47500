"""Datasets and signal processing for the two views."""
