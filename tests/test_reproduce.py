"""`elbolab reproduce`: the paper values, the config grid, a tiny end-to-end table, the cache."""

from __future__ import annotations

import json
import math

import pytest
import torch
from trainhelp import register_tiny_embedded

from elbolab.cli import main
from elbolab.config import PRESETS, ConfigError
from elbolab.data import DATASETS, DatasetSpec, ImageDataset, load
from elbolab.reproduce import load_tables, reproduce, rows
from elbolab.reproduce.executors import LocalExecutor, RayExecutor
from elbolab.reproduce.rows import RowTask
from elbolab.reproduce.tables import get_table, plan_rows, row_config, select_rows
from elbolab.schedules import learning_rate
from elbolab.training import Loop, RunState

# --- papers.yaml ----------------------------------------------------------------------


def test_every_cell_has_a_source_and_every_row_every_metric() -> None:
    tables = load_tables()
    assert set(tables) == {"iwae-table", "surgery-table", "vampprior-table"}
    for spec in tables.values():
        assert spec.citation and spec.table and spec.rows
        for row in spec.rows:
            assert set(row.values) == {m.name for m in spec.metrics}, row.id
            for cell in row.values.values():
                assert cell.column.strip()
                assert cell.checked is None or cell.checked.strip()


def _value(table: str, row: str, metric: str):
    return get_table(table).row(row).values[metric].value


def test_published_values_quoted_in_the_issue() -> None:
    nll = [_value("iwae-table", f"mnist-1layer-iwae-k{k}", "nll") for k in (1, 5, 50)]
    units = [_value("iwae-table", f"mnist-1layer-iwae-k{k}", "active_units") for k in (1, 5, 50)]
    assert nll == [86.76, 85.54, 84.78] and units == ["19", "22", "25"]
    assert _value("iwae-table", "mnist-2layer-iwae-k50", "nll") == 82.90
    assert _value("iwae-table", "mnist-2layer-iwae-k50", "active_units") == "26+7"
    assert _value("iwae-table", "omniglot-2layer-iwae-k50", "nll") == 103.38
    assert _value("iwae-table", "omniglot-2layer-iwae-k50", "active_units") == "44+7"
    surgery = {m: [_value("surgery-table", f"mnist-vae-{d}latents", m) for d in (2, 10, 20)]
               for m in ("elbo", "average_kl", "mutual_information", "marginal_kl")}
    assert surgery == {"elbo": [-129.63, -88.95, -87.45], "average_kl": [7.41, 19.17, 20.20],
                       "mutual_information": [7.20, 10.82, 10.67], "marginal_kl": [0.21, 8.35, 9.53]}
    vamp = [_value("vampprior-table", f"mnist-hierarchical-{p}", "log_likelihood")
            for p in ("standard", "mog", "vampprior-data", "vampprior")]
    assert vamp == [-85.89, -85.07, -85.71, -83.19]


def test_surgery_values_are_internally_consistent() -> None:
    """avg KL = MI + marginal KL in every row, and log N is ln of MNIST's 60,000 training images."""
    for d in (2, 10, 20):
        row = f"mnist-vae-{d}latents"
        avg, mi, mkl = (_value("surgery-table", row, m) for m in ("average_kl", "mutual_information", "marginal_kl"))
        assert avg == pytest.approx(mi + mkl, abs=0.011)
        assert mi <= _value("surgery-table", row, "log_n")
        assert _value("surgery-table", row, "log_n") == pytest.approx(math.log(60_000), abs=5e-5)


def test_iwae_table_covers_the_whole_grid() -> None:
    spec = get_table("iwae-table")
    combos = {(r.setup["data.name"], r.setup["model.name"], r.setup["objective.name"], r.setup["objective.k"])
              for r in spec.rows}
    assert len(combos) == len(spec.rows) == 24
    for r in spec.rows:  # units per layer: one number for one layer, "a+b" for two
        assert len(str(r.values["active_units"].value).split("+")) == (2 if "2layer" in r.id else 1)


# --- the config grid ----------------------------------------------------------------


def test_two_layer_iwae_k50_row_at_paper_budget() -> None:
    spec = get_table("iwae-table")
    cfg = row_config(spec, spec.row("mnist-2layer-iwae-k50"), "paper").config
    assert (cfg.objective.name, cfg.objective.k, cfg.model.name) == ("iwae", 50, "two-layer")
    assert (cfg.train.schedule, cfg.train.epochs, cfg.train.batch_size, cfg.train.adam_eps) == ("iwae", 3280, 20, 1e-4)
    assert cfg.data.binarization == "dynamic" and cfg.eval.k_importance == 5000
    assert learning_rate(cfg.train, 3279) == pytest.approx(1e-3 * 10 ** (-7 / 7))


def test_budgets_shorten_the_schedule_but_keep_its_decay() -> None:
    spec = get_table("iwae-table")
    row = spec.row("mnist-1layer-vae-k5")
    epochs = {b: row_config(spec, row, b).config.train.epochs for b in ("quick", "medium", "paper")}
    assert epochs == {"quick": 1 + 3 + 9, "medium": 1 + 3 + 9 + 27 + 81, "paper": 3280}
    quick = row_config(spec, row, "quick").config
    assert quick.train.schedule == "iwae"
    assert learning_rate(quick.train, 12) == pytest.approx(1e-3 * 10 ** (-2 / 7))


def test_omniglot_rows_say_which_omniglot(tmp_path) -> None:
    spec = get_table("iwae-table")
    row = spec.row("omniglot-1layer-iwae-k5")
    plan = row_config(spec, row, "quick", data_dir=str(tmp_path))
    assert plan.config.data.name == "omniglot-28-elbolab"
    assert plan.data_label == "omniglot-28-elbolab (not the Burda split)"
    (tmp_path / "omniglot").mkdir()
    (tmp_path / "omniglot" / "chardata.mat").write_bytes(b"")
    plan = row_config(spec, row, "quick", data_dir=str(tmp_path))
    assert plan.config.data.name == "omniglot-chardata" and "Burda" in plan.data_label


