"""The method LightningModules (one file each) and what they share (base, metrics, callbacks)."""
