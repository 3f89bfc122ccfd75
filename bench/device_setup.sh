#!/usr/bin/env bash
# Make exl3_triton importable on a bare GPU machine without pip or network:
# assemble the package from the repository folders in /tmp/site (symlinks),
# mirroring pyproject's package-dir mapping. Use: source bench/device_setup.sh
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SITE=/tmp/exl3_site
rm -rf "$SITE" && mkdir -p "$SITE/exl3_triton"
for f in "$REPO"/plugin/*; do ln -s "$f" "$SITE/exl3_triton/"; done
for sub in arch kernels ui; do ln -s "$REPO/$sub" "$SITE/exl3_triton/$sub"; done
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import exl3_triton, torch, triton; print('exl3_triton', exl3_triton.__version__, 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
# pytest from the wheels carried in .whl/ when the machine has none (bare GPU machines have no network)
if ! python3 -m pytest --version >/dev/null 2>&1 && ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/pyt "$REPO"/.whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/pyt"
fi
