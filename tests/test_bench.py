"""The benchmark harness measures what it says: exact FLOP counts, memory, throughput, pythae's twin."""

from __future__ import annotations

import json
import time

import pytest
import torch
from scripthelp import load_script

from elbolab.cli import build_parser, main
from elbolab.config import ModelConfig, ObjectiveConfig
from elbolab.evaluation import log_likelihood
from elbolab.models import build_model
from elbolab.objectives import make_objective
from elbolab.speed import measure, report, suite

ENC = 784 * 200 + 200 * 200 + 200 * 100  # multiply-adds per image: 784-200-200-(50 means + 50 log-variances)
DEC = 50 * 200 + 200 * 200 + 200 * 784  # per latent sample: 50-200-200-784


@pytest.fixture
def model():
    return build_model(ModelConfig(), 784)


@pytest.mark.parametrize("k,batch", [(1, 20), (5, 7), (50, 20)])
def test_training_flops_are_the_analytic_gemm_count(model, k: int, batch: int) -> None:
    """Forward 2*MACs; backward twice that, except the input gradient of the first layer (x needs none)."""
    x = torch.bernoulli(torch.full((batch, 784), 0.3))
    objective = make_objective(ObjectiveConfig(name="iwae", k=k))

    def step() -> None:
        objective(model, x, 1.0).loss.backward()

    forward = 2 * batch * (ENC + k * DEC)
    assert measure.count_flops(step) == 3 * forward - 2 * batch * 784 * 200


def test_likelihood_flops_count_every_sample_and_the_encoder_per_chunk(model) -> None:
    x = torch.bernoulli(torch.full((3, 784), 0.3))
    flops = measure.count_flops(lambda: log_likelihood(model, x, k=120, batch_size=3, chunk_size=50))
    # chunks of 50, 50, 20 each rerun the encoder and the Bernoulli fast path's x @ W_out (784 x 200)
    assert flops == 2 * 3 * (3 * (ENC + 784 * 200) + 120 * DEC)


def test_peak_memory_sees_a_large_allocation() -> None:
    with measure.PeakMemory(torch.device("cpu"), interval=0.001) as mem:
        big = torch.ones(50_000_000)  # 200 MB
        time.sleep(0.05)
        del big
    assert mem.peak_bytes > 150 * 2**20


def test_compare_reports_items_per_second_of_each_contestant() -> None:
    res = measure.compare({"a": (lambda: time.sleep(0.01), 10), "b": (lambda: time.sleep(0.02), 10)},
                          torch.device("cpu"), repeats=3, target_s=0.05, warmup=1)
    a, b = res["a"][0], res["b"][0]
    assert len(a.per_repeat) == 3
    # sleep never returns early, so the best repeat is at most 1000 (resp. 500) items/s
    assert 400 < a.best <= 1000 and 200 < b.best <= 500


def test_table_formats_ratios_and_skips() -> None:
    rows = [suite.Row("r", "elbolab", 2000.0, 1900.0, 12.3, 2.5, 7.2e6, 0.61).to_dict(),
            suite.Row("r", "pythae", 800.0, 790.0, 20.0, None, 7.2e6, 0.24).to_dict(),
            suite.Row("s", "elbolab", note="skipped: not there").to_dict()]
    lines = report.format_table(rows).splitlines()
    assert lines[0].split()[:3] == ["row", "library", "img/s"]
    assert "2.50x" in lines[2] and "61%" in lines[2] and "2,000" in lines[2]
    assert lines[3].split()[5] == "-"  # pythae has no ratio against itself
    assert lines[4].endswith("skipped: not there")


