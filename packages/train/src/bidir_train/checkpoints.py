"""Training checkpoints under output_dir/checkpoints/step-NNNNNNNN/: written, published, found and loaded.

A checkpoint holds the sharded model (its trainable parameters: with LoRA, the adapters) and optimizer (DCP:
`.metadata` + `*.distcp`), `trainer_state.json` (step, data position, learning-rate scheduler: JSON, it cannot
carry code) and `rng-rank<R>.safetensors` (each rank's RNG
state: tensors only). Nothing loaded from a run folder can run code: DCP's own reader unpickles `.metadata` with
plain `pickle.load` and its default planner reads non-tensor values with `torch.load(weights_only=False)` (torch
2.13, torch/distributed/checkpoint/filesystem.py and default_planner.py), so both are replaced here by readers that
accept only the classes and values a DCP checkpoint holds.

A checkpoint is built under `step-N.tmp`, its files and folder fsynced, then renamed into place (and the parent
fsynced): a visible checkpoint is complete, also after a power loss. Resuming takes the newest checkpoint that
loads; a damaged one is skipped with a warning naming its file.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from bidir_core.errors import BidirError, one_line
from bidir_core.file_writes import fsync_dir, fsync_file, set_plain_modes
from bidir_core.jsonfile import read_json_object, write_json_atomic
from bidir_train.config import TrainConfig

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
FORMAT_VERSION = 1
START_OVER = "checkpoint.resume=false starts the run over"


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Published checkpoints, oldest first (one being written still has its .tmp name)."""
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [
        p
        for p in root.glob("step-*")
        if p.is_dir() and p.name.removeprefix("step-").isdigit()  # not step-N.tmp
    ]
    return sorted(done, key=lambda p: int(p.name.removeprefix("step-")))


class Checkpointer:
    """The training checkpoints of a run: the newest one that loads is resumed from (checkpoint.resume), one is
    saved every checkpoint.every_steps and at a schedule.stop_at_step stop (never at the end: final/ is written)."""

    def __init__(self, cfg: TrainConfig, model, optimizer, scheduler):
        self.cfg, self.output_dir = cfg.checkpoint, cfg.output_dir
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler

    def load(self) -> dict | None:
        """The resumed trainer state (step, epoch, step_in_epoch), or None: a fresh start."""
        if not self.cfg.resume:
            return None
        return load_latest(self.output_dir, self.model, self.optimizer, self.scheduler)

    def due(self, step: int, *, stop: int, total: int) -> bool:
        periodic = self.cfg.every_steps and step % self.cfg.every_steps == 0
        return step != total and bool(periodic or step == stop)  # a stop_at_step stop always leaves one

    def save(self, state: dict) -> None:
        save_checkpoint(self.output_dir, self.model, self.optimizer, self.scheduler, state, self.cfg.keep)


# ------------------------------------------------------------------------------------------------------ save


