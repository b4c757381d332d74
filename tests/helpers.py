"""Shared test helpers: HF reference computations and small factories."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import AutoModelForCausalLM

from spin_ray.cluster import free_port  # noqa: F401 - the tests take it from here
from spin_ray.config import Config, load_config
from spin_ray.data import pad_pairs
from spin_ray.engines.client import Engines
from spin_ray.loss import sequence_logps
from spin_ray.pairs import PairStream, pair_stream
from spin_ray.toy import read_jsonl
from spin_ray.trainer.supervisor import Trainer


def prompt_ids(tok, question: str, system: str | None = None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def hf_greedy(model, tok, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """HF greedy decoding, one prompt at a time (no padding effects), cut after EOS like vLLM."""
    out = []
    for p in prompts:
        ids = model.generate(torch.tensor([p]), max_new_tokens=max_tokens, do_sample=False)[0, len(p) :].tolist()
        out.append(ids[: ids.index(tok.eos_token_id) + 1] if tok.eos_token_id in ids else ids)
    return out


def hf_sums(model, prompts: list[list[int]], responses: list[list[int]]) -> list[float]:
    """Summed log p(response | prompt) under an HF model, one sequence at a time."""
    sums = []
    for p, r in zip(prompts, responses, strict=True):
        with torch.no_grad():
            logp = model(torch.tensor([p + r])).logits[0].log_softmax(-1)
        sums.append(sum(logp[len(p) - 1 + j, t].item() for j, t in enumerate(r)))
    return sums


def perturbed(model_dir, seed: int, scale: float = 0.05):
    """The model with seeded noise on every weight: 'new weights' for a hot-swap."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def hf_logps(model_dir, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Summed response log-probs of (real, generated) per pair under an HF checkpoint."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = table.to_pylist()
    batch = pad_pairs(
        [r["prompt_ids"] for r in rows] * 2,
        [r["real_ids"] for r in rows] + [r["generated_ids"] for r in rows],
        pad_id=0,
    )
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = sequence_logps(logits, batch["input_ids"], batch["response_mask"]).numpy()
    return logps[: len(rows)], logps[len(rows) :]


def with_engine_logps(model, table: pa.Table) -> pa.Table:
    """`table` with the generated tokens' log-probs under `model`, where the engines put them."""
    rows = table.to_pylist()
    logps = []
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([r["prompt_ids"] + r["generated_ids"]])
            tokens = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            n = len(r["prompt_ids"])
            logps.append([tokens[n - 1 + i, tok].item() for i, tok in enumerate(r["generated_ids"])])
    return table.append_column("generated_logps", pa.array(logps))


def run_notebook(run_dir: Path):
    """Executes notebooks/spin_run.ipynb on `run_dir`; returns the executed notebook."""
    import os

    import nbclient
    import nbformat

    path = ROOT / "notebooks" / "spin_run.ipynb"
    nb = nbformat.read(path, as_version=4)
    os.environ["SPIN_RUN_DIR"] = str(run_dir)
    try:
        resources = {"metadata": {"path": str(path.parent)}}
        nbclient.NotebookClient(nb, timeout=180, kernel_name="python3", resources=resources).execute()
    finally:
        del os.environ["SPIN_RUN_DIR"]
    return nb


LIVE_QUESTION = "12+34="


def poll_live(url: str, stop, out: Path) -> None:
    """Asks the live endpoint LIVE_QUESTION greedily until `stop` is set; appends each answer
    and the model name it came with to `out`."""
    import httpx

    body = {"model": "spin-live", "messages": [{"role": "user", "content": LIVE_QUESTION}], "temperature": 0}
    with httpx.Client(timeout=60) as http, out.open("a") as f:
        while not stop.is_set():
            try:
                reply = http.post(f"{url}/chat/completions", json=body | {"max_tokens": 8})
                if reply.status_code == 200:
                    answer = reply.json()
                    f.write(json.dumps({"model": answer["model"], "text": answer["choices"][0]["message"]["content"]}))
                    f.write("\n")
            except httpx.HTTPError:
                pass  # not up yet, or between the two runs
            stop.wait(0.05)


N_PROMPTS = 48  # records of the end-to-end runs: 40 distinct, 8 exact repeats, no ids
ROOT = Path(__file__).resolve().parent.parent