def test_pythae_twin_has_the_same_architecture(model) -> None:
    pytest.importorskip("pythae")
    from elbolab.speed import pythae_models

    twin = pythae_models.build("iwae", 5)
    assert sum(p.numel() for p in twin.parameters()) == sum(p.numel() for p in model.parameters())
    x = torch.bernoulli(torch.full((4, 784), 0.3))
    opt = torch.optim.Adam(twin.parameters())
    assert torch.isfinite(torch.tensor(pythae_models.train_step(twin, opt, x)))
    x4 = torch.bernoulli(torch.full((4, 784), 0.3))
    flops = measure.count_flops(lambda: twin({"data": x4}).loss.backward())
    assert flops == 3 * 2 * 4 * (ENC + 5 * DEC) - 2 * 4 * 784 * 200


@pytest.mark.slow  # the whole quick bench in-process
def test_bench_command_writes_json_with_the_rows_asked_for(tmp_path, capsys) -> None:
    assert main(["bench", "--quick", "--no-pythae", "--only", "IWAE k=1 B=20", "--only", "two-layer",
                 "--out", str(tmp_path), "--name", "t", "--threads", "1", "--clock", "cpu"]) == 0
    result = json.loads((tmp_path / "t.json").read_text())
    assert result["machine"]["torch_threads"] == 1 and result["machine"]["clock"] == "cpu"
    names = [r["name"] for r in result["rows"]]
    assert names[0] == "one-layer IWAE k=1 B=20"
    row = result["rows"][0]
    assert row["images_per_s"] > 0 and row["flops_per_image"] == 3 * 2 * (ENC + DEC) - 2 * 784 * 200
    assert 0 < row["of_peak"] < 1.5
    assert names[-1] == "two-layer IWAE k=50 B=100" and result["rows"][-1]["images_per_s"] > 0
    assert "one-layer IWAE k=1 B=20" in capsys.readouterr().out


def test_bench_is_a_subcommand() -> None:
    args = build_parser().parse_args(["bench", "--quick", "--threads", "2"])
    assert args.quick and args.threads == 2


def test_a_failing_peer_becomes_a_note_and_elbolab_is_still_timed(tmp_path, monkeypatch) -> None:
    from elbolab.speed import pythae_models

    def broken(*args, **kwargs):
        raise RuntimeError("Expected all tensors to be on the same device")

    monkeypatch.setattr(pythae_models, "available", lambda: None)
    monkeypatch.setattr(pythae_models, "build", lambda *a, **k: torch.nn.Linear(1, 1))
    monkeypatch.setattr(pythae_models, "train_step", broken)
    assert main(["bench", "--quick", "--only", "VAE k=1 B=20", "--out", str(tmp_path), "--name", "t",
                 "--threads", "1", "--seconds", "0.02", "--repeats", "1"]) == 0
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert [r["library"] for r in rows] == ["elbolab"] and rows[0]["images_per_s"] > 0
    assert "pythae failed on cpu: RuntimeError: Expected all tensors" in rows[0]["note"]  # after any BUSY flag


@pytest.mark.parametrize("flag", [["--seconds", "0"], ["--repeats", "0"]])
def test_bench_refuses_bad_timing_options_naming_them(flag, capsys) -> None:
    assert main(["bench", "--quick", "--no-pythae", *flag]) == 2
    assert flag[0] in capsys.readouterr().err


def test_a_timing_whose_process_waited_is_flagged_busy() -> None:
    """A step that sleeps is what a descheduled process looks like: wall time passes, no CPU time.
    Its CPU share is near 0 and the row says so, while the img/s number itself looks plausible."""
    torch.set_num_threads(1)
    res = measure.compare({"waits": (lambda: time.sleep(0.01), 10)}, torch.device("cpu"), repeats=2,
                          target_s=0.03, warmup=0)
    tp = res["waits"][0]
    assert len(tp.cpu_share) == 2 and tp.best_cpu_share < 0.2
    assert "BUSY MACHINE" in measure.busy_note(tp.best_cpu_share, 1)
    assert measure.busy_note(0.95, 2) == "" and measure.busy_note(None, 2) == ""


