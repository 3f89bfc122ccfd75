import functools
from collections import OrderedDict

loaders_and_params = OrderedDict({
    'Transformers': ['gpu_split', 'cpu_memory', 'compute_dtype'],
    'ExLlamav3': ['ctx_size', 'cache_type', 'gpu_split', 'model_draft', 'draft_max',
                  'speculative_decoding_accordion', 'enable_tp', 'tp_backend'],
})

loaders_samplers = {
    'Transformers': {'temperature', 'top_p', 'top_k', 'typical_p', 'seed'},
    'ExLlamav3': {'temperature', 'min_p', 'top_p', 'top_k', 'adaptive_target', 'adaptive_decay', 'repetition_penalty',
                  'frequency_penalty', 'presence_penalty', 'repetition_penalty_range', 'temperature_last',
                  'sampler_priority', 'auto_max_new_tokens', 'ban_eos_token', 'add_bos_token', 'seed',
                  'skip_special_tokens'},
}


@functools.cache
def list_all_samplers():
    all_samplers = set()
    for k in loaders_samplers:
        for sampler in loaders_samplers[k]:
            all_samplers.add(sampler)

    return sorted(all_samplers)


@functools.cache
def get_all_params():
    all_params = set()
    for k in loaders_and_params:
        for el in loaders_and_params[k]:
            all_params.add(el)

    return sorted(all_params)


@functools.cache
def list_model_elements():
    return ['filter_by_loader', 'loader', 'ctx_size', 'cache_type', 'gpu_split', 'enable_tp', 'tp_backend',
            'model_draft', 'draft_max', 'cpu_memory', 'compute_dtype']
