"""Hydra takes launchers only from the `hydra_plugins` namespace: this registers tokenprune's
SLURM launcher (`hydra/launcher=slurm`); its behaviour lives in tokenprune.apps.launcher."""

from tokenprune.apps.launcher import SlurmLauncher


class TokenpruneSlurmLauncher(SlurmLauncher):
    """hydra-submitit-launcher's SLURM launcher with checked requests and all failures reported."""
