"""A Hugging Face model card (README.md) in every exported checkpoint: what the model is, how it
was made, how p_0 ... p_t scored, and the command that makes it again. The front matter is the
Hub's (`base_model`, `library_name`, `tags`, `license` when the base model's card gives one)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard, metadata_load

from spin_ray.config import Config
from spin_ray.lora import split
from spin_ray.smollm2 import HUB_ID


def summary(model_dir: Path) -> str | None:
    """The one line under a spin-ray card's title, or None (no card, or not one of ours)."""
    readme = model_dir / "README.md"
    if not readme.is_file():
        return None
    loaded = ModelCard.load(readme)
    if "spin-ray" not in (loaded.data.tags or []):  # e.g. the template PEFT writes with an adapter
        return None
    body = loaded.text.splitlines()
    titles = [i for i, line in enumerate(body) if line.startswith("# ")]
    return next((line for line in body[titles[0] + 1 :] if line.strip()), None) if titles else None


def summary_line(cfg: Config, base: str, t: int) -> str:
    """The card's one line, also what jobs/serve.py lists per model in /v1/models."""
    method = "SFT baseline (spin.objective=sft)" if cfg.spin.objective == "sft" else "SPIN (self-play fine-tuning)"
    adapter = " LoRA adapter of" if cfg.train.lora else ""
    data = cfg.data.train_path or builtin_data(cfg)
    return f"Iteration {t} of {method}:{adapter} {base}, trained on {data}."


def builtin_data(cfg: Config) -> str:
    """What a built-in model (model.path=toy or smollm2) trains on when no data path is given."""
    return f"the toy's {cfg.toy.task} task" if cfg.model.path == "toy" else "the smollm2 word-problem task"


def card(cfg: Config, base: str, t: int, rows: list[dict[str, Any]], fingerprint: str, merged: bool = False) -> str:
    """The README.md of iteration t's checkpoint, trained from `base` (p_0, as model.path resolved);
    `rows` are metrics.jsonl's lines."""
    meta: dict[str, Any] = {
        "base_model": HUB_ID if cfg.model.path == "smollm2" else base,  # built from the Hub model's GGUF
        "library_name": "peft" if cfg.train.lora and not merged else "transformers",
        "tags": ["spin", "self-play", "spin-ray"] + (["lora"] if cfg.train.lora else []),
    }
    base_card = Path(split(base)[0]) / "README.md"
    if license_ := base_card.is_file() and (metadata_load(base_card) or {}).get("license"):
        meta["license"] = license_
    s, tr = cfg.spin, cfg.train
    settings = {
        "spin.iterations": s.iterations,
        "spin.beta": s.beta,
        "spin.mix_previous": s.mix_previous,
        "spin.objective": s.objective,
        "train.lr": tr.lr,
        "train.optimizer": tr.optimizer,
        "train.epochs": tr.epochs,
        "train.batch_size x num_workers x grad_accum": f"{tr.batch_size} x {tr.num_workers} x {tr.grad_accum}",
        "generation.temperature": cfg.generation.temperature,
        "generation.max_tokens": cfg.generation.max_tokens,
        "train.lora": tr.lora.model_dump() if tr.lora else None,
    }
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {Path(cfg.run.output_dir).name}: iteration {t}",
        "",
        summary_line(cfg, base, t),
        "",
        "Made with spin-ray, after SPIN (Chen et al. 2024, arXiv 2401.01335): the previous iteration answers every "
        "SFT prompt, and this one learned to prefer the real answer over that one.",
        "",
        "## Settings",
        "",
        *(f"- `{k}`: {v}" for k, v in settings.items() if v is not None),
        f"- training data: `{cfg.data.train_path or builtin_data(cfg)}`, fingerprint `{fingerprint}`",
        "",
        "## Held-out metrics",
        "",
        *_metrics_table([r for r in rows if r.get("iteration", t + 1) <= t]),
        "",
        "## Reproduce",
        "",
        "```bash",
        f"python jobs/spin.py --config {Path(cfg.run.output_dir) / 'config.yaml'}   # iteration {t}: iter_{t}/model",
        "```",
        "",
    ]
    return "\n".join(lines)


def _metrics_table(rows: list[dict[str, Any]]) -> list[str]:
    """A metric per line, p_0 ... p_t across (the last row logged for each iteration)."""
    by_t = {r["iteration"]: r for r in rows if any(k.startswith("eval/") for k in r)}
    names = sorted({k for r in by_t.values() for k in r if k.startswith("eval/")})
    if not names:
        return ["No held-out evaluation was logged (data.eval_path and eval.lm_eval unset)."]
    ts = sorted(by_t)
    table = ["| metric | " + " | ".join(f"p_{t}" for t in ts) + " |", "|---" * (len(ts) + 1) + "|"]
    for name in names:
        values = [by_t[t].get(name) for t in ts]
        table.append(f"| {name} | " + " | ".join("" if v is None else f"{v:.4g}" for v in values) + " |")
    return table
