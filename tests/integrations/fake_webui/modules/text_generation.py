import copy

import modules.shared as shared


def generate_reply(question, state, stopping_strings=None, is_chat=False):
    if shared.model.__class__.__name__ in ['LlamaServer', 'Exllamav3Model', 'TensorRTLLMModel']:
        generate_func = generate_reply_custom
    else:
        raise RuntimeError('generate_reply_HF: needs a transformers model')

    all_stop_strings = list(stopping_strings or []) + list(state.get('custom_stopping_strings') or [])
    reply = ''
    for reply in generate_func(question, question, state, stopping_strings, is_chat=is_chat):
        reply, stop_found = apply_stopping_strings(reply, all_stop_strings)
        yield reply
        stop_event = state.get('stop_event')
        if stop_found or shared.stop_everything or (stop_event and stop_event.is_set()):
            break


def apply_stopping_strings(reply, all_stop_strings):
    stop_found = False
    for string in all_stop_strings:
        idx = reply.find(string)
        if idx != -1:
            reply = reply[:idx]
            stop_found = True
            break
    return reply, stop_found


def generate_reply_custom(question, original_question, state, stopping_strings=None, is_chat=False):
    stop_event_ref = state.pop('stop_event', None)
    state = copy.deepcopy(state)
    if stop_event_ref is not None:
        state['stop_event'] = stop_event_ref
    reply = ''
    if not is_chat:
        yield ''

    if not state['stream']:
        reply = shared.model.generate(question, state)
        yield reply
    else:
        for reply in shared.model.generate_with_streaming(question, state):
            yield reply


def encode(prompt, add_special_tokens=True, add_bos_token=True, truncation_length=None):
    if shared.model.__class__.__name__ in ['Exllamav3Model', 'TensorRTLLMModel']:
        input_ids = shared.tokenizer.encode(str(prompt))
    else:
        input_ids = shared.tokenizer.encode(str(prompt), return_tensors='pt', add_special_tokens=add_special_tokens)

    if truncation_length is not None:
        input_ids = input_ids[:, -truncation_length:]

    return input_ids


def decode(output_ids, skip_special_tokens=True):
    return shared.tokenizer.decode(output_ids, skip_special_tokens=skip_special_tokens)


def get_max_prompt_length(state):
    return state['truncation_length'] - state['max_new_tokens']
