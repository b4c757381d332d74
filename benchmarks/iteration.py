"""What one SPIN iteration costs: streaming against sequential, how the cost grows with the
prompts, and what start-up costs. Every figure comes from real runs of `jobs/spin.py` (its
summary.json and metrics.jsonl), each a fresh process, as a user runs it.

    python benchmarks/iteration.py overlap    # streaming vs generation alone + training alone
    python benchmarks/iteration.py curve      # the toy at 500 / 5,000 / 50,000 prompts
    python benchmarks/iteration.py startup    # the toy job's start-up; the official per-step workflow
    python benchmarks/iteration.py seeds      # held-out results, streaming vs sequential, 3 seeds
    python benchmarks/iteration.py official --rounds 1   # only the official per-step workflow
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
QUIET = ["run.wandb_mode=disabled"]
TOY = ROOT / "configs" / "toy.yaml"


def job(out: Path, *overrides: str, config: Path | None = None) -> dict[str, Any]:
    """Runs jobs/spin.py; returns its summary, metrics rows, wall seconds and the driver's peak RSS."""
    cmd = [PY, str(ROOT / "jobs" / "spin.py"), *(["--config", str(config)] if config else [])]
    cmd += [f"run.output_dir={out}", *QUIET, *overrides]
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            try:
                peak[0] = max(peak[0], psutil.Process(proc.pid).memory_info().rss)
            except psutil.NoSuchProcess:
                return
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.communicate()[0]
    wall = time.time() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{output[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    iterations = [r for r in rows if "time/iteration_s" in r]
    return {"summary": summary, "rows": iterations, "wall": wall, "driver_mb": peak[0] / 2**20, "launch": start}


def toy_data(path: Path, n: int) -> Path:
    """n toy records (the toy's 2000 training records, repeated with their own ids)."""
    from spin_ray.toy import read_jsonl, toy_world

    world = toy_world(0)
    records = read_jsonl(world.train_path)
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"r{i}", "messages": records[i % len(records)]["messages"]}) + "\n")
    return path