def save_checkpoint(output_dir: Path, model, optimizer, scheduler, state: dict, keep: int) -> None:
    """Write checkpoint step-{state['step']} (collective: every rank calls it) and keep the newest `keep`.
    A write that fails (a full disk) removes the partial folder and raises a BidirError naming the file."""
    root = output_dir / CHECKPOINTS
    final = root / f"step-{state['step']:08d}"
    tmp = root / f"step-{state['step']:08d}.tmp"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    error = None
    try:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(model))
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)  # fsyncs its files (sync_files)
        # Per-rank RNG (no dropout in the model today, but a resumed run must continue exactly as the straight one).
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, tmp / f"rng-rank{rank}.safetensors")
        if rank == 0:
            trainer_state = {"format_version": FORMAT_VERSION, **state, "scheduler": scheduler.state_dict()}
            write_json_atomic(tmp / TRAINER_STATE, trainer_state)
        _fsync_files(tmp, rank)
    except (OSError, SafetensorError, CheckpointException) as e:
        error = _write_error(e, tmp)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    bad = next((e for e in errors if e is not None), None)
    if bad is not None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise BidirError(f"{bad}; the checkpoint was not written (the previous ones are intact)")
    if rank == 0:
        fsync_dir(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # the checkpoint appears complete or not at all
        fsync_dir(root)
        for old in checkpoint_dirs(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def _write_error(e: BaseException, tmp: Path) -> str:
    """'FILE: cannot write (reason)' of a failed checkpoint write (DCP wraps each rank's error)."""
    if isinstance(e, CheckpointException):
        e = next(iter(e.failures.values()), (e,))[0] if e.failures else e
    if isinstance(e, OSError):
        return f"{e.filename or tmp}: cannot write ({e.strerror or one_line(e)})"
    return f"{tmp}: cannot write ({one_line(e)})"


def _fsync_files(folder: Path, rank: int) -> None:
    """fsync the files this rank wrote (DCP's own are already synced; fsyncing them again is cheap), after giving
    them a plain write's permissions (safetensors leaves its files 0600)."""
    names = [f"rng-rank{rank}.safetensors"] + ([TRAINER_STATE] if rank == 0 else [])
    for name in names:
        set_plain_modes(folder / name)
        fsync_file(folder / name)


# ------------------------------------------------------------------------------------------------------ load


def load_latest(output_dir: Path, model, optimizer, scheduler) -> dict | None:
    """Load the newest checkpoint that loads into model, optimizer, scheduler and the RNG; returns its trainer
    state (step, epoch, step_in_epoch), or None when there is no checkpoint. A damaged checkpoint is skipped with a
    warning naming the file; when none loads, a BidirError names them and the way to start over."""
    found = checkpoint_dirs(output_dir)
    problems = []
    for path in reversed(found):
        state, problem = _try_load(path, model, optimizer, scheduler)
        if problem is None:
            if problems and dist.get_rank() == 0:
                warnings.warn(
                    f"resuming from {path.name}: skipped the damaged {'; '.join(problems)}", stacklevel=2
                )
            return state
        problems.append(problem)
    if problems:
        raise BidirError(f"no checkpoint loads: {'; '.join(problems)}; {START_OVER}")
    return None


def _try_load(path: Path, model, optimizer, scheduler) -> tuple[dict | None, str | None]:
    """(trainer state, None) after loading checkpoint `path`, or (None, why it is damaged). Every rank calls it
    and every rank gets the same answer. A failed load may leave the model half-loaded; the next one overwrites
    all of it."""
    rank = dist.get_rank()
    local = None
    try:
        state = _read_trainer_state(path / TRAINER_STATE)
        rng = _read_rng(path / f"rng-rank{rank}.safetensors")
        _check_sizes(path, SafeReader(path).read_metadata())  # one-line errors, before DCP wraps them
    except BidirError as e:
        local = one_line(e)
    except Exception as e:
        # e.g. metadata of allowed classes whose fields have the wrong types: damaged all the same
        local = _load_error(e, path)
    problem = _first_problem(local)
    if problem is not None:
        return None, problem
    try:
        options = _options(model)
        model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
        loaded = {"model": model_sd, "optim": optim_sd}
        dcp.load(loaded, checkpoint_id=path, storage_reader=SafeReader(path), planner=SafeLoadPlanner())
        set_state_dict(
            model,
            optimizer,
            model_state_dict=loaded["model"],
            optim_state_dict=loaded["optim"],
            options=options,
        )
        scheduler.load_state_dict(state.pop("scheduler"))
    except (Exception, CheckpointException) as e:  # whatever fails, this checkpoint is unusable
        local = _load_error(e, path)
    problem = _first_problem(local)
    if problem is not None:
        return None, problem
    if rng is not None:  # absent when resuming on more ranks than saved: seeds then stay as set
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return state, None


def _options(model) -> StateDictOptions:
    """Only trainable parameters are checkpointed: with LoRA the frozen base is read from model.path again on
    resume (recipe.json pins it), and a checkpoint holds the adapters and their optimizer state. (dcp.load fills
    every key asked for, so nothing trainable can be missing; the frozen ones are left as loaded.)"""
    frozen = any(not p.requires_grad for p in model.parameters())
    return StateDictOptions(ignore_frozen_params=frozen, strict=not frozen)


def _check_sizes(path: Path, metadata: Metadata) -> None:
    """Every data file is inside the checkpoint and as long as the metadata says: a truncated one is named (DCP's
    read would give a bare EOFError)."""
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = path / name
        if path.resolve() not in file.resolve().parents:
            raise BidirError(f"{path / '.metadata'}: refused, names {name}, a file outside the checkpoint")
        if not file.is_file():
            raise BidirError(f"{file}: missing")
        if file.stat().st_size < size:
            raise BidirError(f"{file}: truncated ({file.stat().st_size} bytes, its metadata says {size})")


def _first_problem(local: str | None) -> str | None:
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, local)
    return next((p for p in problems if p is not None), None)


def _load_error(e: BaseException, path: Path) -> str:
    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]
    if isinstance(e, BidirError):
        message = one_line(e)
        return message if str(path) in message else f"{path}: {message}"
    return f"{path}: cannot be read ({type(e).__name__}: {one_line(e)[:300]})"


