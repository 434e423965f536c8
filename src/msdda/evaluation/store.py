"""The append-only results store of a sweep run folder, the folder's preparation and its run lock.

A run folder holds `config.json` (the resolved sweep config) and one results file per writing process:
`results.jsonl` for a single process, `results.rank{r}.jsonl` for rank r of a multi-process run. Readers see
the union of every results file in the folder (see `msdda.evaluation.sweep` for how units are planned).

Readers never drop a valid row silently: a corrupt line (not JSON, or not a results row) is skipped with a
warning naming the file and line number, and every valid row after it is kept; a torn last line (a write
interrupted by a kill) is ignored. A row seen twice (same unit and sample index) counts once.
`--overwrite` removes only the files msdda writes into a run folder, and only from a folder whose
config.json is a sweep config; one sweep at a time writes a folder (`run_lock`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from msdda.atomic import write_json_atomic, write_text_atomic
from msdda.config import JSONConfig
from msdda.distributed import DistContext
from msdda.errors import MSDDAError

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"  # the store of a single-process run
RANK_RESULTS_PATTERN = re.compile(r"^results\.rank(\d+)\.jsonl$")  # rank r of a multi-process run
CONFIG_FILE = "config.json"
LOCK_FILE = ".msdda.lock"  # held (flock) by the sweep writing the folder; the kernel frees it on any exit
_SHARD_LOCK = re.compile(r"^\.msdda\.shard\d+of\d+\.lock$")  # one per share run as a separate job
SAMPLES_DIR = "samples"
_SAMPLE_PNG = re.compile(r".+\.[0-9]{3}\.png")  # a decoded sample: {unit}.{index:03d}.png
# Files a sweep or a report writes into a run folder: the only ones `--overwrite` removes.
_OWN_FILES = ("config.json", "results.jsonl", "metrics.json", "pareto.png", "report.html")
_OWN_PATTERNS = (
    RANK_RESULTS_PATTERN,
    re.compile(r"^results(\.rank\d+)?\.jsonl\.corrupt$"),  # lines a repair set aside
    re.compile(r"^\.(config\.json|results.*\.jsonl|metrics\.json|pareto\.png|report\.html)\..*\.tmp$"),
    _SHARD_LOCK,
)
_ROW_FIELDS: dict[str, tuple[type, ...]] = {
    "unit": (str,),
    "method": (str,),
    "index": (int,),
    "prompt_index": (int,),
    "seed": (int,),
    "batch": (int,),
    "rewards": (dict,),
    "cost": (dict,),
}


class SweepError(MSDDAError):
    """A sweep is misconfigured, or its run folder holds a different sweep (or one still running)."""


def results_file(run_dir: Path | str, rank: int, world_size: int) -> Path:
    """The file rank `rank` of a `world_size`-process run appends to: results.jsonl for one process,
    else results.rank{rank}.jsonl."""
    return Path(run_dir) / (RESULTS_FILE if world_size == 1 else f"results.rank{rank}.jsonl")


def results_files(run_dir: Path | str) -> list[Path]:
    """Every results file of a run folder: results.jsonl (if any) first, then results.rank{r}.jsonl by r."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    ranked = []
    for p in run_dir.iterdir():
        m = RANK_RESULTS_PATTERN.match(p.name)
        if m and p.is_file():
            ranked.append((int(m.group(1)), p))
    single = [run_dir / RESULTS_FILE] if (run_dir / RESULTS_FILE).is_file() else []
    return single + [p for _, p in sorted(ranked)]


