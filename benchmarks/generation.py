"""Generation benchmark: the streaming path (Ray Data -> engine actor) against plain vLLM, and hot-swap.

1. Tokens/s of `through_engines` over one engine actor vs a plain `vllm.LLM.generate` in this
   process, on the same prompt ids, seeds and sampling settings, for several
   `generation.batch_size` values. Goal: streaming >= 0.95x plain.
2. Seconds of `engine.load_weights.remote(pack(state_dict))` (the object-store path) vs model size.

    python benchmarks/generation.py [--prompts 320] [--new-tokens 64] [--batch-sizes 64,256,320]

Models are random Llamas built here with the toy tokenizer; nothing comes from the hub.
"""

import os

# The engine actor runs vLLM in-process with one OMP thread here (spin_ray.engines.engine.engine_env); the plain
# baseline in this driver must run the same way. OMP_NUM_THREADS has to be set before torch is imported (a script
# that imports this one with other threads sets them first).
for name, value in {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "OMP_NUM_THREADS": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(name, value)
os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")  # else 4 log lines per Ray Data run around the table

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
from models import make_llama, start_engines  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from spin_ray.config import GenerationConfig  # noqa: E402
from spin_ray.loop.generate import sample_seed  # noqa: E402
from spin_ray.toy_model import make_tokenizer  # noqa: E402

MAX_MODEL_LEN = 256  # >= prompt + new tokens
PROMPT_TOKENS = (16, 48)  # varied prompt lengths, as in real data

# Fewer KV heads than heads: all 256 sequences' KV cache fits in 1 GiB.
GEN_MODEL = dict(
    hidden_size=512,
    num_hidden_layers=8,
    intermediate_size=1536,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=MAX_MODEL_LEN,
)  # ~24M params, 97 MB fp32
SWAP_MODELS = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, intermediate_size=384, num_attention_heads=2),  # ~1.8 MB
    "gen": GEN_MODEL,  # ~97 MB
    "large": dict(
        hidden_size=1024, num_hidden_layers=8, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4
    ),  # ~360 MB
}


def make_prompts(n: int, vocab: int, seed: int = 0) -> pa.Table:
    """n prompts of random token ids and varied lengths, with the per-row seeds the job uses."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(PROMPT_TOKENS[0], PROMPT_TOKENS[1] + 1, (n,), generator=g).tolist()
    # Skip the 7 special tokens at the start of the toy vocab so prompts hold no BOS/EOS.
    ids = [torch.randint(7, vocab, (k,), generator=g).tolist() for k in lengths]
    uids = [f"p{i}" for i in range(n)]
    return pa.table({"uid": uids, "prompt_ids": ids, "seed": [sample_seed(0, 0, u) for u in uids]})


def local_engine(model_dir: Path, cfg: GenerationConfig, max_model_len: int = MAX_MODEL_LEN) -> Any:
    """The engine class the actors run, built in this process: its vllm.LLM is the plain baseline,
    so the two paths can't drift apart in settings."""
    from spin_ray.engines.engine import Engine

    return Engine(str(model_dir), "float32", cfg, max_model_len, seed=0)


def plain_run(local: Any, prompts: pa.Table, cfg: GenerationConfig, chunk: int) -> tuple[float, int]:
    """(seconds, generated tokens) of plain vllm.LLM.generate over the prompts, `chunk` per call."""
    from vllm import SamplingParams, TokensPrompt

    # Exactly the requests Engine.generate makes: same ids, same sampling, same per-row seeds.
    requests = [TokensPrompt(prompt_token_ids=p) for p in prompts["prompt_ids"].to_pylist()]
    params = [
        SamplingParams(
            temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens, stop_token_ids=local.stops, seed=s
        )
        for s in prompts["seed"].to_pylist()
    ]
    start, tokens = time.perf_counter(), 0
    for i in range(0, len(requests), chunk):
        outputs = local.llm.generate(requests[i : i + chunk], params[i : i + chunk], use_tqdm=False)
        tokens += sum(len(o.outputs[0].token_ids) for o in outputs)
    return time.perf_counter() - start, tokens


def stream_run(engines: Any, prompts: pa.Table, cfg: GenerationConfig, batch_size: int) -> tuple[float, int]:
    """(seconds, generated tokens) of the job's path: through_engines, consumed as a stream."""
    from spin_ray.engines.client import through_engines

    cfg = cfg.model_copy(update={"batch_size": batch_size})
    start, tokens = time.perf_counter(), 0
    for batch in through_engines(prompts, engines.generate, cfg).iter_batches(batch_size=None, batch_format="pyarrow"):
        tokens += sum(batch["generated_tokens"].to_pylist())
    return time.perf_counter() - start, tokens


def hot_swap(model_dir: Path, cfg: GenerationConfig, repeats: int = 3) -> dict[str, float]:
    """Median seconds to pack + push + load full weights into a running engine."""
    import ray

    from spin_ray.weights import pack

    engines = start_engines(model_dir, cfg, MAX_MODEL_LEN)
    (engine,) = engines.all()
    state = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    packs, totals, engine_side = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        payload = pack(state)
        packed = time.perf_counter()
        reply = ray.get(engine.load_weights.remote(payload))  # bytes this large go via the object store
        totals.append(time.perf_counter() - start)
        packs.append(packed - start)
        engine_side.append(reply["seconds"])
    engines.shutdown()
    return {
        "mb": len(payload) / 1e6,
        "pack": statistics.median(packs),
        "total": statistics.median(totals),
        "engine": statistics.median(engine_side),
    }


