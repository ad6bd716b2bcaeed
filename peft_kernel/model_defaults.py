"""Which modules adapters target by default, per transformers ``model_type`` (the attention
projections, mostly query and value). Method-agnostic data that method plugins hand to the core as
their ``MethodRecord.default_target_modules``; HF PEFT shares one such table between its low-rank and
orthogonal methods, so plugins of those families use this one.

A value is a list of module-name suffixes or, as HF PEFT has for ``gemma4``, one regex string that
must match the full module name; ``target_modules=None`` becomes a set of the former or the string
itself."""

DEFAULT_TARGET_MODULES: dict[str, list[str] | str] = {
    't5': ['q', 'v'],
    'mt5': ['q', 'v'],
    'bart': ['q_proj', 'v_proj'],
    'gpt2': ['c_attn'],
    'bloom': ['query_key_value'],
    'blip-2': ['q', 'v', 'q_proj', 'v_proj'],
    'opt': ['q_proj', 'v_proj'],
    'gptj': ['q_proj', 'v_proj'],
    'gpt_neox': ['query_key_value'],
    'gpt_neo': ['q_proj', 'v_proj'],
    'bert': ['query', 'value'],
    'roberta': ['query', 'value'],
    'xlm-roberta': ['query', 'value'],
    'electra': ['query', 'value'],
    'deberta-v2': ['query_proj', 'value_proj'],
    'deberta': ['in_proj'],
    'layoutlm': ['query', 'value'],
    'llama': ['q_proj', 'v_proj'],
    'llama4': ['q_proj', 'v_proj'],
    'chatglm': ['query_key_value'],
    'gpt_bigcode': ['c_attn'],
    'mpt': ['Wqkv'],
    'RefinedWebModel': ['query_key_value'],
    'RefinedWeb': ['query_key_value'],
    'falcon': ['query_key_value'],
    'btlm': ['c_proj', 'c_attn'],
    'codegen': ['qkv_proj'],
    'mistral': ['q_proj', 'v_proj'],
    'mixtral': ['q_proj', 'v_proj'],
    'stablelm': ['q_proj', 'v_proj'],
    'phi': ['q_proj', 'v_proj', 'fc1', 'fc2'],
    'gemma': ['q_proj', 'v_proj'],
    'gemma2': ['q_proj', 'v_proj'],
    'gemma3_text': ['q_proj', 'v_proj'],
    'gemma4': r'.*language_model\..*\.(q_proj|v_proj)',  # a regex, as in HF PEFT (the vision tower's q/v stay out)
    'qwen2': ['q_proj', 'v_proj'],
    'qwen3': ['q_proj', 'v_proj'],
    'nemotron_h': ['q_proj', 'k_proj', 'v_proj', 'o_proj'],
    'rwkv': ['key', 'value', 'receptance', 'output'],
    'rwkv7': ['r_proj', 'k_proj', 'v_proj', 'o_proj', 'key', 'value'],
}