# ----- reading ------------------------------------------------------------------------------------------
def row_problem(row: Any) -> str | None:
    """None if `row` is a well-formed results row, else what is wrong with it (for the warning)."""
    if not isinstance(row, dict):
        return f"a {type(row).__name__}, not a results row (a JSON object)"
    for key, types in _ROW_FIELDS.items():
        if key not in row:
            return f"no {key!r} field"
        value = row[key]
        if not isinstance(value, types) or isinstance(value, bool):
            return f"field {key!r} is {value!r:.60}, not a {types[0].__name__}"
    rewards = row["rewards"].values()
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in rewards):
        return f"field 'rewards' holds a non-number or non-finite value: {row['rewards']!r:.80}"
    if row["index"] < 0 or row["batch"] < 1:
        return f"index {row['index']} / batch {row['batch']} out of range"
    if "weights" not in row:
        return "no 'weights' field"
    if row["weights"] is not None and not isinstance(row["weights"], dict):
        return f"field 'weights' is {row['weights']!r:.60}, not an object or null"
    return None


_warned: set[tuple[str, int, int, int]] = set()  # (file, size, mtime, line): each problem is reported once


def _warn_once(path: Path, stat: os.stat_result, line_no: int, message: str) -> None:
    key = (str(path), stat.st_size, stat.st_mtime_ns, line_no)
    if key not in _warned:
        _warned.add(key)
        logger.warning("%s", message)


def _scan_file(path: Path) -> tuple[list[dict[str, Any]], list[tuple[int, str]], bool]:
    """(valid rows without duplicates, [(line number, corrupt line)], whether the last line is torn)."""
    rows: list[dict[str, Any]] = []
    corrupt: list[tuple[int, str]] = []
    torn = False
    if not path.exists():
        return rows, corrupt, torn
    stat = path.stat()
    seen: set[tuple[str, int]] = set()
    duplicates = 0
    with path.open("rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    last = lines.pop()  # b"" when the file ends with a newline; else a line a kill interrupted
    if last:
        torn = True
        logger.info("%s: ignoring the torn last line %d (an interrupted write)", path, len(lines) + 1)
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            problem = f"not JSON ({exc.__class__.__name__}: {exc})"
        else:
            problem = row_problem(row)
        if problem is not None:
            corrupt.append((n, raw.decode(errors="replace")))
            _warn_once(
                path,
                stat,
                n,
                f"{path}, line {n}: skipped a corrupt results row ({problem}); the valid rows "
                "before and after it are kept",
            )
            continue
        key = (row["unit"], row["index"])
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        rows.append(row)
    if duplicates:
        _warn_once(path, stat, 0, f"{path}: {duplicates} duplicate row(s) (same unit and sample index) counted once")
    return rows, corrupt, torn


def _read_file_rows(path: Path) -> list[dict[str, Any]]:
    return _scan_file(Path(path))[0]


def read_rows(path: Path | str) -> list[dict[str, Any]]:
    """Every valid row of a results file, or of a whole run folder.

    path: one results file (a torn last line from a kill is ignored; a corrupt line is skipped with a
    warning naming its line number), or a run folder, for the union of its results files (`read_run_rows`):
    what a multi-process run wrote, as one store.
    """
    path = Path(path)
    if path.is_dir():
        return read_run_rows(path)
    return _read_file_rows(path)


def read_run_rows(run_dir: Path | str) -> list[dict[str, Any]]:
    """The union of every results file of a run folder, each (unit, index) once, in the sweep's planned
    order (by `unit_index`, so the same whatever the process count; stores written before rows carried it
    keep file order)."""
    seen: set[tuple[str, int]] = set()
    rows = []
    for f in results_files(run_dir):
        for r in _read_file_rows(f):
            key = (r["unit"], r["index"])
            if key not in seen:
                seen.add(key)
                rows.append(r)
    if all(isinstance(r.get("unit_index"), int) for r in rows):
        rows.sort(key=lambda r: (r["unit_index"], r["index"]))
    return rows


def _complete_units(rows: Sequence[dict[str, Any]], batch_size: int) -> set[str]:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["unit"]] = counts.get(r["unit"], 0) + 1
    return {k for k, c in counts.items() if c == batch_size}