def test_surgery_rows() -> None:
    plans = plan_rows(get_table("surgery-table"), "paper")
    assert [p.config.model.latent_dim for p in plans] == [2, 10, 20]
    assert {(p.config.objective.name, p.config.objective.k, p.config.train.epochs) for p in plans} == {("vae", 1, 1000)}


def test_vampprior_rows_use_the_papers_preset() -> None:
    spec = get_table("vampprior-table")
    assert "vampprior-paper" in PRESETS
    plans = {p.row.id: p.config for p in plan_rows(spec, "paper")}
    hier = plans["mnist-hierarchical-mog"]
    assert (hier.model.name, hier.model.prior.name, hier.data.name) == ("hierarchical", "mog", "binarized-mnist")
    assert (hier.train.lr, hier.train.epochs, hier.train.early_stopping_patience) == (5e-4, 2000, 50)
    # the authors' one-layer VAE (gated layers) under every one-layer row, flows included
    assert {plans[r].model.name for r in plans if "-1layer-" in r} == {"gated-one-layer"}
    # VampPrior data: the authors' --use_training_data_init, pseudo-inputs started at training images, learned
    data = plans["mnist-hierarchical-vampprior-data"].model.prior
    assert (data.name, data.pseudo_inputs_init) == ("vampprior", "data")
    assert {r.id for r in spec.rows if r.stand_in} == {"mnist-1layer-planar-flow", "mnist-1layer-iaf", "mnist-vlae",
                                                       "mnist-avb-ac"}
    # AVB + AC: the authors' optimizer and steps (2,500,000 of 64 images), dynamic binarization, AIS
    avb = plans["mnist-avb-ac"]
    assert (avb.model.name, avb.data.binarization, avb.train.optimizer, avb.train.lr, avb.train.adam_betas,
            avb.train.batch_size, avb.train.epochs, avb.train.early_stopping_patience) == (
        "avb", "dynamic", "adam", 1e-4, (0.5, 0.999), 64, 2667, 0)
    assert (avb.model.avb.ais_steps, avb.eval.test_images) == (1000, 2048)
    quick = {p.row.id: p.config for p in plan_rows(spec, "quick")}["mnist-hierarchical-vampprior"]
    assert (quick.train.epochs, quick.objective.warmup_epochs) == (10, 5)


def test_only_selects_rows_in_table_order_and_rejects_typos() -> None:
    spec = get_table("iwae-table")
    picked = select_rows(spec, ["mnist-2layer-iwae-k50", "mnist-1layer-vae-k1"])
    assert [r.id for r in picked] == ["mnist-1layer-vae-k1", "mnist-2layer-iwae-k50"]
    with pytest.raises(ConfigError, match="did you mean 'mnist-1layer-iwae-k5'"):
        select_rows(spec, ["mnist-1layer-iwae-k55"])


def test_a_row_the_config_cannot_express_is_named(monkeypatch) -> None:
    from elbolab.models import MODELS

    monkeypatch.delitem(MODELS, "two-layer")
    with pytest.raises(ConfigError, match=r"iwae-table/mnist-2layer-vae-k5: model\.name: unknown model 'two-layer'"):
        plan_rows(get_table("iwae-table"), "quick", only=["mnist-2layer-vae-k5"])


# --- a tiny reproduction end to end -------------------------------------------------


@pytest.fixture
def tiny_data(monkeypatch):
    """A 500/100/100 subset of the embedded data, registered as 'tiny-embedded'."""
    return register_tiny_embedded(monkeypatch, train=500, valid=100)


TINY = {"data.name": "tiny-embedded", "train.epochs": 1, "train.batch_size": 100, "eval.k_importance": 20}
ROWS = ["mnist-1layer-iwae-k5", "mnist-1layer-vae-k1"]


def _count_fits(monkeypatch) -> list[int]:
    """One entry per run trained alone (a loop of one run)."""
    calls: list[int] = []
    original = Loop.fit

    def counting_fit(self, *a, **k):
        if len(self.specs) == 1:
            calls.append(1)
        return original(self, *a, **k)

    monkeypatch.setattr(Loop, "fit", counting_fit)
    return calls


def test_tiny_reproduction_writes_the_table_and_the_cache_skips_finished_rows(tiny_data, tmp_path, monkeypatch):
    fits = _count_fits(monkeypatch)
    rep = reproduce("iwae-table", budget="quick", only=ROWS, results=tmp_path, overrides=TINY)
    assert len(fits) == 2 and sorted(rep.trained) == sorted(ROWS) and not rep.failed
    doc = json.loads(rep.outputs["json"].read_text())
    assert [r["row"] for r in doc["rows"]] == ["mnist-1layer-vae-k1", "mnist-1layer-iwae-k5"]  # table order
    for r in doc["rows"]:
        result = json.loads((tmp_path / "iwae-table" / "quick" / "rows").glob(f"{r['row']}-*").__next__()
                            .joinpath("result.json").read_text())
        nll = r["cells"]["nll"]
        assert nll["ours"] == result["metrics"]["nll"] > 100  # one epoch on 500 images is far from the paper
        assert nll["difference"] == pytest.approx(nll["ours"] - nll["paper"], abs=1e-12)
        units = r["cells"]["active_units"]
        assert units["difference"] == sum(result["metrics"]["active_units_counts"]) - int(units["paper"])
        assert r["epochs"] == 1 and r["hardware"]
    md = rep.outputs["markdown"].read_text()
    # K, binarization and split beside every row
    assert "| mnist-1layer-iwae-k5 | tiny-embedded | binary as distributed | 500 / 100 / 100 | 20 | 85.54 |" in md
    assert "| 19† |" in md.split("| mnist-1layer-vae-k1 |")[1].splitlines()[0]  # not verified: marked
    assert "train.epochs=1" in md and rep.outputs["curve"].stat().st_size > 10_000

    again = reproduce("iwae-table", budget="quick", only=ROWS, results=tmp_path, overrides=TINY)
    assert len(fits) == 2 and sorted(again.cached) == sorted(ROWS) and not again.trained
    assert json.loads(again.outputs["json"].read_text())["rows"][0]["cells"] == doc["rows"][0]["cells"]

    # a different protocol is a different row folder: trained, not answered from the cache
    third = reproduce("iwae-table", budget="quick", only=ROWS[:1], results=tmp_path,
                      overrides={**TINY, "train.lr": 3e-4})
    assert third.trained == ROWS[:1] and len(fits) == 3

    # --table-only: the finished rows, the others "not run", nothing trained
    table = reproduce("iwae-table", budget="quick", only=[*ROWS, "mnist-1layer-iwae-k50"], results=tmp_path,
                      overrides=TINY, train=False)
    assert len(fits) == 3 and sorted(table.cached) == sorted(ROWS) and not table.trained
    statuses = {r["row"]: r["status"] for r in json.loads(table.outputs["json"].read_text())["rows"]}
    assert statuses["mnist-1layer-iwae-k50"] == "not run" and statuses["mnist-1layer-iwae-k5"] == "cached"


