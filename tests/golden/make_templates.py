#!/usr/bin/env python3
"""Golden fixture for afinar-data's templates, tokenization and label masks.

Run once (from the repo root) with the project venv:
    /work/venv/bin/python tests/golden/make_templates.py
Writes tests/golden/fixtures/templates.json, read by crates/data/tests/it/golden_templates.rs.

Reference: transformers' apply_chat_template with the project tokenizer
(tests/fixtures/tokenizer, loaded by AutoTokenizer -> the fast tokenizer backend):
  * `text`  = apply_chat_template(messages, chat_template=T, tokenize=False)
  * `ids`   = tokenizer(text, add_special_tokens=False).input_ids, with <bos> prepended when the
              template does not emit it (afinar's rule: exactly one BOS, first)
  * `mask`  = transformers' assistant-token mask from the same template with TRL-style
              {% generation %} tags around "assistant content + end-of-turn markup" (what afinar
              trains by default), same BOS rule.
Gemma cannot take a system message: for `gemma` the reference input is the conversation with the
system text folded into the first user turn as "system\\n\\nuser" (afinar's documented behaviour).
Alpaca: Stanford Alpaca's PROMPT_DICT verbatim + "\\n" after "### Response:" (afinar's choice),
output + eos; mask = Stanford's rule (prompt tokens -100).
"""
import json
import os
import sys

import transformers
from transformers import AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOK_DIR = os.path.join(ROOT, "tests", "fixtures", "tokenizer")
OUT = os.path.join(ROOT, "tests", "golden", "fixtures", "templates.json")

tok = AutoTokenizer.from_pretrained(TOK_DIR)
BOS = tok.bos_token
assert BOS == "<bos>" and tok.bos_token_id == 2

# Reference Jinja templates (gemma: gemma-2-it tokenizer_config; chatml: TRL ChatMlSpecialTokens;
# llama3: TRL llama3.jinja). The *_TRAIN variants add {% generation %} around what is trained.
GEMMA = tok.chat_template
GEMMA_TRAIN = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' }}{% if role == 'model' %}{% generation %}{{ message['content'] | trim + '<end_of_turn>\n' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<end_of_turn>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_TRAIN = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_TRAIN = (
    "{% for message in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# A tokenizer-supplied template that is none of the built-ins: system support, block tags with
# trim_blocks/lstrip_blocks, a Python string method, `| trim`, eos_token as the end of a turn.
CUSTOM = """{{ bos_token }}{% for message in messages %}
{% if message['role'] == 'system' %}
<|im_start|>system
{{ message['content'].strip() }}<|im_end|>
{% elif message['role'] == 'user' %}
<|im_start|>user
{{ message['content'] }}<|im_end|>
{% else %}
<|im_start|>assistant
{% generation %}{{ message['content'] | trim + eos_token + '\n' }}{% endgeneration %}
{% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""

CONVERSATIONS = {
    "single": [
        {"role": "user", "content": "¿Cuál es la capital de Francia?"},
        {"role": "assistant", "content": "París."},
    ],
    "multi": [
        {"role": "user", "content": "  Define «hipótesis» en una frase.  "},
        {"role": "assistant", "content": "Una hipótesis es una explicación provisional que puede contrastarse.\n"},
        {"role": "user", "content": "¿Y una teoría?"},
        {"role": "assistant", "content": "\nUna teoría es un marco explicativo amplio, respaldado por muchas pruebas."},
        {"role": "user", "content": "Gracias."},
        {"role": "assistant", "content": "De nada."},
    ],
    "system": [
        {"role": "system", "content": "Eres un asistente académico riguroso. Si no lo sabes, di «No lo sé»."},
        {"role": "user", "content": "¿Quién escribió «El tratado de las nubes inmóviles» (1743)?"},
        {"role": "assistant", "content": "No lo sé: no encuentro ninguna obra con ese título y podría no existir."},
        {"role": "user", "content": "Responde en JSON."},
        {"role": "assistant", "content": "{\"respuesta\": \"No lo sé\", \"certeza\": \"baja\", \"fuentes\": []}"},
    ],
    "trailing_user": [
        {"role": "user", "content": "Suma 2 + 2."},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "¿Seguro?"},
    ],
    "english_numbers": [
        {"role": "user", "content": "The sample mean of 3.5, 4.25 and 10 is?\n\nShow the steps."},
        {"role": "assistant", "content": "(3.5 + 4.25 + 10) / 3 = 17.75 / 3 ≈ 5.92."},
    ],
}


def fold_system(messages):
    if messages and messages[0]["role"] == "system":
        rest = [dict(m) for m in messages[1:]]
        rest[0]["content"] = messages[0]["content"] + "\n\n" + rest[0]["content"]
        return rest
    return messages


def with_bos(text, ids, mask):
    if text.startswith(BOS):
        return ids, mask
    return [tok.bos_token_id] + ids, [0] + mask


def render_case(name, template_name, messages, render_template, train_template, fold=False):
    ref = fold_system(messages) if fold else messages
    case = {"name": name, "template": template_name, "messages": messages}
    try:
        text = tok.apply_chat_template(ref, chat_template=render_template, tokenize=False)
    except Exception as e:  # jinja2 TemplateError from raise_exception
        case["error"] = str(e)
        return case
    ids = tok(text, add_special_tokens=False).input_ids
    out = tok.apply_chat_template(
        ref, chat_template=train_template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert out["input_ids"] == ids, (name, template_name, "training template renders differently")
    mask = list(out["assistant_masks"])
    ids, mask = with_bos(text, ids, mask)
    case.update({"text": text, "ids": ids, "mask": mask})
    return case


PROMPT_DICT = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:"
    ),
}
ALPACA = [
    {"instruction": "Resume el texto en una frase.", "input": "El agua hierve a 100 °C a nivel del mar.\nA más altitud, hierve antes.", "output": "La temperatura de ebullición del agua baja con la altitud."},
    {"instruction": "Give three examples of vertebrates.", "input": "", "output": "Fish, birds and mammals."},
]


def alpaca_case(rec):
    key = "prompt_input" if rec.get("input", "") != "" else "prompt_no_input"
    source = BOS + PROMPT_DICT[key].format_map(rec) + "\n"
    target = rec["output"] + tok.eos_token
    text = source + target
    ids = tok(text, add_special_tokens=False).input_ids
    source_len = len(tok(source, add_special_tokens=False).input_ids)
    mask = [0] * source_len + [1] * (len(ids) - source_len)
    return {"name": "alpaca", "template": "alpaca", "record": rec, "text": text, "ids": ids, "mask": mask}


def main():
    cases = []
    for name, conv in CONVERSATIONS.items():
        cases.append(render_case(name, "gemma", conv, GEMMA, GEMMA_TRAIN, fold=True))
        cases.append(render_case(name, "chatml", conv, CHATML, CHATML_TRAIN))
        cases.append(render_case(name, "llama3", conv, LLAMA3, LLAMA3_TRAIN))
        # The tokenizer's own template (Gemma's): a system message must raise.
        cases.append(render_case(name, "tokenizer", conv, GEMMA, GEMMA_TRAIN))
        cases.append(render_case(name, "custom", conv, CUSTOM, CUSTOM))
    cases.extend(alpaca_case(r) for r in ALPACA)
    doc = {
        "generator": "tests/golden/make_templates.py",
        "transformers": transformers.__version__,
        "custom_template": CUSTOM,
        "cases": cases,
    }
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {OUT}: {len(cases)} cases")


if __name__ == "__main__":
    sys.exit(main())
