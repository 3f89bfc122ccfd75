import argparse
import copy
import threading
from pathlib import Path

model = None
tokenizer = None
model_name = 'None'
is_multimodal = False
stop_everything = False
generation_lock = threading.Lock()
settings = {'truncation_length': 2048, 'default_extensions': []}

parser = argparse.ArgumentParser()
parser.add_argument('--model', type=str)
parser.add_argument('--model-dir', type=str, default='user_data/models')
parser.add_argument('--loader', type=str)
parser.add_argument('--ctx-size', type=int, default=0)
parser.add_argument('--cache-type', type=str, default='fp16')
parser.add_argument('--gpu-split', type=str)
parser.add_argument('--model-draft', type=str, default=None)
parser.add_argument('--draft-max', type=int, default=4)
parser.add_argument('--enable-tp', action='store_true')
parser.add_argument('--extensions', type=str, nargs='+')
parser.add_argument('--user-data-dir', type=str, default='user_data')
args = parser.parse_args()
user_data_dir = Path(args.user_data_dir)
original_args = copy.deepcopy(args)


def fix_loader_name(name):
    if not name:
        return name

    name = name.lower()
    if name in ['llama.cpp', 'llamacpp', 'llama-cpp', 'llama cpp']:
        return 'llama.cpp'
    elif name in ['transformers', 'huggingface', 'hf', 'hugging_face', 'hugging face']:
        return 'Transformers'
    elif name in ['exllamav3']:
        return 'ExLlamav3'


args.loader = fix_loader_name(args.loader)
