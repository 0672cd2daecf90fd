"""Token pruners: the per-layer keep decisions plugged into the engine."""
