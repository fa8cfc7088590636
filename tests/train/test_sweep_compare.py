"""Sweeps: short job folders named after the swept keys only, the full overrides in config.json; and
``python -m train.compare`` on a two-point CPU sweep (table, markdown, PNG)."""

import json

import matplotlib.pyplot as plt
import pytest
from omegaconf import OmegaConf

from train.compare import compared_settings, load_run
from train.compare import main as compare_main
from train.sweep import SUBDIR_MAX, job_subdir, sanitise, swept_keys

from .conftest import read_metrics, run_train


@pytest.mark.parametrize(
    "value,expect",
    [
        pytest.param("/data/corpus", "corpus", id="path"),
        pytest.param("'/data/my corpus/'", "my-corpus", id="quoted-path-with-space"),
        pytest.param("[0,1]", "0-1", id="list"),
        pytest.param("3.0e-4", "3.0e-4", id="float"),
        pytest.param("x" * 40, "x" * 24, id="long"),
    ],
)
def test_sanitise(value, expect):
    assert sanitise(value) == expect


def test_job_subdir_names_the_swept_keys_only():
    overrides = ["data.path=/data/corpus", "moba.block_size=64", "train.max_steps=5", "resume=auto"]
    assert job_subdir(3, overrides, ["moba.block_size"]) == "3_moba.block_size=64"
    assert job_subdir(3, overrides, ["data.path", "moba.block_size"]) == "3_data.path=corpus,moba.block_size=64"
    assert job_subdir(0, overrides, []) == "0"
    assert job_subdir(1, overrides, None) == "1_data.path=corpus,moba.block_size=64,train.max_steps=5"


def test_job_subdir_is_bounded_without_slashes():
    overrides = [f"group{i}.some_long_setting_name=/very/long/path/value_{i}_{'z' * 30}" for i in range(20)]
    keys = [o.split("=")[0] for o in overrides]
    a, b = job_subdir(12, overrides, keys), job_subdir(12, overrides[:-1] + ["group19.some_long_setting_name=1"], keys)
    assert len(a) <= SUBDIR_MAX and "/" not in a and a.startswith("12_group0.some_long_setting_name=value_0_")
    assert a != b  # cut names keep a hash of the whole


def test_swept_keys_from_multirun_yaml(tmp_path):
    task = ["a.b=1,2", "c=3", "d=range(1,3)", "e=/x/y", "f=choice(1,2)", "hydra.launcher.nodes=1,2"]
    OmegaConf.save(OmegaConf.create({"hydra": {"overrides": {"task": task}}}), tmp_path / "multirun.yaml")
    assert swept_keys(tmp_path) == ["a.b", "d", "f"]
    assert swept_keys(tmp_path / "missing") is None


def test_two_point_cpu_sweep_and_its_comparison(tmp_path, data_cache, capsys):
    """A sweep of two block sizes with a path among its overrides and the reversed gradual schedule: two
    short job folders; the comparison's numbers are those of each job's eval.jsonl and metrics.jsonl."""
    sweep = tmp_path / "sweep"
    run_train([f"hydra.sweep.dir={sweep}", f"data.cache_dir={data_cache}", "train.max_steps=4",
               "train.eval_every=2", "schedule=gradual", "schedule.start_fraction=0", "schedule.end_fraction=1",
               "schedule.reverse=true", "moba.block_size=16,32", "-m"],  # -m last: after the overrides
              tmp_path / "unused", data_cache)
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0_moba.block_size=16", "1_moba.block_size=32"]
    for i, name in enumerate(jobs):
        cfg = json.loads((sweep / name / "config.json").read_text())
        assert f"data.cache_dir={data_cache}" in cfg["overrides"] and "schedule.reverse=True" in cfg["overrides"]
        assert cfg["sweep"]["job"] == i and cfg["sweep"]["swept"] == {"moba.block_size": ["16", "32"][i]}
        assert cfg["moba"]["block_size"] == [16, 32][i]
        # reversed over the window [0, 4): layer 0 switches to full at step 0, layer 1 at 0 + ceil(4 / 2) = 2
        assert [m["moba_layer_ids"] for m in read_metrics(sweep / name)] == [[1], [1], [], []]

    assert compare_main([str(sweep)]) == 0
    table = capsys.readouterr().out
    lines = [line for line in table.splitlines() if line.startswith("| ") and "_moba" in line]
    rows = [line.split(" | ") for line in lines]
    assert [r[0].strip("| ") for r in rows] == jobs
    for name, row in zip(jobs, rows):
        evals = [json.loads(x) for x in (sweep / name / "eval.jsonl").read_text().splitlines()]
        best = min(evals, key=lambda e: e["val_loss"])
        assert [e["step"] for e in evals] == [0, 2, 4]
        assert row[1] == name.split("=")[1] and row[2] == "4"
        assert row[3] == f"{evals[-1]['val_loss']:.4f}" and row[4] == f"{best['val_loss']:.4f} ({best['step']})"
        assert row[5] == f"{evals[-1]['val_loss_tail']:.4f}"
        assert row[6] == f"{read_metrics(sweep / name)[-1]['loss']:.4f}"
    md = (sweep / "compare.md").read_text()
    assert all(line in md.splitlines() for line in lines)
    image = plt.imread(sweep / "compare.png")
    assert image.shape[1] > image.shape[0] > 300  # two panels side by side


def test_compare_refuses_a_directory_without_runs(tmp_path, capsys):
    assert compare_main([str(tmp_path)]) == 2
    assert f"RUN_DIR {tmp_path} is neither a run directory" in capsys.readouterr().err


def test_compared_settings_are_the_swept_keys_then_the_other_differences(tmp_path):
    """A sweep job (swept: model, moba.block_size) beside a plain run: the swept keys first (a swept group's
    own keys left out), then the other settings that differ; records of the launch are never settings."""
    runs = {"a": {"model": {"name": "tiny", "num_layers": 4}, "moba": {"block_size": 32, "top_k": 3},
                  "overrides": ["model=tiny"], "sweep": {"swept": {"model": "tiny", "moba.block_size": "32"}}},
            "b": {"model": {"name": "llama_1b", "num_layers": 16}, "moba": {"block_size": 32, "top_k": 2},
                  "overrides": [], "sweep": None, "data_identity": {"corpus": "x"}}}
    for name, cfg in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
    assert compared_settings([load_run(tmp_path / n) for n in runs]) == ["model", "moba.block_size", "moba.top_k"]
