"""Checkpoints that survive a crash during the save, hold data only, and resume.

Layout under the run directory::

    checkpoints/step_000020/shards/      model + optimizer, torch.distributed.checkpoint (DCP) format
    checkpoints/step_000020/meta.json    step, schedule, data position, RNG, history, config, and
                                         the size and checksum (CRC-32) of every shard file
    checkpoints/latest                   the name of the newest complete one

A save writes into a hidden temporary folder, flushes it, renames it into place and only then moves
the `latest` pointer (write-then-rename, atomic on POSIX). A crash at any point leaves the previous
checkpoint and pointer as they were; the next save removes the leftover. A save that fails (a full
disk) removes its temporary folder and says how much space is left. The shards are written per rank
and resharded on load, so a run saved at N processes resumes at M.

Nothing in a run directory runs as code (README, "What a checkpoint may contain"). `meta.json` is
JSON; tuples and tensors (the RNG states) are tagged in it so that they come back exactly. DCP
pickles its index (`shards/.metadata`) and the non-tensor values in the shards (the optimizer's
hyperparameters), and reads them with `pickle.load` and `torch.load(weights_only=False)`, which run
whatever a pickle names. Here the index is read by an unpickler that admits only the classes an index
holds, and those values by torch's weights-only unpickler; a file that names anything else is refused
in one line (`CheckpointRefused`) with nothing in it run. The pickled `meta.pt` of earlier versions
is refused unopened.

Damage is caught before it is trained on: `damage` compares every file with the size and checksum
recorded when it was saved (and `meta.json` with its own checksum); `resume_point` moves a damaged
checkpoint aside with a warning and resumes from the newest intact one; `load` verifies a checkpoint
that did not come through `resume_point`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from resrl import lora
from resrl.checkpoint_format import (
    CHECKSUM,
    CheckpointRefused,
    IndexReader,
    NotAnIndex,
    WeightsOnlyPlanner,
    file_checksums,
    from_json,
    json_checksum,
    read_index,
    to_json,
)
from resrl.config import Config, ConfigError, RunError, resume_changes
from resrl.distributed import SINGLE, World, all_gather_objects
from resrl.tracker import warn

META_FILE = "meta.json"
# The pickled meta file of checkpoints written before meta.json: refused, never opened.
OLD_META_FILE = "meta.pt"
SHARDS = "shards"
INDEX = f"{SHARDS}/.metadata"
POINTER = "latest"
# meta.json's layout. A checkpoint of another format is refused, not guessed at.
FORMAT = 1


class _Damaged(Exception):
    """What is wrong with a checkpoint folder, relative to it (for `damage`)."""


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(
    run_dir: str | os.PathLike,
    step: int,
    *,
    module: nn.Module,
    optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer],
    meta: dict[str, Any],
    keep: int = 2,
    world: World = SINGLE,
    frozen: dict[str, nn.Module] | None = None,
    trainable_only: bool = False,
) -> Path:
    """Checkpoint `step`: model and optimizer through torch.distributed.checkpoint (each rank writes
    its shards; loadable at another process count), `meta` (schedule, data position, RNG, history:
    None, bools, numbers, strings, lists, tuples, dicts and tensors) and the size and checksum of
    every shard file, in meta.json from rank 0. `frozen` modules (the KL reference) are saved beside
    the model under their names. Point `latest` at it and keep the newest `keep`. Called by every
    rank. A failed write (a full disk) removes the temporary folder and raises RunError naming the
    path and the free space, on every rank."""
    root = Path(run_dir) / "checkpoints"
    name = f"step_{step:06d}"
    tmp = root / f".{name}.tmp"
    final = root / name
    # Before anything is written: a value JSON cannot hold fails here, on every rank.
    encoded = to_json(meta, "meta")

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        # Leftovers of a save that crashed (this step's or an earlier one's).
        for leftover in root.glob(".step_*.tmp"):
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir()

    def write_meta() -> None:
        # Every rank's shards are written once dcp.save has returned (it ends with a collective).
        shards = [str(p.relative_to(tmp)) for p in (tmp / SHARDS).rglob("*") if p.is_file()]
        sums = file_checksums(tmp, shards)
        files = {rel: {"bytes": (tmp / rel).stat().st_size, CHECKSUM: sums[rel]} for rel in sorted(shards)}
        body = {"format": FORMAT, "files": files, "meta": encoded}
        with open(tmp / META_FILE, "w", encoding="ascii") as f:
            f.write(json.dumps({**body, CHECKSUM: json_checksum(body)}, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def publish() -> None:
        # The same step saved again (the warm start's checkpoints are all step 0): the old folder
        # is set aside, not deleted, until the new one is in place (`_restore_set_aside`).
        old = root / f".{name}.old"
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        pointer_tmp = root / f".{POINTER}.tmp"
        pointer_tmp.write_text(name + "\n")
        os.replace(pointer_tmp, root / POINTER)
        _fsync_dir(root)

    def write_shards() -> None:
        model_sd, optim_sd = _state(module, optimizer, trainable_only)
        state = {"model": model_sd, "optim": optim_sd}
        for key, frozen_module in (frozen or {}).items():
            state[key] = get_model_state_dict(frozen_module)
        with _single_process():
            dcp.save(state, checkpoint_id=str(tmp / SHARDS), no_dist=not _dist_ready())

    try:
        _on_main(prepare, world)
        write_shards()
        _on_main(write_meta, world)
        _on_main(publish, world)
    except (Exception, CheckpointException) as e:
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        cause = _cause(e, OSError)
        if cause is None:
            raise
        raise RunError(
            f"cannot write the checkpoint of step {step} to {tmp}: {cause.strerror or cause} "
            f"({_free_space(root)} free there); the partial folder was removed and the previous "
            f"checkpoint ({latest(run_dir) or 'none yet'}) is intact"
        ) from e
    if world.is_main:
        for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    barrier(world)
    return final


def _options(trainable_only: bool) -> StateDictOptions | None:
    """What a checkpoint holds of the module: everything, or (a LoRA run: the base is a folder of
    its own) the trainable parameters only, loaded back without touching the frozen ones."""
    if not trainable_only:
        return None
    return StateDictOptions(ignore_frozen_params=True, strict=False)


def _state(module: nn.Module, optimizer, trainable_only: bool) -> tuple[dict, dict]:
    """(model, optimizer) state dicts to save or to load into. `ignore_frozen_params` keeps a frozen
    weight tied to another name (the LM head tied to the embedding), so the trainable names are
    kept explicitly."""
    model_sd, optim_sd = get_state_dict(module, optimizer, options=_options(trainable_only))
    if trainable_only:
        keep = {n for n, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}
        model_sd = {k: v for k, v in model_sd.items() if k in keep}
    return model_sd, optim_sd


def _on_main(work: Any, world: World) -> None:
    """Run `work()` on rank 0, then let every rank know whether it failed: a rank waiting at a
    barrier for a rank 0 that raised would wait forever. Other ranks raise an OSError too."""
    error = None
    if world.is_main:
        try:
            work()
        except OSError as e:
            error = e
    if world.distributed:
        failed = all_gather_objects(None if error is None else (error.errno, error.strerror), world)[0]
        if failed is not None and error is None:
            error = OSError(*failed)
    if error is not None:
        raise error


def _dist_ready() -> bool:
    """Whether a process group exists (several processes, or one for CPU offload)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@contextlib.contextmanager
