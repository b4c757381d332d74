"""LoRA runs' shared facts: the PEFT config, what an exported adapter is on disk, and its base.

A LoRA run's `iter_<t>/model` is a PEFT adapter directory (adapter_config.json +
adapter_model.safetensors + the tokenizer) whose `base_model_name_or_path` is the base model the
run started from: `peft`, transformers and vLLM load it as it is. The engines and the trainer
load that base once and then only ever move the adapter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from spin_ray.config import LoraConfig
from spin_ray.rundir import replace_dir

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def peft_config(lora: LoraConfig) -> Any:
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_FILES[0]).is_file()


def split(path: str) -> tuple[str, str | None]:
    """(base model, adapter dir or None) of the weights at `path`."""
    if not is_adapter(path):
        return path, None
    return json.loads((Path(path) / ADAPTER_FILES[0]).read_text())["base_model_name_or_path"], path


def adapter_files(path: str | Path) -> dict[str, bytes]:
    """What the engines need of an exported adapter, as bytes for the object store."""
    return {name: (Path(path) / name).read_bytes() for name in ADAPTER_FILES}


def write_adapter(files: dict[str, bytes], path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (path / name).write_bytes(data)


def linear_names(model_config: Any) -> set[str]:
    """The names of the model's linear layers inside its blocks (q_proj, down_proj, ...), from
    a weightless copy: what `target_modules` may name."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return names - {"lm_head"}


def engine_targets(base: str) -> list[str]:
    """vLLM's `lora_target_modules` for `base`: the blocks' linear layers. Left to itself vLLM
    also wraps lm_head, and 0.32's LoRA logits path breaks prompt log-probs on CPU (scoring,
    evaluation) for every request; no adapter here targets lm_head (see check_targets)."""
    from transformers import AutoConfig

    return sorted(linear_names(AutoConfig.from_pretrained(base)))


def check_targets(lora: LoraConfig, model_config: Any, model_path: str) -> None:
    """Refuses target modules the model does not have (PEFT would fail only on the train ranks)."""
    if lora.target_modules == "all-linear":
        return
    known = linear_names(model_config)
    unknown = sorted(set(lora.target_modules) - known)
    if unknown:
        raise ValueError(
            f"train.lora.target_modules: {unknown} are not linear layers of {model_path!r}; "
            f"it has {sorted(known)} (or use all-linear)"
        )


def merge(adapter_dir: str | Path, out_dir: str | Path, dtype: str) -> None:
    """base + adapter as one full HF checkpoint (train.lora.export_merged), made on CPU in a
    process of its own: a train rank's from_pretrained would partition the base under ZeRO-3.
    Written beside `out_dir` and renamed, so a crash never leaves half a checkpoint."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, _ = split(str(adapter_dir))
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
    PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload().save_pretrained(tmp)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(tmp)
    replace_dir(tmp, out)
