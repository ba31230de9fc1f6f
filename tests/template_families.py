"""Chat templates as models ship them, and tokenizers trained here with each family's special tokens.

The templates are the models' public chat templates, written out (nothing loads from the Hub);
the tokenizers are byte-level BPE trained locally on a small corpus, with the family's BOS and EOS
as the model's tokenizer has them, so that where a template's text becomes which special token is
as in the real model (the ordinary words split differently, which no test here depends on).

    tokenizer = family_tokenizer("zephyr")          # Zephyr's template, <s> BOS, </s> EOS
"""

from prefopt.tiny import default_corpus, train_tokenizer

LLAMA3 = (  # Meta-Llama-3-8B-Instruct
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
ZEPHYR = (  # HuggingFaceH4/zephyr-7b-beta (the alignment handbook's default template)
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
MISTRAL = (  # mistralai/Mistral-7B-Instruct-v0.2
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
CHATML = (  # the plain ChatML of OpenHermes-style models (no default system turn)
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN2 = (  # Qwen/Qwen2-7B-Instruct: a default system turn opens a conversation that has none
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PHI3 = (  # microsoft/Phi-3-mini-4k-instruct: EOS closes a conversation rendered without the generation prompt
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
GEMMA = (  # google/gemma-2-9b-it: refuses a system turn
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
# The template the SimPO repository's gemma-2-9b-it-simpo.yaml sets: a system turn folded into the first
# user turn, no alternation check, so an answer renders alone
GEMMA2_SIMPO_CONFIG = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] | trim + "
    "'\n\n' %}{% set messages = messages[1:] %}{% else %}{% set system_message = '' %}{% endif %}"
    "{% for message in messages %}{% if loop.index0 == 0 %}{% set content = system_message + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if (message['role'] == 'assistant') %}"
    "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + "
    "'\n' + content | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{'<start_of_turn>model\n'}}{% endif %}"
)

# family: (template, BOS, EOS, the other special tokens)
FAMILIES = {
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>"]),
    # base Llama 3's tokenizer with the instruct template: EOS is <|end_of_text|>, turns end with <|eot_id|>
    "llama3_base_eos": (LLAMA3, "<|begin_of_text|>", "<|end_of_text|>",
                        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    "mistral": (MISTRAL, "<s>", "</s>", []),
    "zephyr": (ZEPHYR, "<s>", "</s>", []),
    "chatml": (CHATML, None, "<|im_end|>", ["<|im_start|>"]),
    "qwen2": (QWEN2, None, "<|im_end|>", ["<|im_start|>", "<|endoftext|>"]),
    # Qwen's base tokenizers: EOS is <|endoftext|>, ChatML turns end with <|im_end|>
    "qwen2_base_eos": (QWEN2, None, "<|endoftext|>", ["<|im_start|>", "<|im_end|>"]),
    "phi3": (PHI3, None, "<|endoftext|>", ["<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]),
    "phi3_end_eos": (PHI3, None, "<|end|>", ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>"]),
    "gemma": (GEMMA, "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"]),
    "gemma_turn_eos": (GEMMA, "<bos>", "<end_of_turn>", ["<eos>", "<start_of_turn>"]),
    "gemma2_simpo_config": (GEMMA2_SIMPO_CONFIG, "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"]),
}


def family_tokenizer(family: str, template: str | None = None):
    """A tokenizer with `family`'s BOS, EOS and special tokens, and its template (or `template`)."""
    chat_template, bos, eos, others = FAMILIES[family]
    specials = [t for t in (bos, eos, *others) if t and t != "<|endoftext|>"]
    tokenizer = train_tokenizer(default_corpus(), vocab_size=400, bos=False, pad=None, chat_template=None,
                                extra_special_tokens=specials)
    tokenizer.eos_token = eos
    tokenizer.bos_token = bos
    tokenizer.chat_template = template or chat_template
    return tokenizer
