"""Configuration searches over trained models: grids, Length-Adaptive evolution, Pareto fronts, the evaluation cache."""