def benchmark(args: argparse.Namespace, root: Path) -> None:
    import ray

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    gen_bytes = 4 * make_llama(root / "gen", **GEN_MODEL)
    prompts = make_prompts(args.prompts, vocab=len(make_tokenizer()))
    cfg = GenerationConfig(max_tokens=args.new_tokens, kv_cache_gib=1.0)
    print(
        f"model {gen_bytes / 1e6:.0f} MB fp32 (random, so EOS ends ~1/100 samples per token), {args.prompts} "
        f"prompts of {PROMPT_TOKENS[0]}-{PROMPT_TOKENS[1]} tokens, <= {args.new_tokens} new tokens, temperature "
        f"{cfg.temperature}, per-prompt seeds; 1 engine actor vs the same vllm.LLM in the driver, 1 OMP thread each",
        flush=True,
    )

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    engines = start_engines(root / "gen", cfg, MAX_MODEL_LEN)
    local = local_engine(root / "gen", cfg)

    # Both exist from here on, but only one generates at a time (2 cores). Machine speed drifts by
    # ~10% within minutes here, so each streaming run is compared with plain runs made just before it
    # (one generate() of all prompts: the baseline; and one generate() per batch_size prompts), and
    # the ratios are the medians over rounds of those neighbours' ratios.
    plain_run(local, prompts.slice(0, 64), cfg, 64)  # warm-up both
    stream_run(engines, prompts.slice(0, 64), cfg, 64)
    n = len(prompts)
    runs: dict[int, dict[str, list[float]]] = {bs: {"plain": [], "chunked": [], "stream": []} for bs in batch_sizes}
    tokens: set[int] = set()
    for _ in range(args.repeats):
        for bs in batch_sizes:
            plain = plain_run(local, prompts, cfg, n)
            chunked = plain_run(local, prompts, cfg, bs) if bs < n else plain
            stream = stream_run(engines, prompts, cfg, bs)
            for name, (seconds, tok) in (("plain", plain), ("chunked", chunked), ("stream", stream)):
                runs[bs][name].append(tok / seconds)
                tokens.add(tok)
    local.shutdown()
    engines.shutdown()

    def ratio(r: dict[str, list[float]], baseline: str) -> float:
        return statistics.median(s / b for s, b in zip(r["stream"], r[baseline], strict=True))

    print(f"\ntokens generated per run: {sorted(tokens)} (the same work on both paths); tok/s per round:")
    print(
        f"{'batch_size':>10} | {'plain':>11} | {'chunked plain':>13} | {'stream':>11} | "
        f"{'stream/plain':>12} | {'stream/chunked':>14}"
    )
    for bs, r in runs.items():
        plain, chunked, stream = (", ".join(f"{x:.0f}" for x in r[k]) for k in ("plain", "chunked", "stream"))
        print(
            f"{bs:>10} | {plain:>11} | {chunked:>13} | {stream:>11} | "
            f"{ratio(r, 'plain'):>11.3f}x | {ratio(r, 'chunked'):>13.3f}x"
        )
    print("plain: one generate() of all prompts, the baseline (goal: stream/plain >= 0.95x)")
    print("chunked plain: one generate() per batch_size prompts, as the engine gets them (stream/chunked: Ray's cost)")

    # Hot-swap, one engine per model size, each started and stopped in turn.
    swap_cfg = cfg.model_copy(update={"kv_cache_gib": 0.25})
    print(f"\nhot-swap: engine.load_weights.remote(pack(state_dict)), median of 3\n{'model':>6} | {'MB':>7} | ", end="")
    print(f"{'pack s':>7} {'total s':>8} {'MB/s':>6} | {'engine s':>8} {'MB/s':>6}", flush=True)
    for name in args.swap_models.split(","):
        if not (root / name).exists():
            make_llama(root / name, **SWAP_MODELS[name])
        r = hot_swap(root / name, swap_cfg)
        print(
            f"{name:>6} | {r['mb']:>7.1f} | {r['pack']:>7.3f} {r['total']:>8.3f} {r['mb'] / r['total']:>6.0f} | "
            f"{r['engine']:>8.3f} {r['mb'] / r['engine']:>6.0f}",
            flush=True,
        )
    print("total = pack + object store + engine load, timed in the driver; engine = the actor's own timing")
    ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=320)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", default="64,256,320", help="generation.batch_size values to try")
    ap.add_argument("--repeats", type=int, default=2, help="rounds of every measurement (ratios: median over rounds)")
    ap.add_argument("--swap-models", default="tiny,gen,large", help=f"hot-swap models, from {list(SWAP_MODELS)}")
    args = ap.parse_args()
    t_start = time.perf_counter()
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="spin-bench-gen-") as root:  # ~0.5 GB of models
        benchmark(args, Path(root))
    print(f"\nwall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
