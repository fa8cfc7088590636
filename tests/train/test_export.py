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


@pytest.mark.parametrize("zero", [pytest.param(z, id=f"zero{z}") for z in (0, 1, 3)])
def test_export_equals_the_training_model_and_records_moba(tmp_path, small_corpus, zero):
    run_dir = tmp_path / "run"
    run_train([*small_data_args(small_corpus), f"parallel.zero_stage={zero}", "train.max_steps=2",
               "checkpoint.every=1", "checkpoint.export_hf=true", "moba.full_attn_layers=[1]",
               "model.rope_scaling={rope_type:linear,factor:2.0}", "data.packing=pad"], run_dir, small_corpus[1])
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
    assert export_main([str(run_dir / "checkpoints" / "step_00000001"), str(tmp_path / "s1")]) == 0
    with torch.no_grad():
        c = load_moba_model(tmp_path / "s1")(ids).logits
    assert not torch.allclose(a, c)


def test_export_of_a_path_without_checkpoint_names_it(tmp_path, capsys):
    assert export_main([str(tmp_path), str(tmp_path / "out")]) == 2
    assert f"{tmp_path} is neither a checkpoint" in capsys.readouterr().err
