"""The run directory of `lutq train`:

    run.json            the TrainConfig (and the resolved facts: cache L, world size, versions)
    train.jsonl         one JSON object per logged step (train metrics, eval metrics, lr, grad norm, speed)
    training_log.csv    the same rows, fixed columns (RunDir.columns), empty cells where not measured
    best/               checkpoint with the lowest validation KD loss
    last/               latest checkpoint + trainer_state/ (optimizer, scheduler, RNG, step) for --resume
    eval_units.json     the per-unit sums (KD batches, perplexity windows) of the step-0 evaluation and of the
                        latest one, so summary.md can pair the final numbers against the initial ones
    summary.md          written at the end (or when the run stops on a NaN)

Rows are keyed by optimizer step, one row per step at most. A resume from step s first truncates both
logs to the rows with step <= s, so a run killed after its last save never shows duplicated rows.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from typing import Any

from lutq.core.atomic import atomic_write_json, atomic_write_text
from lutq.core.errors import LutqError
from lutq.core.formats import read_json

RUN_JSON = "run.json"
JSONL = "train.jsonl"
CSV = "training_log.csv"
SUMMARY = "summary.md"
EVAL_UNITS = "eval_units.json"

TRAIN_COLUMNS = ("loss", "kd", "kl", "ce", "top1_agree", "label_ce", "full_kl")
EVAL_COLUMNS = ("eval_loss", "eval_kd", "eval_kl", "eval_top1_agree", "eval_label_ce", "eval_full_kl")
TAIL_COLUMNS = ("lr", "grad_norm", "tokens_per_s", "elapsed")


def csv_columns(ppl_names: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The CSV header: step, tokens, train loss + components, eval metrics (+ eval_ppl_<name>), lr, ..."""
    return ["step", "tokens", *TRAIN_COLUMNS, *EVAL_COLUMNS, *(f"eval_ppl_{n}" for n in ppl_names), *TAIL_COLUMNS]


def ppl_name(spec: str) -> str:
    """A column-safe name for a corpus spec: 'shakespeare:val' -> 'shakespeare_val'."""
    stem = Path(spec).stem if ("/" in spec or spec.endswith((".txt", ".json", ".jsonl"))) else spec
    return "".join(c if c.isalnum() else "_" for c in stem).strip("_")


