"""What a run directory already holds, and whether it may be trusted.

A rerun into an existing `run.output_dir` resumes: iterations whose `iter_<t>/DONE` marker and
checkpoint check out are skipped, pair files that hold exactly the prompts of this data set are
reused, and anything partial or corrupt is removed and redone. A rerun with a different model,
data or any setting that changes results is refused, with the keys named, unless the user says
`run.allow_config_change=true`: "resuming" someone else's iterations silently is worse than failing.
Nothing marked done is ever removed on its own: a finished iteration that does not check out is
redone only when it is the last one; otherwise, or when the storage fails to read, resume stops
and says what to move away.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from spin_ray.config import OPERATIONAL, Config, ConfigError, flatten
from spin_ray.lora import is_adapter
from spin_ray.rundir import TMP, RunDir, write_atomic


def check_unchanged(cfg: Config, data_fingerprint: str, inputs: dict[str, str] | None = None) -> None:
    """Refuses a rerun whose results-changing settings, data, start model or eval data (`inputs`:
    fingerprints by name) differ from the stored run's."""
    run = RunDir(cfg.run.output_dir)
    if not run.config.exists():
        return
    stored = flatten(yaml.safe_load(run.config.read_text()) or {})
    now = flatten(cfg.model_dump())
    stored_fp = run.fingerprint.read_text().strip() if run.fingerprint.exists() else None
    changed = [
        f"{key}: {stored.get(key)!r} -> {now.get(key)!r}"
        for key in sorted(set(stored) | set(now))
        if stored.get(key) != now.get(key) and not key.startswith(OPERATIONAL)
    ]
    if stored_fp is not None and stored_fp != data_fingerprint:
        changed.append(f"training data content: fingerprint {stored_fp} -> {data_fingerprint}")
    stored_inputs = json.loads(run.inputs.read_text()) if run.inputs.exists() else {}
    for name, fingerprint in (inputs or {}).items():
        if stored_inputs.get(name, fingerprint) != fingerprint:
            changed.append(f"{name}: fingerprint {stored_inputs[name]} -> {fingerprint}")
    if changed and not cfg.run.allow_config_change:
        raise ConfigError(
            f"{run.root} holds a run with other settings; resuming it would mix two experiments:\n  "
            + "\n  ".join(changed)
            + "\nUse another run.output_dir, or pass run.allow_config_change=true to resume anyway."
        )


def record(cfg: Config, data_fingerprint: str, inputs: dict[str, str]) -> None:
    run = RunDir(cfg.run.output_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    write_atomic(run.config, cfg.to_yaml())
    write_atomic(run.fingerprint, data_fingerprint + "\n")
    write_atomic(run.inputs, json.dumps(inputs, indent=2))


def files_fingerprint(model_dir: str | Path) -> str:
    """The start model's files: names, sizes, and the first and last 64 KiB of each (the weights
    of a 70B model are not read whole for this)."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(model_dir).iterdir() if p.is_file()):
        with path.open("rb") as f:
            h.update(f"{path.name}:{path.stat().st_size}".encode())
            h.update(f.read(65536))
            f.seek(max(0, path.stat().st_size - 65536))
            h.update(f.read())
    return h.hexdigest()[:16]


class ResumeError(RuntimeError):
    """The run dir cannot be resumed safely; the message says what to move away."""


def checkpoint_problem(model_dir: Path) -> str | None:
    """Why vLLM and transformers could not load this checkpoint (config plus complete
    safetensors), or None. Raises OSError when the storage itself fails to read: that says
    nothing about the checkpoint."""
    from safetensors import SafetensorError, safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not ((model_dir / "config.json").exists() or is_adapter(model_dir)) or not files:
        return f"{model_dir} has no config.json (adapter_config.json for LoRA) or no *.safetensors"
    for f in files:
        try:
            with safe_open(str(f), "pt") as st:
                for name in st.keys():  # noqa: SIM118 - safe_open has no __iter__
                    st.get_slice(name)  # reads the header offsets; a truncated file fails here
        except SafetensorError as e:
            return f"{f} is incomplete ({e})"
    return None


def done_problem(run: RunDir, t: int) -> str | None:
    """Why finished iteration t cannot be resumed from, or None."""
    try:
        run.global_step(t)
    except (ValueError, KeyError) as e:
        return f"{run.done(t)} is torn ({e!r})"
    return checkpoint_problem(run.model(t))


def sorted_uids(path: Path) -> pa.Array:
    """The `uid` column of a parquet file (or directory of them), sorted."""
    uids = pq.read_table(path, columns=["uid"])["uid"].combine_chunks()
    return uids.take(pc.sort_indices(uids))


def valid_pairs(pairs_dir: Path, uids: pa.Array) -> bool:
    """Exactly one readable pair per training prompt (`uids`: sorted_uids of the training set)."""
    try:
        return sorted_uids(pairs_dir).equals(uids)
    except Exception:  # noqa: BLE001 - truncated or foreign files
        return False


@dataclass
class ResumePoint:
    start: int  # first iteration to run (1-based: iteration t trains p_t)
    model_path: str  # the weights it starts from
    global_step: int


def resume_point(cfg: Config, base_model: str, uids: pa.Array, say: Callable[[str], None] = print) -> ResumePoint:
    """The first iteration not done, after removing whatever a crash left half-written."""
    run = RunDir(cfg.run.output_dir)
    point = ResumePoint(1, base_model, 0)
    finished = run.finished()
    for t in range(1, cfg.spin.iterations + 1):
        if t in finished:
            try:
                problem = done_problem(run, t)
            except OSError as e:
                raise ResumeError(f"could not read iteration {t} in {run.root} ({e!r}); nothing was removed") from e
            if problem is None:
                point = ResumePoint(t + 1, str(run.model(t)), run.global_step(t))
                continue
            if later := [i for i in finished if i > t]:
                raise ResumeError(
                    f"iteration {t} is marked done, but {problem}; iterations {later} were trained from it. "
                    f"Nothing was removed: move {run.iteration(t)} and later away to redo them, or restore the file."
                )
            say(f"[resume] iteration {t} is marked done, but {problem}: redoing it")
        # Not done: keep only its complete pairs (made by p_{t-1}, which is done); anything of a
        # later iteration was built on an iteration that never finished.
        for later in run.iterations():
            if later > t:
                shutil.rmtree(run.iteration(later))
        if run.iteration(t).exists():
            _clean(run, t, uids, say)
        break
    if point.start > 1:
        say(f"[resume] iterations 1..{point.start - 1} are done in {run.root}; continuing from there")
    return point


def _clean(run: RunDir, t: int, uids: pa.Array, say: Callable[[str], None]) -> None:
    tmp, pairs = run.pairs_tmp(t), run.pairs(t)  # a streamed iteration names its pairs only after training on them
    if tmp.exists() and not pairs.exists() and valid_pairs(tmp, uids):
        tmp.rename(pairs)
    for path in [run.done(t), run.model(t)] + [run.iteration(t) / name for name in TMP]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    if pairs.exists() and not valid_pairs(pairs, uids):
        say(f"[resume] {pairs} is incomplete or unreadable: regenerating it")
        shutil.rmtree(pairs)
