"""The run folder (logging.output_dir): checked before the model loads, written only once training starts.

`check_run_folder(cfg, device)` runs first: the folder must be writable, and a folder that holds an earlier run may
be resumed only with the same recipe (model.precision=auto is decided there: with_precision), up to the keys in
RESUMABLE (how a run is shown, saved and sharded, not what it computes), and from the same model and data
(inputs.json, bidir_train.run_inputs). `RunFolder.open()` is the first write (before the first metrics row or
checkpoint): it removes stale temporary folders of ours, writes recipe.json and inputs.json on a fresh start (a
resume keeps the ones the run started with), and cuts metrics.jsonl back to the resumed step. So a run that stops on
bad input before its first step leaves nothing.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings

import torch
import torch.distributed as dist

from bidir_core.checkpoint import check_replaceable
from bidir_core.devices import resolve_precision
from bidir_core.errors import BidirError
from bidir_core.folders import remove_stale_temps
from bidir_core.jsonfile import read_json_object, write_json_atomic, write_jsonl_atomic
from bidir_core.outputs import check_writable
from bidir_train.checkpoints import CHECKPOINTS, START_OVER, checkpoint_dirs
from bidir_train.config import TrainConfig
from bidir_train.lora import ADAPTER, check_adapter_replaceable
from bidir_train.run_inputs import INPUTS, check_same_inputs, input_identity, with_source_pooling

RECIPE = "recipe.json"
METRICS = "metrics.jsonl"
FINAL = "final"

# Recipe keys (a prefix ending in "." covers a section) that may differ when a run resumes: none changes the data,
# the model or the optimizer. Resuming stays exact; forward_chunk_size, packing, max_tokens_per_forward and
# cache_chunk_size change only the rounding, as resuming on another number of ranks does. eval.dev / eval.split are
# not here: the dev scores of one run must stay comparable.
RESUMABLE = (
    "name",
    "logging.",
    "checkpoint.",
    "parallel.",
    "schedule.stop_at_step",
    "schedule.forward_chunk_size",
    "schedule.packing",
    "schedule.max_tokens_per_forward",
    "loss.cache_chunk_size",
    "eval.every_steps",
    "eval.batch_size",
    "eval.before_training",
)


def check_run_folder(cfg: TrainConfig, device: torch.device) -> tuple[TrainConfig, dict]:
    """Before any work: output_dir can be written, and an earlier run in it has the same recipe and inputs (or
    checkpoint.resume=false was given). Returns the recipe with the source's pooling filled in (when unset) and
    model.precision=auto decided (with_precision), and the identity of its inputs (bidir_train.run_inputs). Writes
    nothing (a probe file is created and removed)."""
    check_writable(cfg.output_dir / RECIPE)  # the first file a run writes there
    final = cfg.output_dir / FINAL
    if final.exists() and not (final.is_dir() and not any(final.iterdir())):
        # The run ends by replacing final/: refuse now, not after hours of training, when that would be refused
        # (a folder that is not a bidir checkpoint, or one holding a file we did not write).
        check_replaceable(final)
    if cfg.lora is not None:
        check_adapter_replaceable(cfg.output_dir / ADAPTER)
    # The model source is read from here on: after the folder checks, which need no model.
    cfg = with_precision(with_source_pooling(cfg), device)
    if cfg.checkpoint.resume:
        _check_same_recipe(cfg)
    inputs = input_identity(cfg)
    if cfg.checkpoint.resume:
        check_same_inputs(cfg.output_dir / INPUTS, cfg, inputs)
    return cfg, inputs


def with_precision(cfg: TrainConfig, device: torch.device) -> TrainConfig:
    """cfg with model.precision=auto made bf16 or fp32, so that recipe.json says what ran. A run being resumed keeps
    the one its recipe.json records (a run started with bf16 on a CPU with AMX resumes in bf16 on one without, so
    resuming stays exact); a fresh run gets the one that suits `device` (bidir_core.devices.resolve_precision)."""
    if cfg.model.precision != "auto":
        return cfg
    precision = resolve_precision("auto", device)
    path = cfg.output_dir / RECIPE
    if cfg.checkpoint.resume and path.is_file():
        try:
            recorded = read_json_object(path).get("model", {}).get("precision")
        except (BidirError, AttributeError):
            recorded = None  # _check_same_recipe says what is wrong with the file
        if recorded in ("bf16", "fp32"):
            precision = recorded
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, precision=precision))


def _check_same_recipe(cfg: TrainConfig) -> None:
    path = cfg.output_dir / RECIPE
    if not path.is_file():
        if checkpoint_dirs(cfg.output_dir):
            raise BidirError(
                f"{path}: missing, so the checkpoints beside it cannot be checked against this recipe; {START_OVER}"
            )
        return
    try:
        old = read_json_object(path)
    except BidirError as e:
        raise BidirError(f"{e}; {START_OVER}") from None
    differ = recipe_differences(old, recipe_json(cfg), defaults=recipe_json(TrainConfig()))
    if differ:
        raise BidirError(
            f"{path}: this run folder holds a run of another recipe (it differs in {', '.join(differ)}); "
            f"use another logging.output_dir, or {START_OVER}"
        )


def recipe_json(cfg: TrainConfig) -> dict:
    """The recipe as recipe.json holds it (tuples as lists)."""
    return json.loads(json.dumps(cfg.to_dict()))


def recipe_differences(old: dict, new: dict, defaults: dict | None = None) -> list[str]:
    """Dotted keys whose values differ between two recipes (missing on one side counts), RESUMABLE ones left out.

    With defaults (a default recipe), a key the old recipe lacks counts as its default value: a recipe.json written
    before a field existed still resumes when the new recipe leaves that field at its default."""
    a, b = _flatten(old), _flatten(new)
    if defaults is not None:
        a = {**{k: v for k, v in _flatten(defaults).items() if not _covered(k, a)}, **a}
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k, _MISSING) != b.get(k, _MISSING) and not _resumable(k)]


_MISSING = object()


def _covered(key: str, flat: dict) -> bool:
    """The flattened recipe holds key, a key inside it, or the section it is in (an optional section such as lora
    is a leaf when null and a subtree when set)."""
    return any(k == key or k.startswith(key + ".") or key.startswith(k + ".") for k in flat)


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _resumable(key: str) -> bool:
    return any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESUMABLE)


class RunFolder:
    """output_dir's metrics and recipe, written by rank 0 from the first write on (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, resume_step: int | None, inputs: dict):
        self.cfg = cfg
        self.inputs = inputs  # check_run_folder's identity of the model and data, for inputs.json
        self.dir = cfg.output_dir
        self.metrics = self.dir / METRICS
        self.resume_step = resume_step
        self.rank0 = dist.get_rank() == 0
        self.opened = False
        self.kept: list[dict] = []

    def open(self) -> None:
        if self.opened:
            return
        self.opened = True
        if not self.rank0:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(
            self.dir / FINAL
        )  # what a killed write of final/ left (write_checkpoint's temp folders)
        root = self.dir / CHECKPOINTS
        for stale in root.glob("step-*.tmp") if root.is_dir() else ():
            shutil.rmtree(stale, ignore_errors=True)
        if self.resume_step is None:
            self._start_over()
        else:
            write_jsonl_atomic(self.metrics, self.kept)
            if not (self.dir / INPUTS).is_file():  # a run folder from before inputs.json: checked from now on
                write_json_atomic(self.dir / INPUTS, self.inputs)

    def _start_over(self) -> None:
        if not self.cfg.checkpoint.resume:  # asked to start over: the earlier run's checkpoints and model go
            for old in checkpoint_dirs(self.dir):
                shutil.rmtree(old)
            if (self.dir / FINAL).exists():
                check_replaceable(self.dir / FINAL)  # a user's files in final/ are never deleted
                shutil.rmtree(self.dir / FINAL)
            if (self.dir / ADAPTER).exists():
                check_adapter_replaceable(self.dir / ADAPTER)
                shutil.rmtree(self.dir / ADAPTER)
        write_json_atomic(self.dir / RECIPE, recipe_json(self.cfg))
        write_json_atomic(self.dir / INPUTS, self.inputs)
        self.metrics.write_text("")

    def read_metrics(self) -> None:
        """On resume, before anything is written (rank 0): the metrics rows up to the resumed step, which open()
        writes back. Rows past the checkpoint belong to the interrupted attempt: the resumed run writes them again.
        A torn last line (the write was cut short) is dropped with a warning; any other bad line is an error."""
        if self.resume_step is None or not self.metrics.is_file():
            return
        lines = self.metrics.read_text(encoding="utf-8", errors="replace").splitlines()
        rows = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
            elif number == len(lines):
                warnings.warn(f"{self.metrics}:{number}: dropped a torn last line", stacklevel=2)
            else:
                raise BidirError(
                    f"{self.metrics}:{number}: not a metrics row; fix or delete the line, or {START_OVER}"
                )
        self.kept = [r for r in rows if r["step"] <= self.resume_step]

    def write(self, row: dict) -> None:
        self.open()
        if self.rank0:
            try:
                with self.metrics.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            except OSError as e:
                raise BidirError(f"{self.metrics}: cannot write ({e.strerror or e})") from None
