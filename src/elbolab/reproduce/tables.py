"""Paper tables -> rows -> one RunConfig per row, with the paper's protocol scaled by a budget.

The published numbers and each row's defining keys live in ``papers.yaml``; this module
adds what a table's rows share: the base protocol (a preset or a dict of keys), the
budgets (how many epochs quick, medium and paper mean), and the evaluation each row
gets ("likelihood": IS log-likelihood and active units on the test set; "surgery":
ELBO surgery over the training set).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError, RunConfig, parse_overrides, preset
from ..data import resolve_data_dir
from ..errors import did_you_mean
from ..objectives import OBJECTIVES, vae_plan
from ..runs import resume_free
from ..schedules import iwae_epochs
from .figures import ROW_FIGURES, TABLE_FIGURES

PAPERS_FILE = Path(__file__).with_name("papers.yaml")

#: the budgets every table knows, smallest first
BUDGETS = ("quick", "medium", "paper")


@dataclass(frozen=True)
class PaperValue:
    #: as printed in the paper (a number, or a string such as "26+7" for active units)
    value: float | str | None
    #: where it sits in the paper's table
    column: str
    #: how it was checked (see papers.yaml); None: not verified against any source
    checked: str | None

    @property
    def verified(self) -> bool:
        return self.checked is not None


@dataclass(frozen=True)
class Metric:
    name: str
    label: str
    #: nll | higher | plain | active_units: how ours is compared with the paper's
    kind: str


@dataclass(frozen=True)
class RowSpec:
    id: str
    #: dotted config keys that make this row (model, objective, k, dataset, prior...)
    setup: dict[str, Any]
    values: dict[str, PaperValue]
    #: extra figures the row saves beside the table (names of figures.ROW_FIGURES)
    figures: tuple[str, ...] = ()
    #: what differs from the paper's architecture, for a row that is a stand-in (None: faithful)
    stand_in: str | None = None


@dataclass(frozen=True)
class Protocol:
    """What a table's rows share, and what each budget changes."""

    #: a preset name from config.PRESETS, or None for RunConfig defaults
    preset: str | None
    #: keys set on top of the preset for every row
    base: dict[str, Any]
    #: budget name -> keys it sets (epochs, schedule lengths, K of the estimator)
    budgets: dict[str, dict[str, Any]]
    #: likelihood | surgery (see rows.EVALUATORS)
    evaluation: str
    #: one line per budget for the docs and the table header
    budget_notes: dict[str, str] = field(default_factory=dict)
    #: row id -> budget -> keys set on top of the budget's, for rows too costly for the
    #: table's protocol at that budget (stated in ``row_budget_notes``)
    row_budgets: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    #: row id -> budget -> one line saying what that row's budget is
    row_budget_notes: dict[str, dict[str, str]] = field(default_factory=dict)

    def notes_for(self, budget: str) -> dict[str, str]:
        """Row id -> its own budget note, for the rows whose protocol differs at ``budget``."""
        return {row: notes[budget] for row, notes in self.row_budget_notes.items() if budget in notes}


@dataclass(frozen=True)
class TableSpec:
    name: str
    title: str
    source: str
    citation: str
    table: str
    metrics: tuple[Metric, ...]
    rows: tuple[RowSpec, ...]
    protocol: Protocol
    #: table figures (figures.TABLE_FIGURES names) -> the rows each is drawn from, in order
    figures: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def row(self, row_id: str) -> RowSpec:
        for r in self.rows:
            if r.id == row_id:
                return r
        hint = did_you_mean(row_id, [r.id for r in self.rows])
        raise ConfigError(f"--only {row_id}: no such row in {self.name}{hint}")


