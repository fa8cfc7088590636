"""Every shipped config composes into the typed schema; the SLURM launcher config composes."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from train.__main__ import to_run_config
from train.config import RunConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
GROUP_CHOICES = [
    f"{group.name}={f.stem}"
    for group in sorted(CONFIGS.iterdir())
    if group.is_dir() and group.name != "hydra"
    for f in sorted(group.glob("*.yaml"))
]


@pytest.mark.parametrize("choice", GROUP_CHOICES)
def test_every_group_option_composes(choice):
    with initialize_config_dir(str(CONFIGS), version_base=None):
        cfg = to_run_config(compose("config", overrides=[choice]))
    assert isinstance(cfg, RunConfig)


def test_paper_recipe_values():
    with initialize_config_dir(str(CONFIGS), version_base=None):
        cfg = to_run_config(compose("config", overrides=["model=llama3_8b", "moba=paper_1m"]))
    assert (cfg.moba.block_size, cfg.moba.top_k, cfg.moba.full_layer_indices()) == (4096, 12, [-3, -2, -1])
    assert cfg.model.num_kv_heads == 8 and cfg.model.rope_theta == 500000.0


def test_slurm_launcher_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(str(CONFIGS), version_base=None):
        cfg = compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher)
    assert launcher["_target_"].endswith("SlurmLauncher") and launcher["tasks_per_node"] == 8