def test_rows_carry_the_busy_flag_only_on_the_wall_clock() -> None:
    bench = suite.Bench.__new__(suite.Bench)  # the row builder alone: no data, no timing
    bench.peak_flops, bench.wall_clock = 1e9, True
    results = {"elbolab": (measure.Throughput([500.0, 400.0], [0.14, 0.9]), 0),
               suite.PEAK: (measure.Throughput([1e9], [1.0]), 0)}
    (row,) = bench._rows("r", results, 1e5, "a note")
    assert row.cpu_share == 0.14 and row.note.startswith("BUSY MACHINE") and row.note.endswith("a note")
    bench.wall_clock = False  # CPU-clock timings are the process's own work: not flagged
    (row,) = bench._rows("r", results, 1e5, "a note")
    assert row.note == "a note"
    quiet = {"elbolab": (measure.Throughput([500.0], [0.97]), 0)}
    bench.wall_clock = True
    assert bench._rows("r", quiet, None)[0].note == ""


@pytest.mark.slow  # starts worker processes
def test_stacked_row_times_the_stack_against_runs_one_by_one_and_processes(tmp_path, monkeypatch) -> None:
    import elbolab.speed

    monkeypatch.setattr(elbolab.speed, "stacked_plan", lambda: [("stacked S=2: IWAE k=1, batch 20", 2, 20, 1)])
    assert main(["bench", "--quick", "--no-pythae", "--only", "stacked", "--out", str(tmp_path), "--name", "t",
                 "--threads", "1", "--clock", "cpu", "--seconds", "0.02", "--repeats", "1"]) == 0
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert [r["library"] for r in rows] == ["2 runs one by one", "2 runs stacked", "2 processes"]
    assert all(r["images_per_s"] > 0 and r["extra"]["runs"] == 2 for r in rows)
    assert len(rows[2]["extra"]["per_process"]) == 2
    one_by_one = rows[0]["extra"]["stacked_speedup"]
    assert one_by_one == pytest.approx(rows[1]["images_per_s"] / rows[0]["images_per_s"])


def _demo_time():
    return load_script("benchmarks/demo_time.py")


def test_demo_time_reads_the_commands_last_timing_line_and_flags_a_busy_run() -> None:
    demo = _demo_time()
    out = "epoch 1/1: ...\ntrained in 90 s, evaluated in 9 s\nrun folder: runs/x\n"
    assert demo.printed_times(out) == (90.0, 9.0)
    assert demo.printed_times("trained in 12 s; run folder: r\n") == (12.0, None)
    assert demo.printed_times("no timing\n") == (None, None)
    quiet = demo.summarize(wall_s=100.0, cpu_s=190.0, threads=2, train_s=90.0, eval_s=9.0)
    assert quiet["cpu_share"] == 0.95 and quiet["within_target"] and quiet["note"] == ""
    # 400 s wall but 160 CPU seconds on 2 threads: busy (share 0.2); the idle estimate 80 s meets the target
    busy = demo.summarize(wall_s=400.0, cpu_s=160.0, threads=2, train_s=380.0, eval_s=20.0)
    assert busy["cpu_share"] == 0.2 and busy["idle_wall_estimate_s"] == 80.0 and busy["within_target"]
    assert busy["note"].startswith("BUSY MACHINE")
    assert not demo.summarize(wall_s=130.0, cpu_s=250.0, threads=2, train_s=120.0, eval_s=10.0)["within_target"]


@pytest.mark.slow
def test_demo_time_times_a_real_train_command_and_writes_json(tmp_path) -> None:
    out = tmp_path / "demo.json"
    sets = ["train.epochs=1", "model.hidden=[8]", "model.latent_dim=2", "train.threads=1", "eval.k_importance=2",
            "eval.test_images=20", "train.monitor_every=0"]
    assert _demo_time().main([a for kv in sets for a in ("--set", kv)] + ["--out", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["threads"] == 1 and row["train_s"] is not None and row["eval_s"] is not None
    assert row["train_s"] + row["eval_s"] <= row["wall_s"] + 1  # the printed times are rounded to 1 s
    assert row["cpu_s"] > 0 and row["command"].endswith("--set train.monitor_every=0")