#: the VampPrior table's convolutional rows and their quick budget (see PROTOCOLS)
_CONV_ROWS = ("mnist-convhvae-vampprior", "mnist-pixelhvae-vampprior")
_CONV_QUICK: dict[str, Any] = {
    "train.epochs": 1, "objective.warmup_epochs": 0, "eval.k_importance": 100, "eval.test_images": 500,
}
_CONV_QUICK_NOTE = ("1 epoch, no warm-up, test LL from K = 100 on 500 test images chosen at random (seed 0): "
                    "one epoch takes 26-36 min of a CPU core, K = 1000 9-11 s per test image")

#: the VLAE row (issue 29): a PixelCNN over 28 x 28 maps of 64 channels per importance sample, so
#: its quick budget is one epoch scored on 500 test images, as the convolutional rows'
_VLAE_ROW_BUDGETS: dict[str, dict[str, dict[str, Any]]] = {"mnist-vlae": {"quick": _CONV_QUICK}}
_VLAE_ROW_NOTES: dict[str, dict[str, str]] = {"mnist-vlae": {"quick": (
    "1 epoch, no warm-up, test LL from K = 100 on 500 test images chosen at random (seed 0): one epoch "
    "(500 steps of batch 100) takes 10.5 min of a CPU core and K = 100 0.4 s per test image, so the paper "
    "budget (at most 2,000 epochs) is up to 350 core-hours; GPU not measured "
    "(python benchmarks/vlae_step.py [--device cuda])")}}
#: AVB + AC (row mnist-avb-ac): its own epochs and AIS at each budget (the authors': 2,500,000
#: steps of 64 images, 2,667 epochs of 60,000); see _AVB_NOTES for the cost
_AVB_ROW = "mnist-avb-ac"
_AVB_BUDGETS: dict[str, dict[str, Any]] = {
    "quick": {"train.epochs": 3, "objective.warmup_epochs": 0, "eval.test_images": 200, "model.avb.ais_steps": 100,
              "model.avb.ais_chains": 4, "model.avb.ais_leapfrog": 5},
    "medium": {"train.epochs": 100, "eval.test_images": 2048, "model.avb.ais_steps": 500,
               "model.avb.ais_chains": 5, "model.avb.ais_leapfrog": 10},
    "paper": {"train.epochs": 2667, "eval.test_images": 2048, "model.avb.ais_steps": 1000,
              "model.avb.ais_chains": 5, "model.avb.ais_leapfrog": 10},
}
_AVB_NOTES = {
    "quick": "3 epochs; test LL by AIS, T = 100 intermediate distributions, 4 chains, 5 leapfrog steps, "
             "200 test images (seed 0). Cost, one thread: 78 ms of CPU time per paired step, 1.2 CPU-min per "
             "epoch of 60,000 (benchmarks/avb_step.py); wall time on this shared 2-core CPU under load: "
             "7.7 min per epoch and 1.3 s per AIS test image (one epoch and 50 images, measured)",
    "medium": "100 epochs; AIS T = 500, 5 chains, 10 leapfrog, 2,048 test images",
    "paper": "2,667 epochs (the authors' 2,500,000 steps of 64); AIS T = 1,000, 5 chains, 10 leapfrog, "
             "2,048 test images (the paper's protocol as we read it). At 78 ms per step: 54 CPU-hours; on a "
             "GPU not measured (estimate: these MLPs are launch-bound, a few ms per step, 2-4 GPU-hours; "
             "measure with benchmarks/avb_step.py --device cuda); AIS about 5 s per image on a CPU core",
}