class RunDir:
    """Paths and log files of one training run (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._columns: list[str] | None = None

    @property
    def best(self) -> Path:
        return self.path / "best"

    @property
    def last(self) -> Path:
        return self.path / "last"

    @property
    def jsonl(self) -> Path:
        return self.path / JSONL

    @property
    def csv(self) -> Path:
        return self.path / CSV

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY

    @property
    def eval_units_path(self) -> Path:
        return self.path / EVAL_UNITS

    def exists(self) -> bool:
        return (self.path / RUN_JSON).is_file()

    # -- config ---------------------------------------------------------------------------------------
    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_json(self.path / RUN_JSON, config)

    def read_config(self) -> dict[str, Any]:
        data = read_json(self.path / RUN_JSON, what="training run")
        if not isinstance(data, dict):
            raise LutqError(f"{self.path / RUN_JSON}: expected a JSON object, got {type(data).__name__}")
        return data

    # -- logs -----------------------------------------------------------------------------------------
    def start_logs(self, columns: list[str]) -> None:
        """Create empty logs with `columns` as the CSV header (a fresh run)."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.jsonl, "")
        atomic_write_text(self.csv, _csv_line(columns))
        self._columns = list(columns)

    def columns(self) -> list[str]:
        """The CSV header of this run."""
        if self._columns is not None:
            return self._columns
        if not self.csv.is_file():
            raise LutqError(f"{self.csv}: missing (the run was never started?)")
        with self.csv.open(newline="") as f:
            header = next(csv.reader(f), None)
        if not header:
            raise LutqError(f"{self.csv}: empty file, no header")
        self._columns = header
        return header

    def log(self, row: dict[str, Any]) -> None:
        """Append one row (must have 'step') to train.jsonl and training_log.csv."""
        columns = self.columns()
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        with self.csv.open("a", newline="") as f:
            f.write(_csv_line([_cell(row.get(c)) for c in columns]))

    def rows(self) -> list[dict[str, Any]]:
        """All rows of train.jsonl (a torn last line from a kill is ignored)."""
        if not self.jsonl.is_file():
            return []
        out = []
        for line in self.jsonl.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def truncate(self, step: int, columns: list[str] | None = None) -> None:
        """Keep only rows with row['step'] <= step in both logs (used when resuming from `step`); `columns`
        replaces the CSV header (a resume that adds a --ppl-text), the rows are rewritten from train.jsonl."""
        columns = list(columns) if columns is not None else self.columns()
        self._columns = columns
        rows = [r for r in self.rows() if r.get("step", 0) <= step]
        atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_text(
            self.csv, _csv_line(columns) + "".join(_csv_line([_cell(r.get(c)) for c in columns]) for r in rows)
        )

    def clear(self) -> None:
        """Remove what a previous run wrote here (only lutq's own files; other files stay)."""
        for d in (self.best, self.last, self.path / "tensorboard"):
            shutil.rmtree(d, ignore_errors=True)
        for f in (self.path / RUN_JSON, self.jsonl, self.csv, self.summary, self.eval_units_path):
            f.unlink(missing_ok=True)
        self._columns = None

    # -- evaluation units -------------------------------------------------------------------------------
    def save_eval_units(self, step: int, units: dict[str, Any]) -> None:
        """Keep an evaluation's per-unit sums (`kd_units`, `ppl_segments`): step 0's as "initial", any
        step's as "latest" (replacing the one before)."""
        saved = self.eval_units()
        record = {"step": step, **units}
        if step == 0:
            saved["initial"] = record
        saved["latest"] = record
        atomic_write_json(self.eval_units_path, saved)

    def eval_units(self) -> dict[str, Any]:
        """{"initial": ..., "latest": ...} as saved (either may be missing; {} before the first evaluation, or
        when the file is unreadable: the units only add intervals to the summary, they never stop a run)."""
        try:
            data = json.loads(self.eval_units_path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def ppl_names(self) -> list[str]:
        """The held-out texts this run's CSV has a perplexity column for."""
        return [c.removeprefix("eval_ppl_") for c in self.columns() if c.startswith("eval_ppl_")]

    # -- checkpoints ----------------------------------------------------------------------------------
    def resume_config(self) -> dict[str, Any]:
        """The TrainConfig (a dict) a resume continues: the one the resume checkpoint was saved under (so the
        flags of an earlier --resume, e.g. a longer --steps, carry over), else run.json's."""
        config = self.read_config().get("config", {})
        try:
            ckpt = self.resume_checkpoint()
        except LutqError:
            return config  # the trainer says why there is nothing to resume
        info = read_json(ckpt / "config.json", what="lutq checkpoint")
        saved = info.get("extra", {}).get("train", {}).get("config") if isinstance(info, dict) else None
        return saved if isinstance(saved, dict) else config

    def last_step(self) -> int | None:
        """The step of the `last/` checkpoint (from its trainer_state/state.json), None when none was saved."""
        state = self.last / "trainer_state" / "state.json"
        try:
            return int(json.loads(state.read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def resume_checkpoint(self) -> Path:
        """The checkpoint to resume from: last/, or the previous last/ that a kill in the middle of its
        replacement left as .last.old-*; stale temporary directories are removed."""
        for tmp in self.path.glob(".last.*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)
        if (self.last / "trainer_state" / "state.pt").is_file():
            return self.last
        old = sorted(self.path.glob(".last.old-*"), key=lambda p: p.stat().st_mtime)
        if old and (old[-1] / "trainer_state" / "state.pt").is_file():
            return old[-1]
        raise LutqError(
            f"{self.path}: nothing to resume from (no last/ checkpoint with trainer_state; "
            "the run was killed before its first save); start it again: remove the directory or choose another --out "
            "(`lutq train` also takes --overwrite)"
        )


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def _csv_line(values: list[Any]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(values)
    return buf.getvalue()


def read_csv(path: str | Path) -> list[dict[str, str]]:
    """Rows of a training_log.csv as dicts of strings."""
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))
