"""Evaluation tasks (train/eval_tasks.py) and ``python -m train.eval`` end to end on a tiny run."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from train.eval import EvalConfig, EvalSettings, Target, evaluate_targets, set_attention
from train.eval_tasks import bucket_losses, log_position_edges, passkey_sample

from .conftest import REPO, run_train, small_data_args


class CharTokenizer:
    """One token per character (id = code point): token positions can be checked by hand."""

    def encode(self, text):
        return [ord(c) for c in text]


def test_position_buckets_average_exactly_the_losses_they_cover():
    assert log_position_edges(100) == [0, 16, 32, 64, 100]
    assert log_position_edges(64) == [0, 16, 32, 64]
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    pos = torch.tensor([0, 15, 16, 31, 32, 63, 99])
    got = bucket_losses(losses, pos, [0, 16, 32, 64, 100])
    assert [(b["lo"], b["hi"], b["tokens"]) for b in got] == [(0, 16, 2), (16, 32, 2), (32, 64, 2), (64, 100, 1)]
    assert [b["loss"] for b in got] == [1.5, 3.5, 5.5, 7.0]
    assert bucket_losses(losses, pos, [0, 200, 300])[1]["loss"] is None


@pytest.mark.parametrize("depth,start", [pytest.param(0.0, 0, id="d0"), pytest.param(0.5, 25, id="d0.5"),
                                         pytest.param(1.0, 50, id="d1"), pytest.param(0.3, 15, id="d0.3")])
def test_passkey_generator_places_the_key_at_the_asked_depth(depth, start):
    tok = CharTokenizer()
    filler = [ord(c) for c in "abcdefghij"]  # wraps around
    needle = "\nThe pass key is 12345. Remember it. 12345 is the pass key.\n"
    question = "\nWhat is the pass key? The pass key is"
    length = len(needle) + len(question) + len(" 12345") + 50  # 50 filler tokens
    s = passkey_sample(filler, tok, length, depth, "12345", offset=3)
    text = "".join(map(chr, s["input_ids"]))
    assert len(s["input_ids"]) + len(s["answer_ids"]) == length
    assert s["needle_start"] == start and text[start:start + len(needle)] == needle
    assert s["key_start"] == start + len("\nThe pass key is ") and text[s["key_start"]:s["key_start"] + 5] == "12345"
    hay = "defghijabc" * 5  # offset 3 of the filler, wrapped
    assert text[:start] + text[start + len(needle):-len(question)] == hay
    assert text.endswith(question) and "".join(map(chr, s["answer_ids"])) == " 12345"
    with pytest.raises(ValueError, match="eval.lengths holds 20"):
        passkey_sample(filler, tok, 20, depth, "12345")


def _eval(args, check=True):
    env = {**os.environ, "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "train.eval", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.eval failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def test_eval_command_end_to_end(tmp_path, small_corpus):
    """A tiny MoBA run (block 32, top-2, evaluation tasks during training) then ``python -m train.eval`` on
    the run dir and on its checkpoint: eval.json with every task, PNGs that open, eval.jsonl's task metrics."""
    import matplotlib.image

    run = tmp_path / "run"
    run_train([*small_data_args(small_corpus), "train.max_steps=2", "moba.top_k=2", "checkpoint.export_hf=true",
               "train.eval_tasks=[position,routing]"], run, small_corpus[1])
    evals = [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2]
    assert "tail_loss/256" in evals[-1] and 0 < evals[-1]["recall/256"] < 1

    proc = _eval([str(run), "eval.lengths=[128,256]", "eval.num_docs=2", "eval.depths=[0,0.5,1]",
                  "eval.trials=1", "eval.queries=16", "progress_bar=on"])
    assert "eval run" in proc.stderr  # the progress bar
    rec = json.loads((run / "eval.json").read_text())
    assert rec["step"] == 2 and rec["weights"].endswith("hf") and rec["attention"]["moba_layers"] == [0, 1]
    res = rec["results"]
    pos = res["position"]["256"]
    assert [b["lo"] for b in pos["buckets"]] == [0, 16, 32, 64, 128]
    assert sum(b["tokens"] for b in pos["buckets"]) > 0 and pos["tail_from"] == 128
    pk = res["passkey"]
    assert pk["lengths"] == [128, 256] and len(pk["accuracy"]) == 2 and len(pk["accuracy"][0]) == 3
    assert all(0 <= a <= 1 for row in pk["accuracy"] for a in row)
    layers = res["routing"]["256"]["layers"]
    assert [layer["layer"] for layer in layers] == [0, 1] and all(0 < layer["recall"] < 1 for layer in layers)
    assert sum(layers[0]["distance_hist"]) == sum(layers[0]["block_chosen"]) > 0
    for name in ("eval_position_loss.png", "eval_passkey.png", "eval_routing.png"):
        img = matplotlib.image.imread(run / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100

    # In-process (no second start-up): a checkpoint evaluates to the same losses as the export of the same
    # step; under full attention the recall stays defined per layer (what MoBA would choose) while no layer
    # runs MoBA, so the mean over MoBA layers is None.
    out = tmp_path / "ckpt_eval"
    out.mkdir()
    (out / "eval_passkey.png").write_bytes(b"a former call's plot")  # passkey is not run below: it must go
    cfg = EvalConfig(eval=EvalSettings(targets=[str(run / "checkpoints" / "step_00000002")], lengths=[256], num_docs=2,
                                       tasks=["position", "routing"], queries=16, out_dir=str(out), attention="full",
                                       compare=[str(run)]), progress_bar="off")
    assert evaluate_targets(cfg) == [out / "eval.json"]
    full = json.loads((out / "eval.json").read_text())
    assert full["attention"]["moba_layers"] == [] and full["results"]["routing"]["256"]["recall"] is None
    assert (out / "eval_position_loss.png").is_file() and not (out / "eval_passkey.png").exists()
    first = full["results"]["position"]["256"]["buckets"][0]
    assert first["loss"] == pytest.approx(pos["buckets"][0]["loss"], rel=1e-5)  # first block: MoBA == full


@pytest.mark.parametrize("kwargs,message", [
    pytest.param(dict(tasks=["possition"]), "eval.tasks=['possition']", id="task"),
    pytest.param(dict(depths=[1.5]), "eval.depths=[1.5]", id="depth"),
    pytest.param(dict(lengths=[1]), "eval.lengths=[1]", id="length"),
    pytest.param(dict(attention="sparse"), "eval.attention='sparse'", id="attention"),
])
def test_bad_eval_settings(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        EvalSettings(**kwargs)


def test_bad_target(tmp_path):
    with pytest.raises(ValueError, match="is neither a run directory"):
        evaluate_targets(EvalConfig(eval=EvalSettings(targets=[str(tmp_path)])))


def test_bad_cudnn_environment_stops_before_any_target(tmp_path, monkeypatch):
    """A bad MOBA_CUDNN_MIN_SEQLEN used to surface at the first attention call, after the model was loaded."""
    from moba_core.varlen import cudnn_env

    monkeypatch.setenv("MOBA_CUDNN_MIN_SEQLEN", "4k")
    with pytest.raises(ValueError) as expected:
        cudnn_env()
    with pytest.raises(ValueError) as got:
        evaluate_targets(EvalConfig(eval=EvalSettings(targets=[str(tmp_path)])))  # not a target: not reached
    assert str(got.value) == str(expected.value) and "MOBA_CUDNN_MIN_SEQLEN" in str(got.value)


def test_package_documents_from_a_corpus_without_folders_are_refused_naming_the_setting(tmp_path):
    """eval.documents=package on a run that trained on a prepared directory (read as it is: the setting was
    silently ignored) or with eval.data_path a table file stops before the model is loaded."""
    from train.config import DataConfig, RunConfig
    from train.eval import tokenizer_and_data

    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "prepared.json").write_text("{}")
    run = Target(tmp_path, tmp_path, "checkpoint", tmp_path, RunConfig(data=DataConfig(path=str(prepared))), 2)
    with pytest.raises(ValueError, match=re.escape(f"eval.documents=package groups the files of a directory (or "
                                                   f"the stdlib) by top-level folder; the run's data.path={prepared} "
                                                   "is a prepared directory")):
        tokenizer_and_data(run, EvalSettings(documents="package"))
    table = tmp_path / "docs.jsonl"
    table.write_text('{"text": "a b c"}\n')
    with pytest.raises(ValueError, match=re.escape(f"eval.data_path={table} is a table file")):
        tokenizer_and_data(run, EvalSettings(documents="package", data_path=str(table)))
    with pytest.raises(ValueError, match="holds no tokenizer"):  # module level passes the check
        tokenizer_and_data(run, EvalSettings(documents="module"))
    # a run trained at package level (stdlib) evaluated on a table: the run's setting is named, and the fix
    package_run = Target(tmp_path, tmp_path, "checkpoint", tmp_path,
                         RunConfig(data=DataConfig(documents="package")), 2)
    with pytest.raises(ValueError, match=re.escape(f"the run's data.documents=package groups the files of a directory "
                                                   f"(or the stdlib) by top-level folder; eval.data_path={table} is a "
                                                   "table file: use eval.documents=module")):
        tokenizer_and_data(package_run, EvalSettings(data_path=str(table)))


def test_default_lengths_quarter_half_and_trained():
    from train.eval import default_lengths

    assert default_lengths(1024) == [256, 512, 1024]
    assert default_lengths(200) == [100, 200]  # 50 is below the 64-token floor


def test_lengths_beyond_training_or_positions_are_named():
    """eval.lengths above the run's data.seq_len (extrapolation) and above max_position_embeddings are named,
    each with the lengths concerned; lengths within both, or no run to compare with, give no warning."""
    from train.eval import length_warnings

    assert length_warnings([256, 1024], 1024, 4096, "r") == []
    assert length_warnings([8192], None, None, "hf") == []
    (extra,) = length_warnings([512, 2048, 4096], 1024, 4096, "r")
    assert "eval.lengths [2048, 4096] exceed the data.seq_len=1024 it trained at" in extra
    extra, past = length_warnings([512, 8192], 1024, 4096, "r")
    assert "[8192] exceed the data.seq_len=1024" in extra and "[8192] exceed its max_position_embeddings=4096" in past
    (default,) = length_warnings([256, 512, 1024], None, 512, "hf", given=False)
    assert "the default eval.lengths (set eval.lengths to choose) [1024] exceed its max_position_embeddings" in default


def test_exported_model_is_evaluated_with_its_recorded_moba_settings(tmp_path):
    """An HF directory without a run (an export copied elsewhere) runs with the ``moba`` dict of its config;
    ``moba.*`` given on the command line replace single fields of it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1)
    cfg.moba = {"block_size": 48, "top_k": 2, "full_attn_layers": [1], "layers": {"2": {"top_k": 4}},
                "group_routing": True, "decode": "full"}
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    lm = LlamaForCausalLM.from_pretrained(tmp_path / "m")
    target = Target(tmp_path / "m", tmp_path / "m", "hf", None, None, None)
    info = set_attention(lm, target, EvalConfig(), {})
    assert info == {"moba_layers": [0, 2], "block_size": 48, "top_k": 2}
    mods = lm.model.layers
    assert [m.self_attn.moba_enabled for m in mods] == [True, False, True]
    c0, c2 = mods[0].self_attn.moba_config, mods[2].self_attn.moba_config
    assert (c0.block_size, c0.top_k, c0.group_routing, c0.decode) == (48, 2, True, "full")
    assert (c2.block_size, c2.top_k) == (48, 4)
    info = set_attention(lm, target, EvalConfig(), {"top_k": 3, "full_attn_layers": []})
    assert info == {"moba_layers": [0, 1, 2], "block_size": 48, "top_k": 3}
    assert (mods[0].self_attn.moba_config.top_k, mods[2].self_attn.moba_config.top_k) == (3, 4)


def test_targets_from_argv_leaves_hydra_flag_values():
    """Positional targets become one ``eval.targets`` override; the value of a Hydra flag (``--cfg job``, ``-cn
    eval``, ``--info config``) stays with its flag (it was taken for a target, and Hydra then lacked it)."""
    from train.eval import _targets_from_argv

    assert _targets_from_argv(["runs/a", "--cfg", "job", "eval.seq_lens=[64]", "runs/b"]) == [
        "--cfg", "job", "eval.seq_lens=[64]", "eval.targets=['runs/a','runs/b']"]
    assert _targets_from_argv(["-cn", "eval", "--info", "config", "-m", "it's"]) == [
        "-cn", "eval", "--info", "config", "-m", "eval.targets=['it\\'s']"]
    assert _targets_from_argv(["--info", "runs/a"]) == ["--info", "eval.targets=['runs/a']"]


def test_a_target_path_with_equals_signs_stays_a_target(tmp_path):
    """Sweep job folders are named after their settings (``3_moba.top_k=3``): an existing path is a target even
    with ``=`` in it; a setting (no such path) stays a setting."""
    from train.eval import _targets_from_argv

    job = tmp_path / "3_moba.block_size=128,moba.top_k=3"
    job.mkdir()
    assert _targets_from_argv([str(job), "eval.trials=1"]) == ["eval.trials=1", f"eval.targets=['{job}']"]


def test_eval_cfg_job_prints_the_config():
    """``python -m train.eval --cfg job TARGET`` prints the composed config with the target, as Hydra's flag does."""
    proc = subprocess.run([sys.executable, "-m", "train.eval", "--cfg", "job", "runs/some_run"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "targets:" in proc.stdout and "runs/some_run" in proc.stdout


def test_eval_bad_setting_prints_the_error_alone():
    """A bad eval setting exits 1 with ``error: <the setting and value>``, not Hydra's traceback of our check."""
    proc = subprocess.run([sys.executable, "-m", "train.eval", "runs/some_run", "eval.trials=0"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "error: eval.trials=0 must be >= 1" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        pytest.param(["runs/no_such_run"], "error: eval.targets: runs/no_such_run does not exist", id="missing-target"),
        pytest.param([], "error: no target: python -m train.eval", id="no-target"),
        pytest.param(["runs/x", "eval.lenghts=[256]"], "error: eval.lenghts is not a setting (did you mean "
                     "eval.lengths?)", id="typo"),
        pytest.param(["runs/x", "+eval.foo=1"], "error: eval.foo is not a setting; eval has: targets", id="added-key"),
    ],
)
def test_eval_bad_target_or_key_prints_the_error_alone(args, message):
    """Errors of the targets (found while loading them) and mistyped keys come as ``error: ...``, exit 1, no
    traceback, like the settings' own checks."""
    proc = subprocess.run([sys.executable, "-m", "train.eval", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_a_bad_row_in_eval_data_path_is_named_by_setting_file_and_line(tmp_path, init_checkpoint):
    """A table at ``eval.data_path`` with a row that is not text: a ConfigError when the length is first read,
    naming the setting, the file and the line (the corpus reader's own ``data.path=`` is not what the user set)."""
    from train.config import ConfigError
    from train.eval import tokenizer_and_data

    table = tmp_path / "docs.jsonl"
    table.write_text('{"text": "alpha beta gamma"}\n{"text": 5}\n')
    hf = Target(init_checkpoint, init_checkpoint, "hf", None, None, None)
    _, val_at = tokenizer_and_data(hf, EvalSettings(data_path=str(table), cache_dir=str(tmp_path / "cache")))
    message = f"eval.data_path: {table}: line 2 field 'text': expected a string"
    with pytest.raises(ConfigError, match=re.escape(message)):
        val_at(64)
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(ValueError, match=re.escape(f"eval.data_path: {missing} does not exist")):
        tokenizer_and_data(hf, EvalSettings(data_path=str(missing)))
