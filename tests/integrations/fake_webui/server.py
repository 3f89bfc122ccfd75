# The start-up order of the webui's server.py: arguments, then the --model load, then extensions.
import json
import sys

from modules import shared

import modules.extensions as extensions_module
from modules.models import load_model
from modules import loaders, text_generation

if __name__ == "__main__":
    shared.settings['exl3_triton-draft_mode'] = 'ngram'  # as if saved in settings.yaml
    if shared.args.model is not None:
        shared.model_name = shared.args.model
        shared.model, shared.tokenizer = load_model(shared.model_name)

    extensions_module.load_extensions()

    state = {'temperature': 0.0, 'top_k': 0, 'top_p': 1.0, 'min_p': 0.0, 'repetition_penalty': 1.0,
             'presence_penalty': 0.0, 'frequency_penalty': 0.0, 'add_bos_token': True,
             'truncation_length': shared.settings['truncation_length'], 'max_new_tokens': 4,
             'auto_max_new_tokens': False, 'ban_eos_token': True, 'seed': 1, 'stream': True,
             'custom_stopping_strings': []}
    reply = ''
    if shared.model is not None:
        for reply in text_generation.generate_reply('Hello', state):
            pass
    ext = extensions_module.state.get('exl3_triton')
    print(json.dumps({
        'loader': shared.args.loader,
        'loader_is_native_name': shared.args.loader in ('llama.cpp', 'ExLlamav3'),
        'model_class': type(shared.model).__name__,
        'truncation_length': shared.settings['truncation_length'],
        'reply': reply,
        'dropdown': list(loaders.loaders_and_params.keys()),
        'extensions': shared.args.extensions,
        'extension_draft_mode': ext[2].params['draft_mode'] if ext else None,
    }))
    sys.exit(0)
