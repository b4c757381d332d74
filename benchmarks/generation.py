"""Generation benchmark: the streaming path (Ray Data -> engine actor) against plain vLLM, and hot-swap.

1. Tokens/s of `through_engines` over one engine actor vs a plain `vllm.LLM.generate` in this
   process, on the same prompt ids, seeds and sampling settings, for several
   `generation.batch_size` values. Goal: streaming >= 0.95x plain.
2. Seconds of `engine.load_weights.remote(pack(state_dict))` (object-store path) vs model size.

    python benchmarks/generation.py [--prompts 512] [--new-tokens 64] [--batch-sizes 64,256,512]

Models are random tiny Llamas built here with the toy tokenizer; nothing comes from the hub.
"""

import os

# The engine actor runs vLLM in-process with one OMP thread (see start_engines); the plain baseline
# in this driver must run the same way. OMP_NUM_THREADS has to be set before torch is imported.
os.environ.update(
    {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "OMP_NUM_THREADS": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "TOKENIZERS_PARALLELISM": "false",
    }
)

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from spin_ray.config import GenerationConfig  # noqa: E402
from spin_ray.generation import sample_seed  # noqa: E402
from spin_ray.toy import make_tokenizer  # noqa: E402

MAX_MODEL_LEN = 256  # prompts of <= 48 tokens + up to 128 new ones fit
KV_CACHE_GIB = 1.0