def _repair_store(path: Path, batch_size: int) -> set[str]:
    """Drop torn lines, duplicates and incomplete units (atomic rewrite); return the keys of complete units.

    Corrupt lines are moved to `<file>.corrupt` (appended, never lost) and the valid rows after them kept.
    """
    rows, corrupt, torn = _scan_file(path)
    complete = _complete_units(rows, batch_size)
    kept = [r for r in rows if r["unit"] in complete]
    text = path.read_bytes()
    if corrupt:
        aside = path.with_name(path.name + ".corrupt")
        previous = aside.read_text() if aside.exists() else ""
        write_text_atomic(aside, previous + "".join(f"{line}\n" for _, line in corrupt))
        logger.warning(
            "%s: moved %d corrupt line(s) (line %s) to %s; the units they belonged to are run again",
            path,
            len(corrupt),
            ", ".join(str(n) for n, _ in corrupt),
            aside,
        )
    if len(kept) != text.count(b"\n") or torn:
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
        logger.info("results store %s repaired: kept %d rows of %d complete units", path, len(kept), len(complete))
    return complete


def done_units(run_dir: Path | str, batch_size: int) -> set[str]:
    """Keys of the units some results file of the folder holds complete (whichever rank wrote them)."""
    done: set[str] = set()
    for f in results_files(run_dir):
        done |= _complete_units(_read_file_rows(f), batch_size)
    return done


def _append_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    with path.open("a") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


# ----- the run folder -----------------------------------------------------------------------------------
def _config_diff(existing: Mapping[str, Any], cfg: JSONConfig) -> list[str]:
    """Names of the config keys where `existing` (a config.json document) differs from `cfg`."""
    mine = json.loads(json.dumps(cfg.to_dict()))
    return sorted(k for k in set(existing) | set(mine) if existing.get(k) != mine.get(k))


def _protected_dirs() -> list[Path]:
    """Folders `--overwrite` never empties: the current one and its parents, home and its parents, the
    package's folder and its parents."""
    import msdda

    out: list[Path] = []
    for anchor in (Path.cwd(), Path.home(), Path(msdda.__file__).parent):
        anchor = anchor.resolve()
        out += [anchor, *anchor.parents]
    return out


def own_files(run_dir: Path) -> list[Path]:
    """The files msdda wrote into a run folder (what `--overwrite` removes); anything else is left alone."""
    found = []
    if not run_dir.is_dir():
        return found
    for p in sorted(run_dir.iterdir()):
        if (
            p.is_file()
            and not p.is_symlink()
            and (p.name in _OWN_FILES or any(pat.match(p.name) for pat in _OWN_PATTERNS))
        ):
            found.append(p)
    samples = run_dir / SAMPLES_DIR
    if samples.is_dir() and not samples.is_symlink():
        found += [
            p
            for p in sorted(samples.iterdir())
            if p.is_file()
            and not p.is_symlink()
            and (
                p.suffix == ".safetensors"
                or _SAMPLE_PNG.fullmatch(p.name) is not None
                or (p.name.startswith(".") and p.name.endswith(".tmp"))
            )
        ]
    return found


def _describe(paths: Sequence[Path], run_dir: Path) -> str:
    names = [str(p.relative_to(run_dir)) for p in paths]
    in_samples = [n for n in names if n.startswith(SAMPLES_DIR + os.sep)]
    top = [n for n in names if not n.startswith(SAMPLES_DIR + os.sep)]
    parts = top + ([f"{SAMPLES_DIR}/ ({len(in_samples)} sample file(s))"] if in_samples else [])
    return ", ".join(parts) or "nothing"