def _read_trainer_state(path: Path) -> dict:
    if not path.is_file():
        legacy = path.with_name("trainer_state.pt")
        if legacy.is_file():
            raise BidirError(f"{legacy}: an older trainer state format (a pickle, which is never loaded)")
        raise BidirError(f"{path}: missing")
    state = read_json_object(path)
    ints = ("step", "epoch", "step_in_epoch")
    if state.get("format_version") != FORMAT_VERSION or not all(isinstance(state.get(k), int) for k in ints):
        raise BidirError(f"{path}: not a trainer state of format version {FORMAT_VERSION}")
    if not isinstance(state.get("scheduler"), dict):
        raise BidirError(f"{path}: has no scheduler state")
    state.pop("format_version")
    return state


def _read_rng(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        rng = load_file(path)
    except (SafetensorError, OSError) as e:
        raise BidirError(f"{path}: not a readable safetensors file ({one_line(e)})") from None
    if not isinstance(rng.get("torch"), torch.Tensor) or rng["torch"].dtype != torch.uint8:
        raise BidirError(f"{path}: has no torch RNG state")
    return rng


# -------------------------------------------------------------------- DCP readers that cannot run code


# Every global a DCP `.metadata` pickle names (torch 2.13), found by recording an unpickler's find_class calls on
# a saved checkpoint; torch dtypes are allowed by value below.
_METADATA_GLOBALS = {
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        )
    ),
}


class _MetadataUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only the globals of DCP metadata: a crafted `.metadata` naming os.system,
    builtins.eval or anything else fails before anything is called."""

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"names {module}.{name}, which DCP metadata never holds")


class SafeReader(FileSystemReader):
    """FileSystemReader whose `.metadata` is read by _MetadataUnpickler instead of pickle.load."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except (OSError, EOFError, pickle.UnpicklingError, AttributeError, TypeError, ValueError) as e:
            raise BidirError(f"{path}: refused, not a DCP metadata file ({one_line(e)})") from None
        if not isinstance(metadata, Metadata):
            raise BidirError(f"{path}: refused, not a DCP metadata file (a {type(metadata).__name__})")
        # As FileSystemReader.read_metadata does after unpickling.
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose non-tensor values (the optimizer's lr, betas, flags) must pass
    torch.load(weights_only=True) before the default load reads them from the same bytes."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        data = value.read()
        try:
            torch.load(io.BytesIO(data), weights_only=True)
        except pickle.UnpicklingError as e:
            raise BidirError(
                f"a value of {read_item.dest_index.fqn} refused: not plain data ({one_line(e)[:200]})"
            ) from None
        super().load_bytes(read_item, io.BytesIO(data))