@pytest.mark.slow
def test_an_interrupted_row_resumes_from_its_checkpoint(tiny_data, tmp_path, monkeypatch):
    epochs_run: list[int] = []
    original = RunState.begin_epoch

    def interrupted(self):
        if self.epoch == 1 and not epochs_run.count(-1):
            epochs_run.append(-1)
            raise KeyboardInterrupt
        epochs_run.append(self.epoch)
        return original(self)

    monkeypatch.setattr(RunState, "begin_epoch", interrupted)
    args = dict(budget="quick", only=ROWS[:1], results=tmp_path, overrides={**TINY, "train.epochs": 2})
    with pytest.raises(KeyboardInterrupt):
        reproduce("iwae-table", **args)
    assert epochs_run == [0, -1]
    rep = reproduce("iwae-table", **args)
    assert epochs_run == [0, -1, 1]  # only the second epoch ran again
    row_dir = next((tmp_path / "iwae-table" / "quick" / "rows").iterdir())
    metrics = [json.loads(line) for line in (row_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2] and rep.entries[0].epochs == 2


@pytest.mark.slow  # a real process killed
def test_a_row_killed_while_creating_its_run_folder_trains_on_the_rerun(tiny_data, tmp_path):
    """A kill in the middle of creating a row's run folder: what an older elbolab left (config and
    environment written, no run.json) and what this one leaves (a temporary folder beside it); the
    rerun of the same command trains the row either way instead of failing it on every rerun."""

    plan = plan_rows(get_table("iwae-table"), "quick", ROWS[:1], None, TINY)[0]
    run = tmp_path / "iwae-table" / "quick" / "rows" / f"{ROWS[0]}-{plan.key}" / "run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("half")
    (run / "environment.json").write_text("{}")
    (run.parent / ".run.new-dead").mkdir()  # a temporary folder whose creator is gone
    (run.parent / ".run.new-dead" / ".lock").touch()
    rep = reproduce("iwae-table", budget="quick", only=ROWS[:1], results=tmp_path, overrides=TINY)
    assert rep.trained == ROWS[:1] and not rep.failed
    assert sorted(p.name for p in run.parent.iterdir()) == ["result.json", "run"]


def test_cli_reproduce_lists_rows_and_reports_missing_pieces(capsys) -> None:
    assert main(["reproduce", "iwae-table", "--list", "--budget", "paper", "--only", "mnist-2layer-iwae-k50"]) == 0
    out = capsys.readouterr().out
    assert "mnist-2layer-iwae-k50" in out and "two-layer" in out and "3280 epochs" in out
    assert main(["reproduce", "iwae-table", "--only", "nope"]) == 2
    assert "no such row" in capsys.readouterr().err


# --- executors ------------------------------------------------------------------------


def echo_row(task: RowTask) -> dict:
    """A stand-in for run_row: proves the executor maps each task to its own result."""
    if task.row_id == "bad":
        raise ValueError("row failed on purpose")
    return {"row": task.row_id, "threads": torch.get_num_threads()}


def _tasks(ids):
    return [RowTask(table="t", row_id=i, config={}, row_dir="", evaluation="likelihood", data_label="") for i in ids]


@pytest.mark.slow  # worker processes
def test_local_executor_runs_rows_in_parallel_processes_and_reports_failures() -> None:
    out = {t.row_id: (res, err) for t, res, err in LocalExecutor(2).run(_tasks(["a", "bad", "c"]), echo_row)}
    assert out["a"][0]["row"] == "a" and out["c"][0]["row"] == "c"
    assert out["bad"][0] is None and "on purpose" in str(out["bad"][1])


@pytest.mark.slow  # starts a local Ray
def test_ray_executor_in_a_local_ray() -> None:
    pytest.importorskip("ray")

    def echo(task):  # closures travel by value, so Ray workers need not import this test file
        if task.row_id == "bad":
            raise ValueError("row failed on purpose")
        return {"row": task.row_id}

    out = {t.row_id: (res, err) for t, res, err in RayExecutor(1).run(_tasks(["a", "bad"]), echo)}
    assert out["a"][0] == {"row": "a"} and out["bad"][0] is None and "on purpose" in str(out["bad"][1])


def test_ray_executor_without_ray_says_how_to_get_it(monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray":
            raise ImportError("no ray")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(ConfigError, match=r"pip install 'elbolab\[ray\]'"):
        list(RayExecutor(1).run(_tasks(["a"]), echo_row))


def test_tiny_surgery_table(tiny_data, tmp_path) -> None:
    """Surgery over the training split: N = 500 here, so ours' log N is ln 500 beside the paper's ln 60000."""
    rep = reproduce("surgery-table", budget="quick", only=["mnist-vae-2latents"], results=tmp_path,
                    overrides={"data.name": "tiny-embedded", "train.epochs": 1})
    assert rep.trained == ["mnist-vae-2latents"] and not rep.failed
    cells = json.loads(rep.outputs["json"].read_text())["rows"][0]["cells"]
    assert cells["log_n"]["ours"] == pytest.approx(math.log(500)) and cells["log_n"]["paper"] == 11.0021
    assert 0 <= cells["mutual_information"]["ours"] <= math.log(500) + 1e-9
    result = json.loads(next((tmp_path / "surgery-table" / "quick" / "rows").glob("*/result.json")).read_text())
    m = result["metrics"]
    assert abs(m["identity_error"]) <= 4 * m["identity_stderr"] + 1e-6
    assert "| mnist-vae-2latents | tiny-embedded | binary as distributed | 500 / 100 / 100 | -129.63 |" in \
        rep.outputs["markdown"].read_text()
    assert [p[0] for p in result["curve"]] == [1] and result["curve"][0][2] is not None  # eval_every 1: validated


def test_curve_draws_each_training_once_a_panel_per_dataset(tmp_path) -> None:
    from elbolab.reproduce.output import curve_series, make_entry, plot_curves

    spec = get_table("iwae-table")

    def entry(row_id: str, data: str, curve):
        result = {"metrics": {"nll": 100.0, "active_units": "10", "active_units_counts": [10]},
                  "epochs": len(curve), "train_seconds": 1.0, "eval_seconds": 1.0, "hardware": "cpu",
                  "config": {}, "curve": curve}
        return make_entry(spec, row_id, data, result, None, None)

    shared = [[1, -120.0, None], [2, -110.0, None]]
    vae1, iwae1 = entry("mnist-1layer-vae-k1", "mnist", shared), entry("mnist-1layer-iwae-k1", "mnist", shared)
    other = entry("omniglot-1layer-vae-k1", "omniglot", shared)  # the same numbers on other data: its own line
    restored = entry("mnist-1layer-iwae-k50", "mnist", [])  # a row without a curve: no line
    series = curve_series([vae1, iwae1, other, restored])
    assert [[e.row for e in rows] for rows, _ in series] == [
        ["mnist-1layer-vae-k1", "mnist-1layer-iwae-k1"], ["omniglot-1layer-vae-k1"]]
    assert plot_curves(spec, [vae1, iwae1, other, restored], tmp_path / "c.png").stat().st_size > 10_000
    assert plot_curves(spec, [restored], tmp_path / "none.png") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_this_machine_lacks_fails_once_before_any_row(tmp_path, capsys) -> None:
    code = main(["reproduce", "surgery-table", "--set", "train.device=cuda", "--results", str(tmp_path / "r")])
    assert code == 2 and "train.device: 'cuda' but CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# --- protocol details: K per budget, OMNIGLOT's validation split --------------------------


def test_every_mlp_row_evaluates_with_k_5000_at_every_budget() -> None:
    """The papers' K = 5000 (K = 1000 reads the k = 1 MNIST NLL about 0.4 nats higher); only the
    convolutional rows and VLAE keep their own stated K and test subset at the quick budget."""
    for name in ("iwae-table", "vampprior-table"):
        spec = get_table(name)
        for budget in ("quick", "medium", "paper"):
            for p in plan_rows(spec, budget):
                if p.row.id == "mnist-avb-ac":  # no importance weights: AIS (tests/test_avb.py)
                    continue
                conv = p.row.id in ("mnist-convhvae-vampprior", "mnist-pixelhvae-vampprior",
                                    "mnist-vlae") and budget == "quick"
                assert (p.config.eval.k_importance, p.config.eval.test_images) == \
                    ((100, 500) if conv else (5000, 0)), (name, budget, p.row.id)
            assert "K = 5000" in spec.protocol.budget_notes[budget]


def test_every_row_the_fused_step_can_train_asks_for_it() -> None:
    """A row whose model and objective fit the fused batch step trains through it (train.fused
    auto: the same training, faster), and the rows it cannot train keep the plain step."""
    from elbolab import fused
    from elbolab.models import build_model

    fitting = set()
    for name in ("iwae-table", "surgery-table", "vampprior-table"):
        for p in plan_rows(get_table(name), "quick"):
            cfg = p.config
            if cfg.model.name not in ("one-layer", "two-layer"):
                assert fused.supports(build_model(cfg.model, 784), cfg) is not None, (name, p.row.id)
                continue
            if fused.supports(build_model(cfg.model, 784), cfg) is None:
                assert cfg.train.fused == "auto", (name, p.row.id)
                fitting.add(name)
    assert fitting == {"iwae-table", "surgery-table"}


def test_rows_record_the_validation_bound_per_epoch_where_a_split_exists() -> None:
    for name in ("surgery-table", "vampprior-table"):
        for budget in ("quick", "medium", "paper"):
            assert {p.config.train.eval_every for p in plan_rows(get_table(name), budget)} == {1}


def test_vampprior_omniglot_row_holds_out_the_papers_validation_split() -> None:
    """1,345 training images, load_omniglot's n_validation in the VampPrior code."""
    spec = get_table("vampprior-table")
    for budget in ("quick", "medium", "paper"):
        plans = {p.row.id: p.config for p in plan_rows(spec, budget)}
        assert plans["omniglot-hierarchical-vampprior"].data.validation == 1345
        assert plans["mnist-hierarchical-vampprior"].data.validation == 0  # Larochelle's own split
    paper = {p.row.id: p.config for p in plan_rows(spec, "paper")}
    assert paper["omniglot-hierarchical-vampprior"].train.early_stopping_patience == 50


def test_a_row_loads_the_validation_split_its_config_holds_out(tmp_path, monkeypatch) -> None:
    """run_row passes data.validation to the loader: the row validates (and so can early-stop)."""
    full = load("binarized-mnist-embedded")
    novalid = ImageDataset(name="tiny-novalid", image_shape=full.image_shape, binary=True, source="test subset",
                           splits={"train": full.splits["train"][:300], "test": full.splits["test"][:50]})
    monkeypatch.setitem(DATASETS, "tiny-novalid", DatasetSpec("tiny-novalid", "test", lambda _d: novalid,
                                                              embedded=True))
    rep = reproduce("iwae-table", budget="quick", only=["mnist-1layer-vae-k5"], results=tmp_path,
                    overrides={**TINY, "data.name": "tiny-novalid", "data.validation": 100, "train.eval_every": 1})
    assert rep.trained == ["mnist-1layer-vae-k5"]
    row_dir = next((tmp_path / "iwae-table" / "quick" / "rows").iterdir())
    metrics = json.loads((row_dir / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert "valid_iwae_5" in metrics


# --- one training for the k = 1 VAE and IWAE rows ----------------------------------------


def _plain_key(cfg) -> str:
    """The row key before objectives were normalized: a hash of the config minus run-only keys."""
    import hashlib

    d = cfg.to_dict()
    for section, key in (("train", "threads"), ("train", "progress"), ("train", "device"), ("train", "compile"),
                         ("data", "data_dir"), ("eval", "gpu_chunk_size"), ("train", "fused"),
                         ("train", "fused_backend"),
                         # logging and monitoring keys, added later, leave every key as it was
                         ("train", "monitor_every"), ("train", "monitor_points"), ("train", "wandb"),
                         ("train", "wandb_mode"), ("train", "wandb_project")):
        d[section].pop(key)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


def test_k1_vae_and_iwae_rows_share_a_key_and_other_keys_are_unchanged() -> None:
    plans = {p.row.id: p for p in plan_rows(get_table("iwae-table"), "quick")}
    pairs = [(f"{d}-{n}layer-vae-k1", f"{d}-{n}layer-iwae-k1") for d in ("mnist", "omniglot") for n in (1, 2)]
    for vae, iwae in pairs:
        assert plans[vae].result_key == plans[iwae].result_key == _plain_key(plans[vae].config)
        assert plans[iwae].result_key != _plain_key(plans[iwae].config)
        assert plans[vae].key == plans[iwae].key
    shared = {r for pair in pairs for r in pair}
    for row_id, p in plans.items():
        if row_id not in shared:
            assert p.result_key == _plain_key(p.config), row_id
    assert len({p.key for p in plans.values()}) == len({p.result_key for p in plans.values()}) == 24 - 4


def test_the_folder_key_leaves_out_evaluation_settings_but_the_validation_seed() -> None:
    spec = get_table("iwae-table")
    row = spec.row("mnist-1layer-iwae-k5")
    base = row_config(spec, row, "quick")
    for key, value, same in (("eval.k_importance", 1000, True), ("eval.test_images", 500, True),
                             ("eval.chunk_size", 20, True), ("eval.seed", 7, False), ("train.lr", 3e-4, False)):
        other = row_config(spec, row, "quick", overrides={key: value})
        assert (other.key == base.key) is same, key
        assert other.result_key != base.result_key, key


def test_k1_vae_and_iwae_rows_train_once(tiny_data, tmp_path, monkeypatch) -> None:
    fits = _count_fits(monkeypatch)
    pair = ["mnist-1layer-vae-k1", "mnist-1layer-iwae-k1"]
    rep = reproduce("iwae-table", budget="quick", only=pair, results=tmp_path, overrides=TINY)
    assert len(fits) == 1 and rep.trained == ["mnist-1layer-vae-k1"] and rep.cached == ["mnist-1layer-iwae-k1"]
    a, b = rep.entries
    assert a.cells["nll"].ours == b.cells["nll"].ours and a.row_dir == b.row_dir
    assert len(list((tmp_path / "iwae-table" / "quick" / "rows").iterdir())) == 1
    # later, the IWAE row alone is answered from the VAE row's folder
    again = reproduce("iwae-table", budget="quick", only=pair[1:], results=tmp_path, overrides=TINY)
    assert len(fits) == 1 and again.cached == pair[1:]


# --- a partial rerun never replaces a committed result with less ---------------------------


@pytest.mark.slow
def test_rows_without_a_cache_keep_the_committed_table(tiny_data, tmp_path, monkeypatch) -> None:
    import shutil

    fits = _count_fits(monkeypatch)
    first = reproduce("iwae-table", budget="quick", only=ROWS, results=tmp_path, overrides=TINY)
    before = {e.row: e.cells["nll"].ours for e in first.entries}
    out = tmp_path / "iwae-table" / "quick"
    shutil.rmtree(out / "rows")  # a fresh clone: table.md and table.json only

    # --table-only in a fresh clone, nothing rerun: the tables stay byte for byte the same
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    assert reproduce("iwae-table", budget="quick", only=ROWS, results=tmp_path, train=False,
                     overrides={k: v for k, v in TINY.items()}).committed == ROWS[::-1]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files

    # --table-only over every row: the two committed rows are kept as they were, the 22 others never ran
    table = reproduce("iwae-table", budget="quick", results=tmp_path, overrides=TINY, train=False)
    doc = json.loads(table.outputs["json"].read_text())
    status = {r["row"]: r["status"] for r in doc["rows"]}
    assert sorted(table.committed) == sorted(ROWS) and len(status) == 24 and not table.stale
    assert {status[r] for r in ROWS} == {"trained"} and list(status.values()).count("not run") == 22
    assert {e.row: e.cells["nll"].ours for e in table.entries if e.row in ROWS} == before
    md = table.outputs["markdown"].read_text()
    assert "| mnist-1layer-iwae-k5 | tiny-embedded |" in md and "‡" not in md
    # a row that recorded no K (an AIS-scored row records none) keeps none
    recorded = json.loads((out / "table.json").read_text())
    next(r for r in recorded["rows"] if r["row"] == ROWS[0])["k_importance"] = None
    (out / "table.json").write_text(json.dumps(recorded))
    kept = reproduce("iwae-table", budget="quick", results=tmp_path, overrides=TINY, train=False)
    assert {e.row: e.k_importance for e in kept.entries}[ROWS[0]] is None
    # a table.json written before rows recorded K and their config key: K filled in, the rows marked ‡
    older = json.loads((out / "table.json").read_text())
    for r in older["rows"]:
        r.pop("k_importance")
        r.pop("key")
    (out / "table.json").write_text(json.dumps(older))
    stale = reproduce("iwae-table", budget="quick", results=tmp_path, overrides=TINY, train=False)
    ks = {e.row: e.k_importance for e in stale.entries}
    assert ks[ROWS[0]] == ks[ROWS[1]] == 20 and sorted(stale.stale) == sorted(ROWS)
    md = stale.outputs["markdown"].read_text()
    assert "| mnist-1layer-iwae-k5 ‡ | tiny-embedded |" in md and "‡ not rerun under the current protocol" in md
    # ... unless its folder carries the row's config key, as older versions named row folders
    plan = plan_rows(get_table("iwae-table"), "quick", ROWS[:1], None, TINY)[0]
    older = json.loads((out / "table.json").read_text())
    for r in older["rows"]:
        r.pop("key", None)
        if r["row"] == ROWS[0]:
            r["row_dir"] = f"/elsewhere/rows/{ROWS[0]}-{plan.result_key}"
    (out / "table.json").write_text(json.dumps(older))
    assert reproduce("iwae-table", budget="quick", results=tmp_path, overrides=TINY, train=False).stale == ROWS[1:]

    # rerun one row (a device or thread override changes nothing): it trains; the other is kept
    rerun = reproduce("iwae-table", budget="quick", only=ROWS[:1], results=tmp_path,
                      overrides={**TINY, "train.threads": 1, "train.device": "cpu"})
    assert rerun.trained == ROWS[:1] and len(fits) == 3
    kinds = {e.row: e.status for e in rerun.entries}
    assert kinds[ROWS[0]] == "trained" and kinds[ROWS[1]] == "committed"
    assert next(e for e in rerun.entries if e.row == ROWS[1]).cells["nll"].ours == before[ROWS[1]]

    # a failed rerun reports the failure and keeps the committed value
    def fail(task):
        raise RuntimeError("out of memory on purpose")

    failed = reproduce("iwae-table", budget="quick", only=ROWS[1:], results=tmp_path, overrides=TINY, run_fn=fail)
    assert failed.failed == ROWS[1:]
    kept = next(e for e in failed.entries if e.row == ROWS[1])
    assert kept.status == "committed" and kept.cells["nll"].ours == before[ROWS[1]] and "on purpose" in kept.error
    assert "(the committed value is kept)" in failed.outputs["markdown"].read_text()

    # a table of another protocol (here another learning rate) is not mixed in
    other = reproduce("iwae-table", budget="quick", only=ROWS[:1], results=tmp_path,
                      overrides={**TINY, "train.lr": 3e-4}, train=False)
    assert [e.status for e in other.entries] == ["not run"]


@pytest.mark.slow
def test_rows_of_one_shape_train_stacked_as_they_do_alone(tiny_data, tmp_path, monkeypatch) -> None:
    """The k = 5 VAE and IWAE rows share a shape: one stacked training (no loop of one run), whose row
    folders hold the bits the rows get trained one by one, and so the same table values."""
    import pickle
    from pathlib import Path

    from elbolab.reproduce.rows import PackTask

    fits = _count_fits(monkeypatch)
    pair = ["mnist-1layer-vae-k5", "mnist-1layer-iwae-k5"]
    plain = {**TINY, "train.fused": "off"}  # fused, VAE and IWAE rows would not share a stack (training.packing)
    stacked = reproduce("iwae-table", budget="quick", only=pair, results=tmp_path / "a", overrides=plain)
    assert len(fits) == 0 and sorted(stacked.trained) == sorted(pair)
    alone = reproduce("iwae-table", budget="quick", only=pair, results=tmp_path / "b", overrides=plain, stack=False)
    assert len(fits) == 2
    for a, b in zip(stacked.entries, alone.entries, strict=True):
        assert a.cells["nll"].ours == b.cells["nll"].ours
        assert (Path(a.row_dir) / "run" / "model.safetensors").read_bytes() == \
            (Path(b.row_dir) / "run" / "model.safetensors").read_bytes()
    task = RowTask(table="t", row_id="r", config={}, row_dir="", evaluation="likelihood", data_label="")
    assert pickle.loads(pickle.dumps(PackTask((task, task)))).tasks[1] == task  # any executor can ship it


@pytest.mark.slow
def test_a_row_saved_before_a_config_key_existed_is_found_under_its_old_name(tiny_data, tmp_path, monkeypatch):
    """Adding a config key (with a default) changes every row's hash; a finished row whose saved
    config, read now, is the row's config is still answered from its folder, not retrained."""
    import yaml

    fits = _count_fits(monkeypatch)
    row = ["mnist-1layer-iwae-k5"]
    first = reproduce("iwae-table", budget="quick", only=row, results=tmp_path, overrides=TINY)
    assert len(fits) == 1
    rows = tmp_path / "iwae-table" / "quick" / "rows"
    (folder,) = rows.iterdir()
    cfg_path = folder / "run" / "config.yaml"
    saved = yaml.safe_load(cfg_path.read_text())
    del saved["model"]["posterior"]  # as written before the key existed
    cfg_path.write_text(yaml.safe_dump(saved))
    folder.rename(rows / "mnist-1layer-iwae-k5-0123456789")
    again = reproduce("iwae-table", budget="quick", only=row, results=tmp_path, overrides=TINY)
    assert len(fits) == 1 and again.cached == row
    assert again.entries[0].cells["nll"].ours == first.entries[0].cells["nll"].ours
    # a changed value is another config: that folder is not taken for this row
    saved["objective"]["k"] = 7
    cfg_path = rows / "mnist-1layer-iwae-k5-0123456789" / "run" / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(saved))
    reproduce("iwae-table", budget="quick", only=row, results=tmp_path, overrides=TINY)
    assert len(fits) == 2


# --- workers never outlive the command, and the rerun resumes ------------------------------------

REAL_ROWS = ["mnist-1layer-vae-k5", "mnist-1layer-iwae-k5"]
#: 10 steps a row on the embedded data, a tiny model, checkpoints every 2 steps
REAL_TINY = ["data.name=binarized-mnist-embedded", "train.epochs=1", "train.batch_size=1000", "model.hidden=[8]",
             "model.latent_dim=2", "eval.k_importance=5", "train.checkpoint_minutes=0", "train.checkpoint_steps=2"]


def _reproduce_cli(results, stop_at: str | None = None):
    import os
    import subprocess
    import sys

    from elbolab.files import TEST_STOP_ENV

    env = {k: v for k, v in os.environ.items() if k != TEST_STOP_ENV}
    if stop_at:
        env[TEST_STOP_ENV] = stop_at  # inherited by the spawned workers: each freezes at its own step
    # --no-stack: the two rows share a shape, and stacked they would be one worker's task
    cmd = [sys.executable, "-m", "elbolab.cli", "reproduce", "iwae-table", "--only", *REAL_ROWS, "--workers", "2",
           "--no-stack", "--results", str(results), *(a for s in REAL_TINY for a in ("--set", s))]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _state(pid: int) -> str | None:
    """The process's state letter (R, S, T, Z ...), None when it is gone."""
    from pathlib import Path

    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _frozen_children(parent: int, n: int, timeout: float = 300.0) -> list[int]:
    """Wait until ``n`` children of ``parent`` froze themselves at their fault point (state T)."""
    import time
    from pathlib import Path

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        frozen = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent and fields[0] == "T":
                frozen.append(int(stat.parent.name))
        if len(frozen) == n:
            return frozen
        assert _state(parent) not in (None, "Z"), "the reproduction ended before its workers froze"
        time.sleep(0.2)
    raise AssertionError(f"{n} workers did not reach their fault point")


def _wait_gone(pids: list[int], timeout: float = 90.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_state(p) not in (None, "Z") for p in pids):
        time.sleep(0.2)
    assert all(_state(p) in (None, "Z") for p in pids), f"orphan workers still running: {pids}"


@pytest.mark.slow  # worker processes signalled and killed
def test_workers_die_with_the_parent_on_sigterm_and_sigkill_and_the_rerun_resumes(tmp_path) -> None:
    """`reproduce --workers 2` in real processes, both workers frozen mid-row (holding their runs).
    SIGTERM to the parent alone: it stops its workers (each checkpoints) and exits 130 like Ctrl-C.
    SIGKILL to the parent: the kernel's parent-death signal stops the workers. Each time no worker
    is left running, and the last rerun finishes both rows from their checkpoints."""
    import os
    import signal

    results = tmp_path / "results"
    pids: list[int] = []
    try:
        parent = _reproduce_cli(results, stop_at="step#3")
        pids = _frozen_children(parent.pid, 2)
        parent.send_signal(signal.SIGTERM)
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        _, err = parent.communicate(timeout=120)
        assert parent.returncode == 130, err
        _wait_gone(pids)
        runs = sorted(results.glob("iwae-table/quick/rows/*/run"))
        assert len(runs) == 2
        for run in runs:  # stopped cleanly: checkpoint at the step they were at
            assert json.loads((run / "run.json").read_text())["status"] == "interrupted"

        parent = _reproduce_cli(results, stop_at="step#3")  # resumes, then freezes 3 steps further
        pids = _frozen_children(parent.pid, 2)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        _wait_gone(pids)
    finally:
        for pid in pids:
            if _state(pid) not in (None, "Z"):
                os.kill(pid, signal.SIGKILL)
    threads = torch.get_num_threads()
    try:  # the rerun, in this process (one worker): every row resumes from its checkpoint
        code = main(["reproduce", "iwae-table", "--only", *REAL_ROWS, "--results", str(results),
                     *(a for s in REAL_TINY for a in ("--set", s))])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    for run in sorted(results.glob("iwae-table/quick/rows/*/run")):
        assert json.loads((run / "run.json").read_text())["status"] == "finished"
        assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]
        assert (run.parent / "result.json").exists()


# --- the cache trusts a result only with its weights and config; bad files: one line ------------


def _row_folder(tmp_path, row: str):
    return next((tmp_path / "iwae-table" / "quick" / "rows").glob(f"{row}-*"))


def test_an_edited_result_is_recomputed_and_one_without_its_weights_is_not_used(tiny_data, tmp_path, monkeypatch):
    fits = _count_fits(monkeypatch)
    row = ROWS[:1]
    first = reproduce("iwae-table", budget="quick", only=row, results=tmp_path, overrides=TINY)
    truth = first.entries[0].cells["nll"].ours
    path = _row_folder(tmp_path, row[0]) / "result.json"
    edited = json.loads(path.read_text())
    edited["metrics"]["nll"] = 80.0
    path.write_text(json.dumps(edited))
    # the table is written from the result.json alone: the edit is not trusted and not shown
    table = reproduce("iwae-table", budget="quick", only=row, results=tmp_path, overrides=TINY, train=False)
    assert table.entries[0].cells["nll"].ours == truth and not table.cached
    # a rerun evaluates the saved weights again (no training) and writes a trusted result
    again = reproduce("iwae-table", budget="quick", only=row, results=tmp_path, overrides=TINY)
    assert len(fits) == 1 and again.trained == row and again.entries[0].cells["nll"].ours == truth
    assert json.loads(path.read_text())["metrics"]["nll"] == truth
    # the weights deleted: the edited number never reaches the table; the row fails, naming the file
    path.write_text(json.dumps(edited))
    (path.parent / "run" / "model.safetensors").unlink()
    gone = reproduce("iwae-table", budget="quick", only=row, results=tmp_path, overrides=TINY)
    assert gone.failed == row and "model.safetensors: missing" in gone.entries[0].error
    assert gone.entries[0].cells["nll"].ours == truth  # the value committed before, not 80.00


def test_a_new_evaluation_k_reevaluates_the_saved_weights(tiny_data, tmp_path, monkeypatch) -> None:
    fits = _count_fits(monkeypatch)
    row = ROWS[:1]
    reproduce("iwae-table", budget="quick", only=row, results=tmp_path, overrides=TINY)
    # the scoring alone keeps train.threads, though no training sets it
    threads = []
    scorer = rows.EVALUATORS["likelihood"]
    monkeypatch.setitem(rows.EVALUATORS, "likelihood", lambda *a: threads.append(torch.get_num_threads()) or scorer(*a))
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        more = reproduce("iwae-table", budget="quick", only=row, results=tmp_path,
                         overrides={**TINY, "eval.k_importance": 40, "train.threads": 1})
    finally:
        torch.set_num_threads(before)
    assert threads == [1]
    assert len(fits) == 1 and more.trained == row and more.entries[0].k_importance == 40
    assert len(list((tmp_path / "iwae-table" / "quick" / "rows").iterdir())) == 1  # the same folder


class _KilledScoring:
    """A row's model whose IS scoring takes 500 s per call on evaluation's clock and is
    interrupted at call ``calls + 1``, as a killed process would stop."""

    def __init__(self, model, calls: int, clock: list[float]) -> None:
        self.model, self.calls, self.clock = model, calls, clock

    def __getattr__(self, name):
        return getattr(self.model, name)

    def log_weights(self, x, k):
        self.clock[0] += 500.0
        if self.calls == 0:
            raise KeyboardInterrupt
        self.calls -= 1
        return self.model.log_weights(x, k)


def test_a_row_scored_over_two_sittings_counts_both_in_its_eval_seconds(tiny_data, tmp_path, monkeypatch) -> None:
    from types import SimpleNamespace

    from elbolab import evaluation

    clock = [0.0]
    monkeypatch.setattr(evaluation, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    monkeypatch.setattr(evaluation, "SAVE_EVERY_S", 0.0)
    scorer = rows.EVALUATORS["likelihood"]
    monkeypatch.setitem(rows.EVALUATORS, "likelihood", lambda model, *a: scorer(_KilledScoring(model, 2, clock), *a))
    args = dict(budget="quick", only=ROWS[:1], results=tmp_path, overrides={**TINY, "eval.batch_size": 20})
    with pytest.raises(KeyboardInterrupt):  # 2 of 5 batches of 20 kept, at 1,000 s on the clock
        reproduce("iwae-table", **args)
    monkeypatch.setitem(rows.EVALUATORS, "likelihood", scorer)
    rep = reproduce("iwae-table", **args)
    result = json.loads((_row_folder(tmp_path, ROWS[0]) / "result.json").read_text())
    assert rep.cached == [] and 1000.0 <= result["eval_seconds"] < 1500.0
    assert "earlier_seconds" not in result["metrics"]


def test_bad_results_paths_and_files_are_one_line_exit_2(tiny_data, tmp_path, capsys) -> None:
    (tmp_path / "file").write_text("x")
    assert main(["reproduce", "surgery-table", "--table-only", "--results", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert "--results" in err and "is not a folder" in err and len(err.strip().splitlines()) == 1

    reproduce("iwae-table", budget="quick", only=ROWS[:1], results=tmp_path / "r", overrides=TINY)
    path = _row_folder(tmp_path / "r", ROWS[0]) / "result.json"
    bad = json.loads(path.read_text())
    bad["metrics"] = "x"
    path.write_text(json.dumps(bad))
    args = ["reproduce", "iwae-table", "--table-only", "--only", ROWS[0], "--results", str(tmp_path / "r"),
            *(f"--set={k}={v}" for k, v in TINY.items())]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{path}: not a row result (metrics is str" in err and len(err.strip().splitlines()) == 1

    path.unlink()
    table = tmp_path / "r" / "iwae-table" / "quick" / "table.json"
    doc = json.loads(table.read_text())
    doc["rows"][0]["cells"] = "x"
    table.write_text(json.dumps(doc))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{table}: not a reproduction table" in err and len(err.strip().splitlines()) == 1


def test_the_peer_column_comes_from_peer_json_as_it_is_now(tiny_data, tmp_path) -> None:
    row = ROWS[1]  # mnist-1layer-vae-k1
    reproduce("iwae-table", budget="quick", only=[row], results=tmp_path, overrides=TINY)
    out = tmp_path / "iwae-table" / "quick"
    for value in (101.5, 99.25):  # a committed row shows the peer file's current value
        (out / "peer.json").write_text(json.dumps({"rows": {row: {"value": value, "stderr": 0.5}}}))
        table = reproduce("iwae-table", budget="quick", only=[row], results=tmp_path, overrides=TINY, train=False)
        md = table.outputs["markdown"].read_text()
        assert "| NLL (nats) paper | ours | peer | Δ |" in md and f"| {value:.2f} ± 0.50 ‼ |" in md
        assert "more than 3 standard errors" in md  # one epoch on 500 images is nowhere near 100 nats
    ours = table.entries[0].cells["nll"]
    (out / "peer.json").write_text(json.dumps({"rows": {row: {"value": ours.ours + 0.1, "stderr": 0.5}}}))
    md = reproduce("iwae-table", budget="quick", only=[row], results=tmp_path, overrides=TINY,
                   train=False).outputs["markdown"].read_text()
    assert f"| {ours.ours + 0.1:.2f} ± 0.50 |" in md and "‼" not in md
    (out / "peer.json").write_text(json.dumps({"rows": {row: {"value": "x"}}}))
    with pytest.raises(ConfigError, match="peer.json: not a peer results file"):
        reproduce("iwae-table", budget="quick", only=[row], results=tmp_path, overrides=TINY, train=False)
