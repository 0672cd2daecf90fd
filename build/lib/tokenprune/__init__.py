"""Adaptive token pruning methods as LightningModules, on one prunable-encoder engine."""
