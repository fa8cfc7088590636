"""``python -m train.export``: a ZeRO checkpoint becomes an HF directory that reloads with MoBA in one line and
gives the training model's logits."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moba_core import MoBAConfig
from moba_core.hf import apply_moba, load_moba_model
from train.export import main as export_main

from .conftest import run_train, small_data_args


@pytest.mark.parametrize("zero,nproc,sp", [
    pytest.param(0, 1, 1, id="zero0"), pytest.param(1, 1, 1, id="zero1"), pytest.param(3, 1, 1, id="zero3"),
    # two ranks: ZeRO-2 partitions of two data-parallel ranks, ZeRO-3 shards of a sequence-parallel pair
    pytest.param(2, 2, 1, id="zero2-dp2"), pytest.param(3, 2, 2, id="zero3-sp2")])
def test_export_equals_the_training_model_and_records_moba(tmp_path, small_corpus, zero, nproc, sp):
    run_dir = tmp_path / "run"
    # ZeRO-1: checkpoints kept outside the run dir (checkpoint.dir), found through the run's config.json
    ckpt_root = tmp_path / "elsewhere" if zero == 1 else run_dir / "checkpoints"
    run_train([*small_data_args(small_corpus), f"parallel.zero_stage={zero}", f"parallel.sp_size={sp}",
               "train.max_steps=2", "train.micro_batch_size=1", "checkpoint.every=1", "checkpoint.export_hf=true",
               "moba.full_attn_layers=[1]", "model.rope_scaling={rope_type:linear,factor:2.0}", "data.packing=pad",
               *([f"checkpoint.dir={ckpt_root}"] if zero == 1 else [])],
              run_dir, small_corpus[1], nproc=nproc)
    out = tmp_path / "exported"
    assert export_main([str(run_dir), str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["moba"] == {"block_size": 32, "top_k": 3, "full_attn_layers": [1], "layers": {},
                           "group_routing": False, "decode": "moba"}
    assert cfg["rope_parameters"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    tok = small_corpus[2]
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_id and (out / "tokenizer.model").is_file()
    assert json.loads((out / "moba_export.json").read_text())["step"] == 2
    hf_tok = AutoTokenizer.from_pretrained(out)  # the exported directory is complete for AutoTokenizer
    text = "alpha beta gamma\nreturn class"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (tok.bos_id, tok.eos_id)

    exported = load_moba_model(out).eval()
    # The loop's own end-of-run export holds the training module's parameters at step 2.
    trained = AutoModelForCausalLM.from_pretrained(run_dir / "hf").eval()
    apply_moba(trained, MoBAConfig(block_size=32, top_k=3, full_attn_layers=[1]))
    assert [layer.self_attn.moba_enabled for layer in exported.model.layers] == [True, False]
    ids = torch.randint(0, tok.vocab_size, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = exported(ids).logits, trained(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    gen = exported.generate(ids[:, :40], max_new_tokens=3, do_sample=False)  # with its generation config
    assert gen.shape[1] <= 43 and torch.equal(gen[:, :40], ids[:, :40])
    # An earlier checkpoint, named directly, differs.
    assert export_main([str(ckpt_root / "step_00000001"), str(tmp_path / "s1")]) == 0
    with torch.no_grad():
        c = load_moba_model(tmp_path / "s1")(ids).logits
    assert not torch.allclose(a, c)


def test_weights_are_written_one_decoder_layer_per_shard(tmp_path, monkeypatch):
    """The host holds one layer's fp32 weights at a time: each safetensors write carries the tensors of one
    layer (or one non-layer tensor), each tensor is materialised once, and the index names every weight."""
    import safetensors.torch

    from train import export as ex

    names = ["lm.model.embed_tokens.weight", *(f"lm.model.layers.{i}.{p}" for i in range(3)
             for p in ("self_attn.q_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight")),
             "lm.model.layers.10.mlp.up_proj.weight", "lm.model.norm.weight", "lm.lm_head.weight"]
    made = []

    class Lazy:  # as DeepSpeed's GatheredTensor: materialised by .contiguous()
        def __init__(self, name, value):
            self.name, self.value = name, value

        def contiguous(self):
            made.append(self.name)
            return self.value

    state = {n: Lazy(n, torch.full((2, 3), float(i), dtype=torch.bfloat16)) for i, n in enumerate(names)}
    writes = []
    real_save = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file",
                        lambda d, f, **kw: (writes.append(sorted(d)), real_save(d, f, **kw)))
    ex.write_weights(state, tmp_path, tied=True)
    assert sorted(made) == sorted(names[:-1])  # the tied LM head is left out, every other tensor read once
    assert writes == [["model.embed_tokens.weight"],
                      *([f"model.layers.{i}.{p}" for p in ("input_layernorm.weight", "mlp.up_proj.weight",
                                                           "self_attn.q_proj.weight")] for i in range(3)),
                      ["model.layers.10.mlp.up_proj.weight"], ["model.norm.weight"]]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(n[3:] for n in names[:-1])
    assert index["metadata"]["total_size"] == (len(names) - 1) * 6 * 4  # fp32 tensor bytes, headers not counted
    loaded = {}
    for shard in set(index["weight_map"].values()):
        loaded.update(safetensors.torch.load_file(tmp_path / shard))
    for i, n in enumerate(names[:-1]):
        assert loaded[n[3:]].dtype == torch.float32 and torch.equal(loaded[n[3:]], torch.full((2, 3), float(i)))


def test_export_of_a_path_without_checkpoint_names_it(tmp_path, capsys):
    assert export_main([str(tmp_path), str(tmp_path / "out")]) == 2
    assert f"{tmp_path} is neither a checkpoint" in capsys.readouterr().err
    assert export_main([str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert f"{tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err
    run = tmp_path / "run"  # a run that saved no checkpoint (checkpoint.enabled=false) but exported at its end
    (run / "hf").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    assert export_main([str(run), str(tmp_path / "out")]) == 2
    assert (f"{run} is a run directory without checkpoints in {run / 'checkpoints'} (a run with "
            f"checkpoint.enabled=false, or stopped before its first save); its end-of-run export is {run / 'hf'}"
            in capsys.readouterr().err)


def test_an_out_dir_that_export_would_destroy_is_refused(tmp_path, capsys):
    """The out dir is replaced whole: the run dir itself, its checkpoints, a file or a directory of other files
    are refused before anything is read or written (``export runs/x runs/x`` used to delete the run)."""
    from train.export import check_out_dir

    run = tmp_path / "run"
    tag = run / "checkpoints" / "step_00000002"
    tag.mkdir(parents=True)
    (tag / "manifest.json").write_text("{}")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    for out in (run, run / "checkpoints", tag):
        assert export_main([str(run), str(out)]) == 2
        assert f"out dir {out} holds the checkpoint being exported ({tag})" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("mine")
    assert export_main([str(run), str(tmp_path / "notes.txt")]) == 2
    assert "notes.txt is a file" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.bin").write_text("mine")
    assert export_main([str(run), str(other)]) == 2
    assert f"out dir {other} already holds files and is not an earlier export" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n' and (tag / "manifest.json").is_file()
    assert (other / "data.bin").read_text() == "mine" and (tmp_path / "notes.txt").read_text() == "mine"
    (other / "data.bin").unlink()
    check_out_dir(other, tag)  # an empty directory
    (other / "moba_export.json").write_text('{"step": 1}')
    (other / "model.safetensors").write_text("old")
    check_out_dir(other, tag)  # an earlier export is replaced
    check_out_dir(tmp_path / "new", tag)


@pytest.fixture
def umask():
    """``os.umask`` for one test: the umask it sets is put back after the test."""
    import os

    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_exported_weights_get_the_modes_of_a_plain_open(tmp_path, umask, mask, mode):
    """safetensors writes through a temporary file (mode 0600): other users of a shared model directory
    could not read the weights. Every file of the export gets the mode open() gives under the umask."""
    import stat

    from train import export as ex

    umask(mask)
    one, many = tmp_path / "one", tmp_path / "many"
    for d, names in ((one, ["lm.model.norm.weight"]),
                     (many, ["lm.model.embed_tokens.weight", "lm.model.layers.0.mlp.up_proj.weight"])):
        d.mkdir()
        ex.write_weights({n: torch.ones(2, 2) for n in names}, d, tied=False)
    assert sorted(p.name for p in one.iterdir()) == ["model.safetensors"]
    assert sorted(p.name for p in many.iterdir()) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    for f in [*one.iterdir(), *many.iterdir()]:
        assert oct(stat.S_IMODE(f.stat().st_mode)) == oct(mode), f.name


def test_the_training_loops_export_gets_the_modes_of_a_plain_open(tmp_path, umask):
    """The end-of-run HF export (``train.loop.export_hf``, ``save_pretrained``: safetensors, 0600 before)."""
    import stat

    from transformers import LlamaConfig, LlamaForCausalLM

    from train.distributed import DistInfo
    from train.loop import export_hf

    class Tok:  # what export_hf uses of a tokenizer
        def save(self, d):
            (d / "tokenizer.model").write_bytes(b"sp")

    umask(0o022)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1))
    out = tmp_path / "hf"
    export_hf(None, lm, Tok(), out, DistInfo(0, 1, 0, 1, torch.device("cpu")), zero_stage=0, step=3)
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in out.iterdir()}
    assert "model.safetensors" in modes and "tokenizer.model" in modes
    assert modes == dict.fromkeys(modes, oct(0o644))