def _single_process() -> Iterator[None]:
    """torch.distributed.checkpoint warns on every save and load without a process group, even when
    told so with no_dist=True (torch 2.13). One process is a supported way to save here (the
    checkpoint loads at any process count), so that one warning is silenced; others still show."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message="torch.distributed is disabled, unavailable or uninitialized",
            category=UserWarning,
        )
        yield


def _cause(e: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The exception of type `kind` behind a failed save or load: raised directly, chained, or one
    rank's failure inside the CheckpointException that torch.distributed.checkpoint raises."""
    seen = set()
    todo = [e]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kind):
            return e
        if isinstance(e, CheckpointException):
            todo.extend(failure for failure, _ in e.failures.values())
        todo.extend([e.__cause__, e.__context__])
    return None


def _free_space(path: Path) -> str:
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        free = float(shutil.disk_usage(path).free)
    except OSError:
        return "unknown space"
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if free < 1024 or unit == "GiB":
            break
        free /= 1024
    return f"{free:.0f} bytes" if unit == "bytes" else f"{free:.1f} {unit}"


# ---------------------------------------------------------------------------- meta.json and the index


def _read_meta_file(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """A checkpoint's file list ({relative path: {"bytes", CHECKSUM}}) and meta, from meta.json.
    Raises CheckpointRefused for the pickled meta.pt of earlier versions (unopened) and for another
    format, _Damaged when meta.json is missing, is not JSON or does not match its checksum."""
    if (path / OLD_META_FILE).exists():
        raise CheckpointRefused(
            f"{path / OLD_META_FILE}: a pickled meta file (resrl's checkpoint format before "
            f"{META_FILE}), which could run code when opened; this resrl reads {META_FILE} only and did "
            "not open it. Finish that run with the resrl version that wrote it, or start over with "
            "run.resume=false (the old run is moved aside, not deleted)"
        )
    file = path / META_FILE
    if not file.is_file():
        raise _Damaged(f"{META_FILE} is missing")
    try:
        content = json.loads(file.read_bytes())
        body = {key: content[key] for key in ("format", "files", "meta")}
        saved = content[CHECKSUM]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _Damaged(f"{META_FILE} is unreadable ({_first_line(e)})") from e
    if json_checksum(body) != saved:
        raise _Damaged(f"{META_FILE} does not match its checksum (changed since it was saved)")
    if body["format"] != FORMAT:
        raise CheckpointRefused(
            f"{file}: checkpoint format {body['format']!r}; this resrl reads format {FORMAT} only"
        )
    try:
        files = {
            rel: {"bytes": int(f["bytes"]), CHECKSUM: str(f[CHECKSUM])} for rel, f in body["files"].items()
        }
        return files, from_json(body["meta"])
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise _Damaged(f"{META_FILE} is unreadable ({_first_line(e)})") from e


def _first_line(e: BaseException) -> str:
    if isinstance(e, KeyError):
        return f"no {e.args[0]!r} entry"
    return (str(e).splitlines() or [type(e).__name__])[0][:120]


def load_meta(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's meta (step, schedule, data position, RNG, history, config) from its meta.json,
    with the types it was saved with. Raises CheckpointRefused for an old pickled meta.pt and
    RunError for a damaged meta.json."""
    path = Path(path)
    try:
        return _read_meta_file(path)[1]
    except _Damaged as e:
        raise RunError(f"checkpoint {path} is damaged ({e})") from None


def _read_index(path: Path) -> Metadata:
    """The DCP index of the checkpoint at `path`, read as data only (`read_index`). Raises
    CheckpointRefused for one that names anything else, _Damaged for one missing or unreadable."""
    file = path / INDEX
    if not file.is_file():
        raise _Damaged(f"{INDEX} is missing")
    try:
        return read_index(file)
    except NotAnIndex as e:
        raise _Damaged(f"{INDEX} is unreadable ({e})") from None


# ---------------------------------------------------------------------------- damage and resume


def latest(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / POINTER
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / META_FILE).is_file():
            return candidate
    complete = sorted(p for p in root.glob("step_*") if (p / META_FILE).is_file())
    return complete[-1] if complete else None


def damage(path: str | os.PathLike) -> str | None:
    """What is wrong with a checkpoint folder (meta.json missing, unreadable or not matching its
    checksum; the index or a shard file missing, or of another size or checksum than when it was
    saved), or None when it is intact. Reads every file. Raises CheckpointRefused for one
    that could run code: an index that names anything but DCP's classes (checked first, so that a
    planted index is refused whether or not meta.json was rewritten to match it), the pickled
    meta.pt of earlier versions."""
    path = Path(path)
    try:
        files, _ = _read_meta_file(path)
        _read_index(path)
    except _Damaged as e:
        return str(e)
    for rel, saved in files.items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != saved["bytes"]:
            return f"{rel} has {f.stat().st_size} bytes, {saved['bytes']} when it was saved"
    sums = file_checksums(path, list(files))
    for rel, saved in files.items():
        if sums[rel] != saved[CHECKSUM]:
            return f"{rel} does not match its checksum from when it was saved: CRC-32 {sums[rel]}, was {saved[CHECKSUM]}"
    return None


# Checkpoints verified in this process, with their files' sizes and modification times then, so
# that `load` after `resume_point` does not read every shard a second time.
_verified: dict[Path, tuple] = {}


def _stat(path: Path) -> tuple:
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return tuple((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files)


def _restore_set_aside(root: Path) -> None:
    """A save of a step already saved that crashed between setting the old folder aside and moving
    the new one in: the old one goes back (it is complete)."""
    for old in root.glob(".step_*.old"):
        final = root / old.name.removeprefix(".").removesuffix(".old")
        if not final.exists():
            os.replace(old, final)


def find_intact(run_dir: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest intact checkpoint of a run (or None), and the damaged ones newer than it with
    what is wrong with each, newest first. Raises CheckpointRefused (see `damage`)."""
    root = Path(run_dir) / "checkpoints"
    damaged = []
    for path in sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True):
        problem = damage(path)
        if problem is None:
            return path, damaged
        damaged.append((path, problem))
    return None, damaged