def overlap(tmp: Path, rounds: int) -> None:
    """One iteration on a random Llama sized so that generation and training take similar time,
    one engine and one train worker with a CPU each; sequential and streaming, alternating. The
    second of two iterations is measured (the first also pays for warming up the processes), on
    its own pairs only (spin.mix_previous=0), so both phases have the same work in both modes."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from models import make_llama

    model = tmp / "model"
    make_llama(model, hidden_size=96, intermediate_size=384, num_hidden_layers=2, num_attention_heads=3)
    data = toy_data(tmp / "train.jsonl", 2048)
    shape = [f"model.path={model}", f"data.train_path={data}", "spin.iterations=2", "spin.mix_previous=0"]
    shape += ["generation.max_tokens=48", "generation.batch_size=32", "generation.num_cpus=1"]
    shape += ["train.num_workers=1", "train.num_cpus=1", "train.batch_size=32"]
    shape += ["data.max_prompt_tokens=32", "data.max_response_tokens=16", "data.max_examples=2048"]
    ratios: dict[str, list[float]] = {"sequential": [], "streaming": []}
    for r in range(rounds):
        for mode in ("sequential", "streaming"):
            row = job(tmp / f"{mode}-{r}", *shape, f"spin.stream={mode == 'streaming'}")["rows"][-1]
            if mode == "sequential":
                alone = row["time/generate_s"] + row["time/train_s"]  # each phase ran by itself
            ratios[mode].append(row["time/to_trained_s"] / alone)
            print(
                f"round {r} {mode:<10}: generate {row['time/generate_s']:.1f}s, train {row['time/train_s']:.1f}s, "
                f"generate+train wall {row['time/to_trained_s']:.1f}s = {ratios[mode][-1]:.2f}x of alone",
                flush=True,
            )
    for mode, values in ratios.items():
        print(f"{mode}: {statistics.median(values):.2f}x of (generation alone + training alone), median of {rounds}")


def curve(tmp: Path, sizes: list[int]) -> None:
    """The toy, one iteration at each size: seconds per phase, and peak memory of the driver and
    the coordinator, which must not grow with the prompts."""
    points = []
    print(
        f"{'prompts':>8} {'generate':>9} {'train':>8} {'gen+train':>10} {'export':>7} {'sync':>6} {'eval':>6} "
        f"{'iteration':>10} {'driver MB':>10} {'coord. MB':>10}"
    )
    for n in sizes:
        data = toy_data(tmp / f"n{n}.jsonl", n)
        result = job(tmp / f"n{n}", f"data.train_path={data}", "data.max_examples=null", "spin.iterations=1")
        row = result["rows"][-1]
        cells = [row.get(f"time/{k}_s", 0.0) for k in ("generate", "train", "to_trained", "export", "sync", "eval")]
        points.append((n, row["time/iteration_s"]))
        print(
            f"{n:>8} "
            + " ".join(f"{c:>8.1f}s" for c in cells[:2])
            + f" {cells[2]:>9.1f}s"
            + "".join(f" {c:>6.1f}s" for c in cells[3:])
            + f" {row['time/iteration_s']:>9.1f}s"
            + f" {result['driver_mb']:>10.0f} {result['summary']['coordinator_peak_rss_mb']:>10.0f}",
            flush=True,
        )
    (n0, y0), (n1, y1) = points[0], points[-1]
    if n1 != n0:  # a fit needs two sizes
        per = (y1 - y0) / (n1 - n0)
        print(f"fit: iteration = {y0 - per * n0:.1f} s fixed + {per * 1000:.2f} s per 1,000 prompts")


def startup(tmp: Path) -> None:
    """The toy job (3 iterations) from launch: when each start-up step was done. Then the same
    training work as the official workflow does it, a process per step, against the job without
    its held-out evaluations (the official scripts evaluate nothing)."""
    from spin_ray.toy import toy_world

    result = job(tmp / "job")
    marks = result["summary"]["startup_s"]
    for name, seconds in sorted(marks.items(), key=lambda kv: kv[1]):
        print(f"  {name:<18} {seconds:6.1f} s after launch")
    print(f"  shut-down          {result['wall'] - marks['done']:6.1f} s after the last iteration")
    print(f"spin-ray toy job: {result['wall']:.1f} s in all, launch to first pair {marks['first_pair']:.1f} s")
    world = toy_world(0)
    bare = job(tmp / "bare", f"model.path={world.model_dir}", f"data.train_path={world.train_path}")["wall"]
    print(f"spin-ray toy job without held-out evaluation: {bare:.1f} s")
    official_s = official(tmp / "official")
    print(f"official per-step workflow (per iteration a vLLM process, then 2 DeepSpeed ranks): {official_s:.1f} s")
    print(f"spin-ray / official on the same work: {bare / official_s:.2f}x")


def official(out: Path, config: Path = TOY, overrides: tuple[str, ...] = ()) -> float:
    """Re-creates the official scripts' shape: per iteration, generation in a fresh vLLM process,
    then training in fresh `torchrun` DeepSpeed processes that load p_{t-1} from disk and save p_t;
    the same config, model code and data as the spin-ray job (full fine-tuning: the official
    scripts train no adapter)."""
    cfg = _official_config(out, str(config), list(overrides))
    start = time.time()
    model = str(builtin_model(cfg))
    same = [str(out), str(config), *overrides]
    for t in range(1, cfg.spin.iterations + 1):
        (out / f"iter_{t}").mkdir(parents=True, exist_ok=True)
        # vLLM in-process, as spin-ray's CPU engines: half the start-up of its multiprocess default.
        env = os.environ | {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TORCHINDUCTOR_VEC_ISA_OK": "1"}
        env["OMP_NUM_THREADS"] = str(max(1, int(cfg.generation.num_cpus)))
        subprocess.run([PY, __file__, "_generate", model, str(t), *same], check=True, capture_output=True, env=env)
        model = str(out / f"iter_{t}" / "model")
        ranks = f"--nproc_per_node={cfg.train.num_workers}"
        torchrun = [PY, "-m", "torch.distributed.run", ranks, "--master_port=29555"]
        subprocess.run([*torchrun, __file__, "_train", str(t), *same], check=True, capture_output=True)
        print(f"  official iteration {t} done at {time.time() - start:.1f} s", flush=True)
    return time.time() - start


def official_vs_job(tmp: Path, config: Path, overrides: list[str]) -> None:
    """The official workflow against the job on the same work (no held-out set: the official
    scripts evaluate nothing)."""
    overrides = [*overrides, "train.lora=null"]
    official_s = official(tmp / "official", config, tuple(overrides))
    cfg = _official_config(tmp / "job", str(config), overrides)
    same = [f"model.path={builtin_model(cfg)}", f"data.train_path={cfg.data.train_path}"]
    job_s = job(tmp / "job", *overrides, *same, config=config)["wall"]
    print(f"official per-step workflow: {official_s:.1f} s; spin-ray job: {job_s:.1f} s: {job_s / official_s:.2f}x")


def builtin_model(cfg: Any) -> Path:
    """The start model; sets cfg.data.train_path to the built-in world's (no held-out set)."""
    from spin_ray.driver.prepare import builtin_world

    world = builtin_world(cfg)
    cfg.data.train_path, cfg.data.eval_path = str(world.train_path), None
    return world.model_dir


def _official_config(out: Path, config: str, overrides: list[str]) -> Any:
    from spin_ray.config import load_config

    cfg = load_config(Path(config), [*overrides, f"run.output_dir={out}", "spin.stream=false", *QUIET])
    builtin_model(cfg)
    return cfg