#: The protocols. Epochs per budget are stated here and in docs/reproduce.md.
PROTOCOLS: dict[str, Protocol] = {
    # Burda et al. section 5 (the iwae-paper preset: Adam eps 1e-4, batch 20, dynamic
    # binarization, the 3^i schedule); budgets cut the schedule after fewer passes, so
    # the learning rate follows the paper's decay as far as the run goes.
    "iwae-table": Protocol(
        preset="iwae-paper",
        base={"train.eval_every": 0},
        budgets={
            "quick": {"train.epochs": iwae_epochs(3), "eval.k_importance": 5000},
            "medium": {"train.epochs": iwae_epochs(5), "eval.k_importance": 5000},
            "paper": {"train.epochs": iwae_epochs(8), "eval.k_importance": 5000},
        },
        evaluation="likelihood",
        budget_notes={
            "quick": f"{iwae_epochs(3)} epochs (3^i passes i = 0..2), test NLL from K = 5000",
            "medium": f"{iwae_epochs(5)} epochs (passes i = 0..4), test NLL from K = 5000",
            "paper": f"{iwae_epochs(8)} epochs (passes i = 0..7, the paper), test NLL from K = 5000",
        },
    ),
    # Hoffman & Johnson do not state the training protocol; ours: the IWAE paper's
    # one-layer MLP (200-200 tanh), single-sample ELBO, Adam lr 1e-3, batch 100,
    # dynamic binarization; surgery over all 60,000 training images.
    "surgery-table": Protocol(
        preset=None,
        base={
            "objective.name": "vae", "objective.k": 1, "data.binarization": "dynamic",
            "model.hidden": [200, 200], "train.batch_size": 100, "train.lr": 1e-3, "train.eval_every": 1,
            # the model fits the fused step (elbolab.fused): the same training, about 1.7x faster
            "train.fused": "auto",
        },
        budgets={
            "quick": {"train.epochs": 10},
            "medium": {"train.epochs": 100},
            "paper": {"train.epochs": 1000},
        },
        evaluation="surgery",
        budget_notes={
            "quick": "10 epochs",
            "medium": "100 epochs",
            "paper": "1000 epochs (the note states none; our choice, long enough for the ELBO to settle)",
        },
    ),
    # Tomczak & Welling: the vampprior-paper preset (hierarchical VAE, lr 5e-4, batch 100,
    # warm-up 100 epochs, early stopping 50, at most 2,000 epochs, K = 5000).
    "vampprior-table": Protocol(
        preset="vampprior-paper",
        base={},
        budgets={
            "quick": {"train.epochs": 10, "objective.warmup_epochs": 5, "train.early_stopping_patience": 0,
                      "eval.k_importance": 5000},
            "medium": {"train.epochs": 200, "eval.k_importance": 5000},
            "paper": {},
        },
        evaluation="likelihood",
        budget_notes={
            "quick": "10 epochs, KL warm-up over 5, no early stopping, test LL from K = 5000 "
                     "(the convolutional rows: their own, below)",
            "medium": "at most 200 epochs, warm-up 100, early stopping 50, K = 5000",
            "paper": "at most 2000 epochs, warm-up 100, early stopping 50, K = 5000 (the paper)",
        },
        # ConvHVAE and PixelHVAE cost ~100x the MLP model per image (convolutions at 28 x 28
        # with 64 channels, and 500 pseudo-inputs through a conv encoder every step): one
        # epoch is about half an hour of a CPU core and K = 1000 about 10 s per test image
        # (docs/priors.md), so their quick budget is one epoch scored on 500 test images
        row_budgets={**{row: {"quick": _CONV_QUICK} for row in _CONV_ROWS}, **_VLAE_ROW_BUDGETS,
                     _AVB_ROW: _AVB_BUDGETS},
        row_budget_notes={**{row: {"quick": _CONV_QUICK_NOTE} for row in _CONV_ROWS}, **_VLAE_ROW_NOTES,
                          _AVB_ROW: _AVB_NOTES},
    ),
}


def _paper_value(raw: Any, where: str) -> PaperValue:
    if not isinstance(raw, dict) or "column" not in raw or "checked" not in raw or "value" not in raw:
        raise ConfigError(f"{PAPERS_FILE}: {where}: a cell needs value, column and checked")
    return PaperValue(value=raw["value"], column=str(raw["column"]), checked=raw["checked"])