def resume_point(run_dir: Path, cfg: Config, world: World = SINGLE) -> tuple[Path | None, dict[str, list]]:
    """Where a run resumes (README, "Resume rules"): the newest intact checkpoint, after moving
    damaged newer ones aside with a warning and checking the config against the checkpoint's; and
    the changes run.resume=force allowed ({key: [saved, now]}). (None, {}) for a new run; with
    run.resume=false a previous run in the directory is moved aside first. Called by every rank;
    rank 0 reads the checkpoints."""
    if cfg.run.resume is False:
        if world.is_main:
            _set_aside_previous_run(run_dir)
        barrier(world)
        return None, {}
    found, damaged, refused = None, [], None
    if world.is_main:
        _restore_set_aside(Path(run_dir) / "checkpoints")
        try:
            found, damaged = find_intact(run_dir)
        except CheckpointRefused as e:
            refused = str(e)
        for path, problem in damaged:
            aside = _unused(path.with_name(f"damaged_{path.name}"))
            path.rename(aside)
            warn(f"checkpoint {path} is damaged ({problem}); moved to {aside}")
    found, damaged, refused = all_gather_objects((found, bool(damaged), refused), world)[0]
    if refused is not None:
        raise CheckpointRefused(refused)
    if found is None:
        if damaged:
            raise RunError(
                f"no intact checkpoint in {run_dir / 'checkpoints'} to resume from (the damaged ones were "
                "moved aside); run.resume=false starts over"
            )
        return None, {}
    _verified[found.resolve()] = _stat(found)
    meta = load_meta(found)
    changes = resume_changes(meta["config"], cfg, str(found), saved_model=meta.get("model_shapes"))
    if meta["step"] > cfg.train.steps:
        raise ConfigError(
            f"config train.steps={cfg.train.steps} is below step {meta['step']} of the checkpoint {found}; "
            f"pass train.steps >= {meta['step']}, or run.resume=false to start over"
        )
    return found, changes


