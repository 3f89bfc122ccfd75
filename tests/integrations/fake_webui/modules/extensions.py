import importlib.util
import sys

import modules.shared as shared

state = {}


def apply_settings(extension, name):
    if not hasattr(extension, 'params'):
        return

    for param in extension.params:
        _id = f"{name}-{param}"
        if _id in shared.settings:
            extension.params[param] = shared.settings[_id]


def load_extensions():
    for i, name in enumerate(shared.args.extensions or []):
        user_script_path = shared.user_data_dir / 'extensions' / name / 'script.py'
        spec = importlib.util.spec_from_file_location(f"user_ext_{name}", str(user_script_path))
        extension = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = extension
        spec.loader.exec_module(extension)
        apply_settings(extension, name)
        if hasattr(extension, "setup"):
            extension.setup()
        state[name] = [True, i, extension]