def repeated_records_file(toy, path: Path) -> Path:
    """Toy SFT data as users often have it: no ids, some prompts and whole records repeated."""
    records = [{"messages": json.loads(line)["messages"]} for line in toy.train_path.read_text().splitlines()[:40]]
    records += records[:8]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def toy_config(out: Path, train_path: Path, *overrides: str):
    """The end-to-end runs' setting: greedy, fp32, a high lr so weights visibly move."""
    return load_config(
        ROOT / "configs" / "toy.yaml",
        [
            f"run.output_dir={out}",
            f"data.train_path={train_path}",
            "generation.temperature=0",
            "model.dtype=float32",
            "train.lr=1e-3",
            "train.batch_size=8",
            "train.log_every=2",
            *overrides,
        ],
    )


def make_trainer(toy, out_dir, *overrides: str, model_path=None, holds: int = 0) -> Trainer:
    cfg = load_config(
        None,
        [
            f"run.output_dir={out_dir}",
            "train.num_workers=2",
            "train.batch_size=8",
            "train.log_every=1",
            "train.lr=1e-3",
            "train.optimizer=adamw",
            "train.stall_timeout_s=120",  # a hang fails the test instead of stalling the suite
            *overrides,
        ],
    )
    trainer = Trainer(cfg, str(model_path or toy.model_dir), holds)
    trainer.wait_ready()  # the tests use its pids
    return trainer


def make_engines(toy, *overrides: str, max_model_len: int = 256) -> tuple[Engines, Config]:
    """Started engines on the toy model (fp32, small KV cache), and their config."""
    cfg = load_config(None, ["generation.kv_cache_gib=0.25", "generation.max_tokens=8", *overrides])
    engines = Engines(cfg, str(toy.model_dir), max_model_len)
    engines.wait_ready()
    return engines, cfg


def stream_of(
    table: pa.Table, pairs_dir: Path, seed: int = 1, window: int = 16, batch_size: int = 8, score=None
) -> PairStream:
    """`table`'s pairs stored as one iteration's parquet part, as the stream training reads."""
    pairs_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, pairs_dir / "part-000000.parquet")
    return pair_stream([pairs_dir], None, seed, window, batch_size, score)


def dealt(stream: PairStream, ranks: int, epochs: int = 1) -> list[list[list[str]]]:
    """Per step, per rank, the uids the stream gives it."""
    return [[table["uid"].to_pylist() for table in step] for step in stream.steps(ranks, epochs)]


GENERATE_TASK = """task: {name}
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: [], max_gen_toks: {max_gen_toks}, do_sample: false}}
metric_list: [{{metric: exact_match, aggregation: mean, higher_is_better: true}}]
"""
CHOICE_TASK = """task: {name}
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list: [{{metric: acc, aggregation: mean, higher_is_better: true}}]
"""
TOY_TASKS = {"spin_toy_addition": GENERATE_TASK, "spin_toy_choice": CHOICE_TASK}


def write_task(dest: Path, name: str, rows: list[dict], text: str = GENERATE_TASK, max_gen_toks: int = 8) -> Path:
    """An lm-eval task `name` over `rows` (question, answer, ...) in local JSONL: nothing to download."""
    dest.mkdir(parents=True, exist_ok=True)
    data = dest / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (dest / f"{name}.yaml").write_text(text.format(name=name, data=data, max_gen_toks=max_gen_toks))
    return dest


def toy_tasks(toy, dest: Path) -> Path:
    """lm-eval tasks of the toy's held-out sums, over local JSONL (nothing to download): the sums as
    a generate_until task, and as a 4-way choice between the sum and three near misses."""
    rows = []
    for i, record in enumerate(read_jsonl(toy.eval_path)):
        question, answer = (m["content"] for m in record["messages"])
        wrong = [str(int(answer) + d) for d in (1, -10, 10)]
        label = i % 4
        rows.append(
            {
                "question": question,
                "answer": answer,
                "choices": wrong[:label] + [answer] + wrong[label:],
                "label": label,
            }
        )
    for name, text in TOY_TASKS.items():
        write_task(dest, name, rows, text)
    return dest


LLAMA_7B = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "intermediate_size": 11008,
    "vocab_size": 32000,
}


def shaped_model(root: Path, toy, shape: dict) -> Path:
    """A model dir with a Llama config.json of `shape`, the toy tokenizer and no weights, plus a
    small chat JSONL next to it."""
    root.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "max_position_embeddings": 4096,
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
        **shape,
    }
    (root / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(toy.model_dir / name, root / name)
    lines = toy.train_path.read_text().splitlines()[:40]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root