# What a run leaves in its directory (rollout_init/, the vLLM engine's start, is rewritten anyway).
RUN_FILES = (
    "checkpoints",
    "metrics.jsonl",
    "tensorboard",
    "eval",
    "final",
    "summary.json",
    "config.json",
    "config_changes.jsonl",
)


def _set_aside_previous_run(run_dir: Path) -> None:
    """Move what a previous run left in the run directory into replaced-<time>/, so that its
    checkpoints never mix with (or rotate out) the new run's, and nothing is deleted."""
    found = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    if not found:
        return
    aside = _unused(run_dir / time.strftime("replaced-%Y%m%d-%H%M%S"))
    aside.mkdir()
    for path in found:
        path.rename(aside / path.name)
    warn(f"run.resume=false: the previous run in {run_dir} was moved to {aside}")


def _unused(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`, ... whichever does not exist yet."""
    k, candidate = 1, path
    while candidate.exists():
        k += 1
        candidate = path.with_name(f"{path.name}-{k}")
    return candidate


def load(
    path: str | os.PathLike,
    *,
    module: nn.Module,
    optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer],
    frozen: dict[str, nn.Module] | None = None,
    trainable_only: bool = False,
) -> dict[str, Any]:
    """Restore model, optimizer and the named `frozen` modules (resharded to this run's
    processes) in place; return the meta. The checkpoint is verified first (`damage`; once per
    process: `resume_point` has done it for the checkpoint it picked) and its pickled parts are
    read as data only. Raises RunError for a damaged one, CheckpointRefused for one that could
    run code."""
    path = Path(path)
    if not (path / META_FILE).is_file() and not (path / OLD_META_FILE).exists():
        raise FileNotFoundError(f"no checkpoint at {path} (expected {path / META_FILE})")
    try:
        if _verified.get(path.resolve()) != _stat(path):
            problem = damage(path)
            if problem is not None:
                raise _Damaged(problem)
            _verified[path.resolve()] = _stat(path)
        index = _read_index(path)
    except _Damaged as e:
        raise RunError(f"checkpoint {path} is damaged ({e}); resume from another checkpoint") from None
    options = _options(trainable_only)
    model_sd, optim_sd = _state(module, optimizer, trainable_only)
    state = {"model": model_sd, "optim": optim_sd}
    for key, frozen_module in (frozen or {}).items():
        state[key] = get_model_state_dict(frozen_module)
    shards = path / SHARDS
    try:
        with _single_process():
            dcp.load(
                state,
                storage_reader=IndexReader(shards, index),
                planner=WeightsOnlyPlanner(shards),
                no_dist=not _dist_ready(),
            )
    except (Exception, CheckpointException) as e:
        refused = _cause(e, CheckpointRefused)
        if refused is None:
            raise
        raise refused from None
    set_state_dict(
        module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options
    )
    for key, frozen_module in (frozen or {}).items():
        set_model_state_dict(frozen_module, state[key])
    return load_meta(path)


def check_saved_with(meta: dict[str, Any], path: Path, cfg: Any, *, reference: bool) -> None:
    """One line when the checkpoint cannot resume this config (`cfg`): saved with R²PO's rollout
    head and resumed without (or the reverse), or a KL reference wanted (`reference`) that it lacks."""
    if bool(meta.get("has_rollout_head")) != cfg.r2po.enabled:
        saved = "with" if meta.get("has_rollout_head") else "without"
        raise ConfigError(
            f"config r2po.enabled={cfg.r2po.enabled}: the checkpoint {path} was saved {saved} R²PO's "
            f"rollout head; resume with r2po.enabled={not cfg.r2po.enabled}, or start a new run"
        )
    if reference and not meta.get("has_reference"):
        raise ConfigError(
            f"config algorithm.kl_coef={cfg.algorithm.kl_coef}, objective={cfg.algorithm.objective}, "
            f"r2po.head_kl_coef={cfg.r2po.head_kl_coef}: the checkpoint {path} has no KL reference model "
            "(it was saved without a KL term and ACE); resume with the settings it was saved with, or "
            "start a new run"
        )


def apply_optim_config(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
) -> None:
    """The optimizer's hyperparameters from this run's config, not the checkpoint's (which loading
    restored): they equal unless run.resume=force changed them, and then config.json must describe
    what runs. The schedule keeps its position and takes the new peak lr."""
    for group in optimizer.param_groups:
        group.update(betas=betas, weight_decay=weight_decay, initial_lr=lr)
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["lr"] = lr * factor(scheduler.last_epoch)


def record_config_changes(
    run_dir: Path, history: dict[str, Any], step: int, path: Path, changes: dict, *, write: bool
) -> None:
    """A resume with run.resume=force: the changed keys go into the history (saved in later
    checkpoints) and, where `write`, one line of <run>/config_changes.jsonl and a warning."""
    record = {"step": step, "checkpoint": str(path), "changed": changes}
    history.setdefault("config_changes", []).append(record)
    if write:
        with open(Path(run_dir) / "config_changes.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        changed = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())
        warn(f"run.resume=force: continuing with {changed} (recorded in config_changes.jsonl)")


def barrier(world: World) -> None:
    if world.distributed:
        torch.distributed.barrier()


@contextlib.contextmanager
def folder_written_whole(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path` to write into; on success it replaces `path` (the old
    one set aside, then removed), so a crash leaves the previous folder (or none), never a partial
    one. Leftovers of an earlier crash are removed first."""
    path = Path(path)
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(path.parent)


def export_hf(
    path: str | os.PathLike,
    policy: nn.Module,
    tokenizer: Any,
    *,
    sharded: bool,
    world: World,
    dtype: torch.dtype | None = None,
) -> None:
    """A Hugging Face folder (safetensors, config, tokenizer) that transformers and vLLM load, from
    `policy` (a `Policy` root around the causal LM). Under FSDP2 the full weights are gathered to
    rank 0 first (every rank calls this); rank 0 writes; all ranks return once it is written.
    `dtype`: what the weights are written in and config.json's `dtype` says (the run's compute
    dtype: a bf16 run trains fp32 master weights and exports bf16); default: as held."""
    model = policy.model
    if sharded:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        # The causal LM's keys only (never R²PO's `rollout_head.*`, a sibling of `model`).
        state = {
            k.removeprefix("model."): v
            for k, v in get_model_state_dict(policy, options=options).items()
            if k.startswith("model.")
        }
    else:
        held = next(model.parameters()).dtype
        adapted = lora.is_adapted(model)
        state = None if dtype in (None, held) and not adapted else dict(model.state_dict())
    if state is not None:
        if lora.is_adapted(model):
            # LoRA: the merged weights W + (alpha/r) B A under the base model's names.
            state = dict(lora.hf_tensors(state.items(), lora.scaling(model)))
        if getattr(model.config, "tie_word_embeddings", False):
            # Tied: the LM head is the embedding; save_pretrained stores it once.
            state.pop("lm_head.weight", None)
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    if world.is_main:
        with folder_written_whole(path) as tmp:
            model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            if dtype is not None:
                # save_pretrained writes the dtype of the module (here fp32 masters), not the weights'.
                config_file = tmp / "config.json"
                config = json.loads(config_file.read_text())
                config["dtype"] = str(dtype).removeprefix("torch.")
                config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            tokenizer.save_pretrained(tmp)
    # Other ranks may read the folder next (each rank's vLLM engine starts from it).
    barrier(world)
