"""Task sources and LightningDataModules."""
