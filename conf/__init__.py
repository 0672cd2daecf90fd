"""Hydra configuration tree (a package so installed entry points find it).

Hydra imports this package to read the configs, so what the configs name is registered here:
- the resolver `${tokenprune.precision:<accelerator>}` -> `32-true` on CPU, `bf16-mixed` on
  accelerators (conf/trainer/ddp.yaml: DDP over gloo on CPU stays 32-bit);
- the launcher class of `hydra/launcher=slurm`: Hydra takes launchers only from the
  `hydra_plugins` namespace, and its plugin scan does not see packages installed in editable mode.
"""

from hydra.core.plugins import Plugins
from omegaconf import OmegaConf

from hydra_plugins.tokenprune_launcher import TokenpruneSlurmLauncher

OmegaConf.register_new_resolver(
    "tokenprune.precision", lambda accelerator: "32-true" if accelerator == "cpu" else "bf16-mixed", replace=True
)
Plugins.instance().register(TokenpruneSlurmLauncher)
