"""`make bench`'s sections run against today's interfaces, on tiny sizes.

The benchmark is run by hand, rarely, and only on a quiet machine: a section broken by a
change elsewhere (the cnn_memory probe once called a task without ``forward``) would
otherwise show only when someone needs the figures. The figures themselves are not
asserted (timing belongs to the benchmark, not to tests); their consistency is.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"


@pytest.fixture(scope="module")
def bench():
    """tools/bench.py as a module (it puts tools/ on sys.path and imports bench_cnn.py);
    sys.path and sys.modules are restored after the module's tests."""
    path = list(sys.path)
    spec = importlib.util.spec_from_file_location("aoq_bench", TOOLS / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path[:] = path
    sys.modules.pop("bench_cnn", None)


def test_train_step_section_times_the_engine_against_the_pre_engine_step(bench):
    result = bench.bench_train_step(32, repeats=1)
    assert result["step_ms"] > 0 and result["pre_engine_step_ms"] > 0
    # The ratio is of the unrounded times (to 0.001); the times are rounded to 0.1 ms, so
    # the ratio of the rounded times may differ from it by their rounding (over 1% for
    # steps of a few ms), and by no more.
    step, pre = result["step_ms"], result["pre_engine_step_ms"]
    rounding = step / pre * (0.05 / step + 0.05 / pre) + 0.0005
    assert abs(result["ratio_to_pre_engine"] - step / pre) <= rounding


def test_eval_and_offcandi_sections_run_on_small_embeddings(bench):
    ranks = bench.bench_eval(200, 16, sample=5)
    assert ranks["captions"] == 1000 and ranks["blocked_s"] >= 0
    mining = bench.bench_offcandi(2000, 16, sample=5)
    assert mining["captions"] == 10000
    assert [run["nprobe"] for run in mining["ivf"]] == list(bench.IVF_NPROBES)
    for run in mining["ivf"]:
        assert 0 < run["recall_at_k"]["i2t"] <= 1 and 0 < run["recall_at_k"]["t2i"] <= 1


def test_tsv_section_converts_a_generated_file(bench):
    (result,) = bench.bench_tsv((12,))
    assert result["rows"] == 12 and result["peak_rss_mib"] > 0


def test_cnn_finetune_section_times_our_step_against_torchvision(bench):
    result = bench.bench_cnn_towers.bench_finetune("mobilenet_v3_large", batch_size=2,
                                                   repeats=1)
    assert result["images_per_s"] > 0 and result["torchvision_images_per_s"] > 0


def test_cnn_memory_section_probes_fresh_processes_and_fits_a_batch(bench):
    (result,) = bench.bench_cnn_towers.bench_memory(plan=(("mobilenet_v3_large", (1, 3)),))
    small, large = result["probes"]
    assert (small["batch"], large["batch"]) == (1, 3)
    assert large["saved_for_backward_mib"] > small["saved_for_backward_mib"] > 0
    assert result["peak_mib_per_image"] == pytest.approx(
        (large["peak_rss_mib"] - small["peak_rss_mib"]) / 2, abs=0.05)
    # Activations only, so they scale with the batch (the weights, 37.7 MiB that autograd
    # saves too, would make batch 3 save about 2.1x batch 1's, not 3x).
    assert large["saved_for_backward_mib"] == pytest.approx(
        3 * small["saved_for_backward_mib"], rel=0.1)
    assert result["batch_fitting_80gb"] > 0


def test_memory_fit_takes_the_saved_tensors_when_the_peak_grows_less(bench):
    """VGG19's probes (their saved bytes as first measured, weights included): its small
    batch peaks in the optimiser's phase, so the slope of the peak (63.4 MiB/image) is below
    that of the tensors backward holds (75.25 MiB/image); the weights, saved at every batch,
    drop out of the slope."""
    probes = [{"batch": 8, "params_mib": 565.1, "peak_rss_mib": 4199,
               "saved_for_backward_mib": 1166},
              {"batch": 32, "params_mib": 565.1, "peak_rss_mib": 5720,
               "saved_for_backward_mib": 2972}]
    fit = bench.bench_cnn_towers.memory_fit("vgg19", probes)
    assert fit["peak_mib_per_image"] == 63.4
    assert fit["mib_per_image"] == round((2972 - 1166) / 24, 1)
    assert fit["batch_fitting_80gb"] == int((0.9 * 80 * 1024 - 4 * 565.1) / 75.25)
    assert fit["offline_batch_fitting_80gb"] == fit["batch_fitting_80gb"] // 3


def test_text_cache_section_reads_back_every_row(bench):
    result = bench.bench_text_cache(rows=300, width=8, added=10)
    assert result["read_rows"] == 300 and result["file_mb"] > 0
    assert min(result["read_s"], result["npy_load_s"], result["add_10_rows_s"]) >= 0


def test_mining_scale_section_mines_generated_embeddings_with_ivfpq(bench, tmp_path):
    result = bench.bench_mining_scale(2000, 16, scratch=tmp_path,
                                      options={"k_i2t": 20, "k_t2i": 10, "recall_sample": 100})
    assert result["captions"] == 10000 and result["stage_peak_rss_mib"] > 0
    for direction, items, k in (("i2t", 10000, 20), ("t2i", 2000, 10)):
        run = result[direction]
        assert run["items"] == items and run["k"] == k and run["recall_sample"] == 100
        assert run["factory"] == f"IVF{int(4 * items ** 0.5)},PQ2x8np"
        assert 0 < run["recall_at_k"] <= 1 and run["train_s"] >= 0
        assert run["index_mib_on_paper"] >= 0
    assert list(tmp_path.iterdir()) == []  # its temporary folder is removed