@cache
def load_tables(path: Path = PAPERS_FILE) -> dict[str, TableSpec]:
    """Read papers.yaml into table specs (strictly: a malformed cell names its row)."""
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: unreadable ({e})") from None
    sources = doc["sources"]
    tables: dict[str, TableSpec] = {}
    for name, t in doc["tables"].items():
        if name not in PROTOCOLS:
            raise ConfigError(f"{path}: table {name!r} has no protocol in tables.PROTOCOLS")
        metrics = tuple(Metric(m, v["label"], v["kind"]) for m, v in t["metrics"].items())
        rows = []
        for r in t["rows"]:
            values = {m: _paper_value(v, f"{name}/{r['id']}/{m}") for m, v in r["values"].items()}
            unknown = set(values) - {m.name for m in metrics}
            if unknown:
                raise ConfigError(f"{path}: {name}/{r['id']}: unknown metrics {sorted(unknown)}")
            figures = tuple(r.get("figures") or ())
            bad = [f for f in figures if f not in ROW_FIGURES]
            if bad:
                raise ConfigError(f"{path}: {name}/{r['id']}: unknown figures {bad}; known: {sorted(ROW_FIGURES)}")
            rows.append(RowSpec(id=r["id"], setup=dict(r["setup"]), values=values, figures=figures,
                                stand_in=r.get("stand_in")))
        ids = [r.id for r in rows]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"{path}: {name}: duplicate row ids")
        stray = sorted(set(PROTOCOLS[name].row_budgets) - set(ids))
        if stray:
            raise ConfigError(f"{path}: {name}: tables.PROTOCOLS sets budgets for rows it lacks: {stray}")
        figures = {str(f): tuple(r) for f, r in (t.get("figures") or {}).items()}
        for f, fig_rows in figures.items():
            if f not in TABLE_FIGURES:
                raise ConfigError(f"{path}: {name}: unknown table figure {f!r}; known: {sorted(TABLE_FIGURES)}")
            if sorted(set(fig_rows) - set(ids)):
                raise ConfigError(f"{path}: {name}: figure {f} names rows it lacks: {sorted(set(fig_rows) - set(ids))}")
        src = sources[t["source"]]
        tables[name] = TableSpec(
            name=name, title=t["title"], source=t["source"], citation=src["citation"], table=t["table"],
            metrics=metrics, rows=tuple(rows), protocol=PROTOCOLS[name], figures=figures,
        )
    return tables


def get_table(name: str) -> TableSpec:
    tables = load_tables()
    if name not in tables:
        raise ConfigError(f"table: unknown table {name!r}{did_you_mean(name, sorted(tables))}")
    return tables[name]


def select_rows(table: TableSpec, only: list[str] | None) -> list[RowSpec]:
    """The rows ``--only`` names (in table order), or all of them."""
    if not only:
        return list(table.rows)
    wanted = {table.row(r).id for r in only}
    return [r for r in table.rows if r.id in wanted]


# --- OMNIGLOT: the paper's file if the user has it, else our own 28x28 version -----

CHARDATA_RELPATH = "omniglot/chardata.mat"


def resolve_omniglot(data_dir: str | None) -> tuple[str, str]:
    """(dataset name, label): Burda et al.'s chardata.mat when present in the data
    directory, else elbolab's own 28x28 build, labelled so no one mistakes it for theirs."""
    if (resolve_data_dir(data_dir) / CHARDATA_RELPATH).is_file():
        return "omniglot-chardata", "omniglot-chardata (Burda et al.'s chardata.mat)"
    return "omniglot-28-elbolab", "omniglot-28-elbolab (not the Burda split)"


@dataclass(frozen=True)
class RowPlan:
    row: RowSpec
    config: RunConfig
    #: the dataset as printed in the table
    data_label: str

    @property
    def key(self) -> str:
        """The row folder's key: what defines the training (see :func:`train_key`)."""
        return train_key(self.config)

    @property
    def result_key(self) -> str:
        """What defines the row's numbers: training and evaluation (see :func:`config_key`)."""
        return config_key(self.config)