def _generate(model: str, t: int, out: str, config: str, *overrides: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from vllm import LLM, TokensPrompt

    from spin_ray.chat import model_stop_ids
    from spin_ray.driver.prepare import prepare

    cfg = _official_config(Path(out), config, list(overrides))
    p = prepare(cfg)
    train = pq.read_table(p.train.path).to_pylist()
    llm = LLM(
        model=model,
        dtype="float32",
        max_model_len=p.max_model_len,
        enforce_eager=True,
        seed=0,
        kv_cache_memory_bytes=2**30,
        enable_chunked_prefill=False,
        max_num_batched_tokens=4096,
    )
    params = sampling(cfg, model_stop_ids(llm.get_tokenizer(), model), t, train)
    outs = llm.generate([TokensPrompt(prompt_token_ids=e["prompt_ids"]) for e in train], params, use_tqdm=False)
    rows = [
        {
            "uid": e["uid"],
            "prompt_ids": e["prompt_ids"],
            "real_ids": e["real_ids"],
            "generated_ids": list(o.outputs[0].token_ids),
        }
        for e, o in zip(train, outs, strict=True)
    ]
    pq.write_table(pa.Table.from_pylist(rows), Path(out) / f"iter_{t}" / "pairs.parquet")


def sampling(cfg: Any, stops: list[int], t: int, rows: list[dict]) -> list:
    """vLLM SamplingParams as the job's engines make them: per-row seeds, the model's stop tokens."""
    from vllm import SamplingParams

    from spin_ray.loop.generate import sample_seed

    g = cfg.generation
    return [
        SamplingParams(
            temperature=g.temperature,
            top_p=g.top_p,
            max_tokens=g.max_tokens,
            stop_token_ids=stops,
            seed=sample_seed(cfg.run.seed, t, e["uid"]),
        )
        for e in rows
    ]


def _train(t: int, out: str, config: str, *overrides: str) -> None:
    import torch

    cfg = _official_config(Path(out), config, list(overrides))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(max(1, int(cfg.train.num_cpus)))
    torch.distributed.init_process_group("gloo")
    from spin_ray.pairs import pair_stream
    from spin_ray.trainer.worker import SpinWorker

    previous = str(Path(out) / f"iter_{t - 1}" / "model") if t > 1 else None
    worker = SpinWorker(cfg, previous or str(builtin_model(cfg)), t - 1)
    # The job's pair stream over iterations t-1 and t (each iter_<i> dir holds its pairs.parquet).
    dirs = [Path(out) / f"iter_{i}" for i in range(max(1, t - cfg.spin.mix_previous), t + 1)]
    stream = pair_stream(dirs, None, cfg.run.seed + t, cfg.spin.shuffle_window, cfg.train.batch_size)
    n, rank = worker.world_size, worker.rank
    mine = [step[rank].to_pydict() for step in stream.steps(n)]
    worker.fed_batches = lambda count: iter(mine)  # this rank's batches, without the job's channel
    worker.train(t, stream.total // n)
    worker.export(t, str(Path(out) / f"iter_{t}" / "model"), pack_weights=False)
    torch.distributed.destroy_process_group()


def seeds(tmp: Path, seed_list: list[int]) -> None:
    """Held-out accuracy and log p(y|x) after each iteration, streaming vs sequential."""
    results: dict[str, dict[int, list[dict]]] = {"sequential": {}, "streaming": {}}
    for seed in seed_list:
        for mode in results:
            out = tmp / f"{mode}-s{seed}"
            results[mode][seed] = job(out, f"run.seed={seed}", f"spin.stream={mode == 'streaming'}")["rows"]
            print(
                f"seed {seed} {mode:<10}: accuracy "
                + " ".join(f"{r['eval/accuracy']:.3f}" for r in results[mode][seed]),
                flush=True,
            )
    for key in ("eval/accuracy", "eval/logps/real"):
        for t in range(3):
            cells = []
            for mode in results:
                values = [results[mode][s][t][key] for s in seed_list]
                cells.append(f"{mode} {statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}")
            diff = [results["streaming"][s][t][key] - results["sequential"][s][t][key] for s in seed_list]
            print(
                f"{key} iteration {t + 1}: "
                + ", ".join(cells)
                + f", streaming - sequential {statistics.mean(diff):+.3f} ± {statistics.stdev(diff):.3f}"
            )


def main(argv: list[str]) -> None:
    if argv and argv[0] == "_generate":
        return _generate(argv[1], int(argv[2]), *argv[3:])
    if argv and argv[0] == "_train":
        return _train(int(argv[1]), *argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["overlap", "curve", "startup", "seeds", "official"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 5000, 50000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", type=Path, default=TOY, help="official: the config both sides run")
    parser.add_argument("overrides", nargs="*", help="official: key.sub=value for both sides")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="spin-iteration-") as tmp:
        {
            "overlap": lambda: overlap(Path(tmp), args.rounds),
            "curve": lambda: curve(Path(tmp), args.sizes),
            "startup": lambda: startup(Path(tmp)),
            "seeds": lambda: seeds(Path(tmp), args.seeds),
            "official": lambda: official_vs_job(Path(tmp), args.config, args.overrides),
        }[args.what]()


if __name__ == "__main__":
    main(sys.argv[1:])
