"""y ends where generation ends, on the chat templates users bring (fast tier, no Ray).

Each family's tokenizer is built here: a small byte-level BPE with that family's special tokens,
its EOS and its chat template (as the model's tokenizer_config.json ships it). Every template but
Llama-3's and Mistral's writes something after the assistant turn's end (a newline, or an EOS
after Phi-3's `<|end|>`) that no generated answer has; the real answer's ids must stop at the
first stop token, as the engines do.
"""

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from spin_ray.chat import encode, model_stop_ids, stop_token_ids
from spin_ray.data import load_sft

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}"
    "\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == "
    "'assistant' %}{{ message['content'] + eos_token}}{% endif %}{% endfor %}"
)
GEMMA = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | "
    "trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# family: (template, bos, eos, end of turn, the other special tokens, generation_config's eos)
FAMILIES = {
    "chatml": (CHATML, None, "<|im_end|>", "<|im_end|>", ["<|im_start|>"], None),
    "zephyr": (ZEPHYR, "<s>", "</s>", "</s>", ["<|user|>", "<|assistant|>", "<|system|>"], None),
    # Llama-3's original tokenizer names <|end_of_text|> as EOS; its generation_config lists <|eot_id|> too.
    "llama3": (
        LLAMA3,
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|eot_id|>",
        ["<|start_header_id|>", "<|end_header_id|>"],
        ["<|end_of_text|>", "<|eot_id|>"],
    ),
    "mistral": (MISTRAL, "<s>", "</s>", "</s>", ["[INST]", "[/INST]"], None),
    "gemma": (GEMMA, "<bos>", "<eos>", "<end_of_turn>", ["<start_of_turn>"], None),
    "phi3": (PHI3, "<s>", "<|endoftext|>", "<|end|>", ["<|user|>", "<|assistant|>", "<|system|>"], None),
}
ANSWER = "Anna has 3 + 5 = 8 apples."


def family_tokenizer(name: str, dest=None) -> PreTrainedTokenizerFast:
    template, bos, eos, end, others, _ = FAMILIES[name]
    specials = list(dict.fromkeys([t for t in (bos, eos, end) if t] + others))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [ANSWER, "How many apples does Anna have now?", "You are a helpful assistant.", "Hello there"]
    tok.train_from_iterator(
        corpus * 20,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, chat_template=template)
    if dest is not None:
        fast.save_pretrained(dest)
    return fast


def conversation(question: str = "How many apples does Anna have now?") -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": ANSWER}]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_real_answer_ends_at_the_end_of_turn(name):
    tok = family_tokenizer(name)
    end = FAMILIES[name][3]
    stops = stop_token_ids(tok)
    assert tok.convert_tokens_to_ids(end) in stops and tok.eos_token_id in stops
    prompt, response = encode(tok, conversation(), stops)
    assert tok.decode(response) == ANSWER + end  # nothing the template writes after it
    rendered = tok.apply_chat_template(conversation(), tokenize=False)
    assert tok.decode(prompt + response) == rendered[: rendered.rindex(end) + len(end)]


def test_the_generation_configs_eos_ids_stop_too(tmp_path):
    """Llama-3 with the original tokenizer: EOS is <|end_of_text|>, the turn ends at <|eot_id|>, and
    generation_config.json lists both; each id of a list counts."""
    from transformers import GenerationConfig

    tok = family_tokenizer("llama3", tmp_path)
    ids = tok.convert_tokens_to_ids(FAMILIES["llama3"][5])
    GenerationConfig(eos_token_id=ids + [tok.convert_tokens_to_ids("<|start_header_id|>")]).save_pretrained(tmp_path)
    stops = model_stop_ids(tok, str(tmp_path))
    assert stops == sorted(set(ids) | {tok.convert_tokens_to_ids("<|start_header_id|>")})


def test_read_sft_cuts_every_answer(tmp_path):
    tok = family_tokenizer("chatml")
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"messages": conversation(f"q{i}")}) + "\n" for i in range(3)))
    examples = load_sft(path, tok, max_prompt_tokens=None, max_response_tokens=None, context=4096)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert [e.real_ids[-1] for e in examples] == [end] * 3
    assert all(e.real_ids.count(end) == 1 for e in examples)
