import json
import re
from pathlib import Path

import modules.shared as shared


def get_model_metadata(model):
    path = Path(shared.args.model_dir) / model
    hf_quant_method = None
    if (path / 'config.json').exists():
        cfg = json.loads((path / 'config.json').read_text())
        hf_quant_method = (cfg.get('quantization_config') or {}).get('quant_method')
    model_settings = {}
    model_settings['loader'] = infer_loader(model, model_settings, hf_quant_method=hf_quant_method)
    return model_settings


def infer_loader(model_name, model_settings, hf_quant_method=None):
    path_to_model = Path(shared.args.model_dir) / model_name
    if not path_to_model.exists():
        loader = None
    elif hf_quant_method == 'exl3':
        loader = 'ExLlamav3'
    elif re.match(r'.*exl3', model_name.lower()):
        loader = 'ExLlamav3'
    else:
        loader = 'Transformers'

    return loader