#: keys that do not change what a row computes, left out of its cache key
_KEY_IGNORED = {("train", "threads"), ("train", "progress"), ("train", "device"), ("train", "compile"),
                ("train", "fused"), ("train", "fused_backend"), ("data", "data_dir"), ("eval", "gpu_chunk_size"),
                # logging and monitoring never change what is trained
                ("train", "monitor_every"), ("train", "monitor_points"), ("train", "wandb"),
                ("train", "wandb_mode"), ("train", "wandb_project")}


def _same_as_vae_k1(cfg: RunConfig) -> bool:
    """True when the objective is the single-sample ELBO: VAE and IWAE at k = 1 (and MIWAE,
    PIWAE at k = m = 1) follow one bound with one gradient (objectives.vae_plan(1))."""
    return OBJECTIVES[cfg.objective.name](cfg.objective) == vae_plan(1)


def _key_dict(cfg: RunConfig) -> dict[str, Any]:
    d = cfg.to_dict()
    for section, key in _KEY_IGNORED:
        d.get(section, {}).pop(key, None)
    if _same_as_vae_k1(cfg):
        d["objective"]["name"] = "vae"
    return d


def _hash(d: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


def config_key(cfg: RunConfig) -> str:
    """Short hash of everything that defines a row's result (not threads, device, compilation,
    paths). Objectives that compute the same thing share a key (``vae`` for every k = 1
    ELBO), so the k = 1 VAE and IWAE rows of a table train once."""
    return _hash(_key_dict(cfg))


def train_key(cfg: RunConfig) -> str:
    """Short hash of what defines a row's training: :func:`config_key` without the evaluation
    settings a run may change after training (``runs.resume_free``: every ``eval`` key but the
    seed of the validation bound). A row's folder is named by it, so a new K or test subset
    re-evaluates the saved weights instead of training again."""
    d = _key_dict(cfg)
    d["eval"] = {k: v for k, v in d.get("eval", {}).items() if not resume_free(f"eval.{k}")}
    return _hash(d)


def result_overrides(notes: list[str]) -> list[str]:
    """The ``key=value`` overrides among ``notes`` that can change a row's result (not
    device, threads, paths...), normalized and sorted: two tables with equal lists hold
    comparable rows."""
    ignored = {f"{section}.{key}" for section, key in _KEY_IGNORED}
    out = []
    for note in notes:
        key, _, value = str(note).partition("=")
        if key.strip() not in ignored:
            out.append(f"{key.strip()}={value.strip()}")
    return sorted(out)


def row_config(
    table: TableSpec, row: RowSpec, budget: str, data_dir: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> RowPlan:
    """The RunConfig of one row: preset, shared keys, the row's keys, the budget, then
    the user's ``--set`` overrides; a missing preset or config key names the piece."""
    protocol = table.protocol
    if budget not in protocol.budgets:
        raise ConfigError(f"--budget: unknown budget {budget!r}; choose one of {', '.join(BUDGETS)}")
    keys: dict[str, Any] = dict(protocol.base)
    keys.update(row.setup)
    keys.update(protocol.budgets[budget])
    keys.update(protocol.row_budgets.get(row.id, {}).get(budget, {}))
    data_label = str(keys.get("data.name", ""))
    if keys.get("data.name") == "omniglot":
        keys["data.name"], data_label = resolve_omniglot(data_dir)
    if data_dir:
        keys["data.data_dir"] = data_dir
    keys.update(overrides or {})
    if "data.name" in (overrides or {}):
        data_label = str(keys["data.name"])
    try:
        base = preset(protocol.preset) if protocol.preset else RunConfig()
        cfg = base.with_overrides(keys)
    except ConfigError as e:
        raise ConfigError(f"{table.name}/{row.id}: {e}") from None
    return RowPlan(row=row, config=cfg, data_label=data_label)


def plan_rows(
    table: TableSpec, budget: str, only: list[str] | None = None, data_dir: str | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> list[RowPlan]:
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    return [row_config(table, r, budget, data_dir, overrides) for r in select_rows(table, only)]
