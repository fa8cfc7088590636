"""train.profile_step: one step under torch.profiler, its time split into the parts of a training step."""

import json
from types import SimpleNamespace

import pytest

from train.bench import main, summarize
from train.config import TrainLoopConfig
from train.profiling import CATEGORIES, category, split_events

from .conftest import SMALL, read_metrics, run_train, small_data_args


@pytest.mark.parametrize("name,expected", [
    ("void flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4, false>>(Flash_fwd_params)", "attention"),
    ("_dkdv_kernel", "attention"),
    ("_route_topk_kernel", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16", "attention"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "matmul"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", "matmul"),
    ("aten::mm", "matmul"),
    ("aten::addmm", "matmul"),
    ("liger_cross_entropy_kernel", "loss"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "communication"),
    ("_rms_norm_forward_kernel", "norm_rope_act"),
    ("_triton_rope", "norm_rope_act"),
    ("Memcpy DtoD (Device -> Device)", "copy"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", "other"),
])
def test_kernel_names_fall_in_their_part(name, expected):
    assert category(name) == expected


def test_split_sums_self_times_per_part_and_skips_cpu_records_on_device():
    ev = [SimpleNamespace(key="aten::mm", self_device_time_total=0.0, self_cpu_time_total=300.0, device_type="CPU"),
          SimpleNamespace(key="nvjet_tst_128x256", self_device_time_total=2000.0, self_cpu_time_total=0.0,
                          device_type="DeviceType.CUDA"),
          SimpleNamespace(key="_list_fwd_kernel", self_device_time_total=1500.0, self_cpu_time_total=0.0,
                          device_type="DeviceType.CUDA"),
          SimpleNamespace(key="some_kernel", self_device_time_total=500.0, self_cpu_time_total=0.0,
                          device_type="DeviceType.CUDA")]
    per_cat, rows = split_events(ev, on_device=True)
    assert set(per_cat) == set(CATEGORIES)
    assert (per_cat["matmul"], per_cat["attention"], per_cat["other"]) == (2.0, 1.5, 0.5)
    assert sum(per_cat.values()) == 4.0  # the CPU record of aten::mm is not counted on top of its kernel
    assert [r[0] for r in rows] == ["nvjet_tst_128x256", "_list_fwd_kernel", "some_kernel"]
    per_cat, _ = split_events(ev, on_device=False)  # CPU operators' self times
    assert per_cat["matmul"] == 0.3 and sum(per_cat.values()) == 0.3


def test_profile_step_outside_the_run_is_refused():
    with pytest.raises(ValueError, match=r"train.profile_step=7 must lie in \[0, train.max_steps=5\]"):
        TrainLoopConfig(max_steps=5, profile_step=7)
    with pytest.raises(ValueError, match="train.profile_step=-1"):
        TrainLoopConfig(max_steps=5, profile_step=-1)


def test_profiled_steps_are_left_out_of_the_benchmark_figures():
    """Steps 3-4 of 100 tokens at 100 and 200 tokens/s: 200 tokens in 1.5 s; step 5 ran under the profiler."""
    rows = [{"step": i + 1, "tokens": 100 * (i + 1), "tokens_per_s": tps, "mfu": None, "mem_gb": 1.0, "loss": 1.0}
            for i, tps in enumerate([10.0, 10.0, 100.0, 200.0, 1.0])]
    rows[-1]["profiled"] = True
    assert summarize(rows)["tokens_per_s"] == pytest.approx(200 / 1.5)


def test_profiled_step_is_left_out_of_the_figures_of_a_short_benchmark():
    """``--steps 3 --profile``: no unprofiled step after the first two, so the figures fall back to the steps
    before the profiled one (200 tokens in 10 s + 5 s), not to every step (which counted the profiled step)."""
    rows = [{"step": i + 1, "tokens": 100 * (i + 1), "tokens_per_s": tps, "mfu": None, "mem_gb": 1.0, "loss": 1.0}
            for i, tps in enumerate([10.0, 20.0, 100.0])]
    rows[-1]["profiled"] = True
    assert summarize(rows)["tokens_per_s"] == pytest.approx(200 / 15)  # steps 1-2, not the profiled step 3
    assert summarize(rows[-1:])["tokens_per_s"] == 100.0  # one step, profiled: the only one there is


def test_bench_profile_writes_the_split_of_an_extra_step(tmp_path, small_corpus):
    """``--steps 3 --profile`` on the CPU: a fourth step runs under torch.profiler; its split lands in the run
    directory, the JSON row and a second table; the step's metrics row says it was profiled, and the row's figures
    are those of step 3, the same step a run without ``--profile`` would measure."""
    md, js, root = tmp_path / "B.md", tmp_path / "train.json", tmp_path / "runs"
    small = [a for a in SMALL if not a.startswith(("data.seq_len", "moba.", "train.micro_batch_size"))]
    assert main(["--points", "256:32:2", "--steps", "3", "--model", "tiny", "--run-root", str(root), "--profile",
                 "--output", str(md), "--json", str(js), "--timeout", "300", "--", *small,
                 *small_data_args(small_corpus)]) == 0
    (row,) = json.loads(js.read_text())
    run = root / "256_32-2_sp1"
    split = json.loads((run / "profile_step4.json").read_text())
    assert split["device"] == "cpu" and split["step"] == 4
    assert sum(split["categories_ms"].values()) == pytest.approx(split["busy_ms"])
    assert split["categories_ms"]["matmul"] > 0 and split["categories_ms"]["attention"] > 0
    assert split["wall_ms"] > 0 and split["idle_ms"] == pytest.approx(split["wall_ms"] - split["busy_ms"])
    assert json.loads((run / split["trace"]).read_text())["traceEvents"]  # the Chrome trace
    assert row["profile_ms"]["matmul"] == split["categories_ms"]["matmul"]
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m.get("profiled", False) for m in metrics] == [False, False, False, True]
    assert row["tokens_per_s"] == pytest.approx(metrics[2]["tokens_per_s"])
    assert "| 256 | 1 | MoBA 32:2 | " in md.read_text() and "| attention | matmul |" in md.read_text()


def test_profile_step_with_grad_accum_and_eval_then_a_resume_past_it(tmp_path, small_corpus):
    """A profiled step of two micro-batches (train.grad_accum=2) with an evaluation after it, logged though
    train.log_every skips it; a resumed run whose train.profile_step lies before its first step says that it
    profiles nothing."""
    run = tmp_path / "run"
    data = small_data_args(small_corpus)
    run_train(["train.max_steps=3", "train.profile_step=2", "train.grad_accum=2", "train.eval_every=2",
               "train.log_every=5", *data], run, small_corpus[1])
    split = json.loads((run / "profile_step2.json").read_text())
    assert split["step"] == 2 and (run / "profile" / "step2_rank0.json").is_file()
    assert [(m["step"], m.get("profiled", False)) for m in read_metrics(run)] == [(2, True), (3, False)]
    proc = run_train(["train.max_steps=4", "train.profile_step=2", "train.grad_accum=2", *data], run,
                     small_corpus[1])
    out = proc.stdout + proc.stderr
    assert "train.profile_step=2 lies before this launch's first step (4): no step is profiled" in out
    assert [m.get("profiled", False) for m in read_metrics(run)] == [True, False, False]