def _read_own_config(run_dir: Path, cfg: JSONConfig) -> dict[str, Any] | None:
    """config.json of the folder if it is a sweep config of ours; None if there is none. Raises SweepError
    for a config.json that is not ours (not JSON, or not a sweep config): such a folder is never emptied."""
    config_path = run_dir / CONFIG_FILE
    if not config_path.exists():
        return None
    try:
        existing = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SweepError(
            f"{config_path} is not valid JSON ({exc}), so it is not a sweep config msdda wrote and the folder is "
            "left alone; choose another --out, or remove the folder yourself to start afresh"
        ) from exc
    fields = {f.name for f in dataclasses.fields(cfg)}  # type: ignore[arg-type]
    if not isinstance(existing, dict) or not {"task", "methods"} <= set(existing) or not set(existing) <= fields:
        raise SweepError(
            f"{config_path} is not a sweep config (keys {sorted(existing) if isinstance(existing, dict) else '-'}), "
            "so the folder is left alone; choose another --out"
        )
    return existing


def check_run_dir(run_dir: Path, cfg: JSONConfig, overwrite: bool) -> list[Path]:
    """Refuse a folder this sweep must not write to, before any file is touched; return what preparing it
    removes (files msdda wrote, only with `overwrite` and a different sweep in the folder)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise SweepError(f"--out {run_dir} is a file, not a folder; choose a folder path for the run")
    if not run_dir.exists():
        return []
    existing = _read_own_config(run_dir, cfg)
    ours = own_files(run_dir)
    if existing is None:
        # a lock file alone is what a sweep refused or killed before writing its config leaves
        others = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_FILE and not _SHARD_LOCK.match(p.name))
        if not others:
            return []
        raise SweepError(
            f"{run_dir} is not empty and holds no msdda sweep (no {CONFIG_FILE} of ours; it holds "
            f"{others[:5] + (['...'] if len(others) > 5 else [])}); choose a new or empty folder for --out"
            + (" (--overwrite only ever removes a sweep msdda wrote)" if overwrite else "")
        )
    diff = _config_diff(existing, cfg)
    if not diff:
        return []
    if not overwrite:
        raise SweepError(
            f"{run_dir} holds a sweep with a different config (differs in {diff}); use another folder, "
            f"the same settings to resume, or --overwrite to discard it (removes {_describe(ours, run_dir)})"
        )
    resolved = run_dir.resolve()
    if resolved in _protected_dirs():
        raise SweepError(
            f"--overwrite refuses to empty {run_dir} ({resolved}): it is the current folder, home, or a parent "
            f"of them or of the msdda package; it would remove {_describe(ours, run_dir)}. Use a dedicated folder"
        )
    return ours


def prepare_run_dir(run_dir: Path, cfg: JSONConfig, overwrite: bool) -> None:
    """Create the run folder, or check that an existing one holds this very sweep (else refuse).

    With `overwrite` and a different sweep in the folder, only the files msdda wrote are removed (listed in
    the log); anything else in the folder stays.
    """
    run_dir = Path(run_dir)
    doomed = check_run_dir(run_dir, cfg, overwrite)
    if doomed:
        logger.warning("--overwrite: removing %s from %s", _describe(doomed, run_dir), run_dir)
        for p in doomed:
            p.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # only if empty: a user's file in samples/ stays
            (run_dir / SAMPLES_DIR).rmdir()
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / CONFIG_FILE
    if not config_path.exists():
        write_json_atomic(config_path, cfg.to_dict())


def _check_prepared_config(run_dir: Path, cfg: JSONConfig) -> str | None:
    """On ranks other than 0, after rank 0 prepared the folder: None if config.json is this sweep, else why not."""
    config_path = run_dir / CONFIG_FILE
    try:
        existing = json.loads(config_path.read_text())
    except FileNotFoundError:
        return (
            f"{config_path} is missing after rank 0 wrote it; the run folder must be on a file system every "
            "process shares (on several machines: a shared mount at the same path)"
        )
    except (OSError, json.JSONDecodeError) as exc:
        return f"cannot read {config_path} written by rank 0: {exc}; check the shared file system"
    diff = _config_diff(existing, cfg)
    if diff:
        return (
            f"{config_path} (written by rank 0) differs from this process's sweep in {diff}; launch every "
            "process with the same command and options"
        )
    return None


def lock_and_prepare(
    run_dir: Path | str,
    cfg: JSONConfig,
    overwrite: bool,
    held: contextlib.ExitStack,
    *,
    shard: tuple[int, int] | None = None,
) -> None:
    """Check the folder (refusals before any file is written), create it, take its run lock into `held`
    (released when `held` closes) and prepare it (`prepare_run_dir`).

    shard: None for a whole sweep (or rank 0 of a launched multi-process one): an exclusive lock. An explicit
    (rank, world_size) share takes the folder lock shared (exclusive with `overwrite`, which may remove files)
    and its own share's lock exclusively, so shares run as separate jobs can write the folder at once.
    """
    run_dir = Path(run_dir)
    created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    check_run_dir(run_dir, cfg, overwrite)
    run_dir.mkdir(parents=True, exist_ok=True)
    if shard is None:
        held.enter_context(run_lock(run_dir))
    else:
        held.enter_context(run_lock(run_dir, shared=not overwrite))
        held.enter_context(run_lock(run_dir, name=f".msdda.shard{shard[0]}of{shard[1]}.lock"))
    if created:  # a run that fails before its first row leaves nothing behind (runs before the unlock)
        held.push(lambda exc_type, exc, tb: _undo_fresh_run_dir(run_dir, created) if exc_type is not None else None)
    prepare_run_dir(run_dir, cfg, overwrite)


def _undo_fresh_run_dir(run_dir: Path, created: Sequence[Path]) -> None:
    """Remove a run folder this run created, if it holds no results row yet (only our own files)."""
    if any(f.stat().st_size > 0 for f in results_files(run_dir)):
        return  # rows to resume from: keep them
    for p in own_files(run_dir):
        p.unlink(missing_ok=True)
    for p in (run_dir / SAMPLES_DIR, run_dir / LOCK_FILE):
        with contextlib.suppress(OSError):
            p.rmdir() if p.is_dir() else p.unlink()
    for p in created:  # deepest first; a folder someone else put a file into stays
        with contextlib.suppress(OSError):
            p.rmdir()


def _prepare_shared_run_dir(
    run_dir: Path, cfg: JSONConfig, overwrite: bool, ctx: DistContext, held: contextlib.ExitStack | None = None
) -> None:
    """Rank 0 prepares (and, given `held`, locks) the folder while the others wait; then every rank checks
    config.json. A refusal on any rank ends every rank with the same SweepError (never a hang)."""

    def prepare() -> None:
        if not ctx.is_main:
            return
        if held is None:
            prepare_run_dir(run_dir, cfg, overwrite)
        else:
            lock_and_prepare(run_dir, cfg, overwrite, held)

    ctx.call_checked(prepare, SweepError)
    ctx.check_all(None if ctx.is_main else _check_prepared_config(run_dir, cfg), SweepError)


# ----- the run lock -------------------------------------------------------------------------------------
@contextlib.contextmanager
def run_lock(run_dir: Path | str, *, name: str = LOCK_FILE, shared: bool = False) -> Iterator[None]:
    """Hold an flock on `run_dir/name` for the block; refuse (SweepError) if another process holds it.

    The kernel releases an flock when its holder exits in any way (SIGKILL included), so a killed sweep never
    leaves the folder locked: the lock file may stay, but it is not a lock by itself. `shared`: several
    holders of a shared lock coexist (the shares of one sweep run as separate jobs); an exclusive one excludes
    them all. The folder must exist.
    """
    path = Path(run_dir) / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            raise SweepError(
                f"another msdda sweep{f' (pid {holder})' if holder.isdigit() else ''} is writing to {run_dir} "
                "right now; wait for it to finish (rerunning then resumes), or choose another --out"
            ) from None
        if not shared:  # the holder's pid, for the message above (a shared lock has many holders)
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the flock
