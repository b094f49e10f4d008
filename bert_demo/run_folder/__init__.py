"""A run folder on disk: its files, safe writes, best weights with their dev predictions,
the copied encoder files, and loading a trained run back."""