def make_model(out_dir: Path, hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int) -> int:
    """Saves a random fp32 Llama + the toy tokenizer to out_dir; returns its size in bytes."""
    tok = make_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,  # vLLM's CPU attention takes 32 or 64, not 16
        max_position_embeddings=MAX_MODEL_LEN,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def make_prompts(n: int, vocab: int, seed: int = 0) -> pa.Table:
    """n prompts of 16-48 random token ids (lengths vary, as in real data), one seed each."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(16, 49, (n,), generator=g).tolist()
    # Skip the 7 special tokens at the start of the toy vocab so prompts hold no BOS/EOS.
    ids = [torch.randint(7, vocab, (k,), generator=g).tolist() for k in lengths]
    uids = [f"p{i}" for i in range(n)]
    return pa.table({"uid": uids, "prompt_ids": ids, "seed": [sample_seed(0, 0, u) for u in uids]})


def plain_vllm(model_dir: Path, prompts: pa.Table, cfg: GenerationConfig, batch_sizes: list[int]) -> dict:
    """Tokens/s of vllm.LLM in this process: all prompts in one call, and in chunks of each batch size."""
    from vllm import LLM, SamplingParams, TokensPrompt

    # Exactly the arguments Engine.__init__ passes on CPU.
    llm = LLM(
        model=str(model_dir),
        dtype="float32",
        seed=0,
        max_model_len=MAX_MODEL_LEN,
        enforce_eager=cfg.enforce_eager,
        worker_extension_cls="spin_ray.sync.WeightReceiver",
        kv_cache_memory_bytes=int(cfg.kv_cache_gib * 2**30),
    )
    # ... and exactly the requests Engine.generate makes.
    requests = [TokensPrompt(prompt_token_ids=p) for p in prompts["prompt_ids"].to_pylist()]
    params = [
        SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens, seed=s)
        for s in prompts["seed"].to_pylist()
    ]

    def run(chunk: int) -> tuple[float, int]:
        start, tokens = time.perf_counter(), 0
        for i in range(0, len(requests), chunk):
            outputs = llm.generate(requests[i : i + chunk], params[i : i + chunk], use_tqdm=False)
            tokens += sum(len(o.outputs[0].token_ids) for o in outputs)
        return time.perf_counter() - start, tokens

    run(32)  # warm-up: first-call allocations, kernel selection
    results = {"all": run(len(requests))}
    for bs in batch_sizes:
        results[bs] = run(bs)
    llm.llm_engine.engine_core.shutdown()
    del llm
    return results


def streaming(model_dir: Path, prompts: pa.Table, cfg: GenerationConfig, batch_sizes: list[int]) -> dict:
    """Tokens/s of through_engines over one engine actor, per generation.batch_size."""
    import ray

    from spin_ray.generation import start_engines, through_engines

    engines = start_engines(str(model_dir), "float32", cfg, MAX_MODEL_LEN, seed=0)

    def run(table: pa.Table, batch_size: int) -> tuple[float, int]:
        c = cfg.model_copy(update={"batch_size": batch_size})
        start, tokens = time.perf_counter(), 0
        for batch in through_engines(table, engines, c).iter_batches(batch_size=None, batch_format="pyarrow"):
            tokens += sum(batch["generated_tokens"].to_pylist())
        return time.perf_counter() - start, tokens

    run(prompts.slice(0, 32), 32)  # warm-up: the engine's first batch and Ray Data's first plan
    results = {bs: run(prompts, bs) for bs in batch_sizes}
    ray.get(engines[0].shutdown.remote())
    ray.kill(engines[0])
    return results


def hot_swap(model_dir: Path, cfg: GenerationConfig, repeats: int = 3) -> dict:
    """Median seconds to pack + push + load full weights into a running engine."""
    import ray

    from spin_ray.generation import start_engines
    from spin_ray.sync import pack

    engine = start_engines(str(model_dir), "float32", cfg, MAX_MODEL_LEN, seed=0)[0]
    state = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    packs, totals, engine_side = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        payload = pack(state)
        packed = time.perf_counter()
        reply = ray.get(engine.load_weights.remote(payload))  # bytes go through the object store
        totals.append(time.perf_counter() - start)
        packs.append(packed - start)
        engine_side.append(reply["seconds"])
    ray.get(engine.shutdown.remote())
    ray.kill(engine)
    return {
        "mb": len(payload) / 1e6,
        "pack": statistics.median(packs),
        "total": statistics.median(totals),
        "engine": statistics.median(engine_side),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", default="64,256,512", help="generation.batch_size values to try")
    ap.add_argument("--skip-swap-large", action="store_true", help="skip the ~360 MB hot-swap model")
    args = ap.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    t_start = time.perf_counter()

    root = Path(tempfile.mkdtemp(prefix="spin-bench-gen-"))
    # ~24M params (97 MB fp32): big enough that the model, not Python, sets the pace.
    gen_dir = root / "gen"
    gen_bytes = make_model(gen_dir, hidden=512, layers=8, intermediate=1536, heads=8, kv_heads=2)
    prompts = make_prompts(args.prompts, vocab=len(make_tokenizer()))
    cfg = GenerationConfig(max_tokens=args.new_tokens, kv_cache_gib=KV_CACHE_GIB)
    print(
        f"model {gen_bytes / 1e6:.0f} MB fp32, {args.prompts} prompts of 16-48 tokens, up to {args.new_tokens} new "
        f"tokens, temperature {cfg.temperature}, per-prompt seeds, 1 engine, 1 OMP thread",
        flush=True,
    )

    # Plain first, then the engine: never both at once on 2 cores.
    plain = plain_vllm(gen_dir, prompts, cfg, batch_sizes)

    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().print_on_execution_start = False
    stream = streaming(gen_dir, prompts, cfg, batch_sizes)

    plain_s, plain_tok = plain["all"]
    print(f"\nplain vLLM, all {args.prompts} prompts in one generate(): {plain_tok} tokens in {plain_s:.2f} s")
    print(f"= {plain_tok / plain_s:.0f} tokens/s\n")
    print(
        f"{'batch_size':>10} | {'stream tok':>10} {'s':>6} {'tok/s':>6} | {'chunked plain tok/s':>19} | "
        f"{'stream/plain':>12} {'stream/chunked':>14}"
    )
    for bs in batch_sizes:
        s, tok = stream[bs]
        cs, ctok = plain[bs]
        print(
            f"{bs:>10} | {tok:>10} {s:>6.2f} {tok / s:>6.0f} | {ctok / cs:>19.0f} | "
            f"{(tok / s) / (plain_tok / plain_s):>11.3f}x {(tok / s) / (ctok / cs):>13.3f}x"
        )
    print("stream/plain: against one generate() of all prompts (the goal is >= 0.95x)")
    print("stream/chunked: against plain generate() called once per batch_size chunk (Ray's own overhead)")

    # Hot-swap: a ~1 MB model, the generation model (~100 MB), and a ~360 MB one.
    swap_models = {"tiny": dict(hidden=128, layers=2, intermediate=384, heads=2, kv_heads=2)}
    swap_dirs = {"tiny": root / "tiny", "gen": gen_dir}
    if not args.skip_swap_large:
        swap_models["large"] = dict(hidden=1024, layers=8, intermediate=2816, heads=16, kv_heads=4)
        swap_dirs["large"] = root / "large"
    for name, shape in swap_models.items():
        make_model(swap_dirs[name], **shape)
    swap_cfg = cfg.model_copy(update={"kv_cache_gib": 0.25})
    print(f"\nhot-swap: engine.load_weights.remote(pack(state_dict)), median of 3\n{'':>6} | {'MB':>7} | ", end="")
    print(f"{'pack s':>7} {'total s':>8} {'MB/s':>6} | {'engine s':>8} {'MB/s':>6}")
    for name, model_dir in swap_dirs.items():
        r = hot_swap(model_dir, swap_cfg)
        print(
            f"{name:>6} | {r['mb']:>7.1f} | {r['pack']:>7.3f} {r['total']:>8.3f} {r['mb'] / r['total']:>6.0f} | "
            f"{r['engine']:>8.3f} {r['mb'] / r['engine']:>6.0f}",
            flush=True,
        )
    print("total = pack + object store + engine load, seen from the driver; engine = the actor's own timing")
    ray.shutdown()
    print(f"\nwall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
