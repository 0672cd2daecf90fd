"""The three Hydra apps: tokenprune-train, tokenprune-search, tokenprune-bench (and the compare script)."""
