#!/usr/bin/env bash
# Separate virtual environment for the TRL side of the KD-step benchmark (benchmarks/trl_gkd_step.py).
#
# TRL is never a dependency of autoglm_distill: it lives only in .venv-trl (git-ignored), next to, not inside,
# the project's .venv. Both environments use the same torch and transformers, so the comparison measures the
# training step and not a library version difference.
#
#     bash benchmarks/trl_env.sh            # creates/updates /work/main/.venv-trl; a no-op when already done
#     .venv-trl/bin/python benchmarks/trl_gkd_step.py --help
#
# Pins:
#   torch==2.13.0        resolves to the local CPU build (2.13.0+cpu in the pip find-links); never leave it
#                        unpinned: a bare "torch" pulls the CUDA wheels (gigabytes).
#   transformers==5.23.0 the project's version.
#   trl==1.16.0          the newest release; its GKDTrainer (trl.experimental.gkd, no longer exported from trl
#                        itself) trains on transformers 5.23 (checked with benchmarks/trl_gkd_step.py). It knows the
#                        transformers 5.19+ Trainer API (loss_is_scaled_for_ga) and needs Python >= 3.11.
#   accelerate, datasets the versions TRL resolves to here, pinned so that reruns give the same environment.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TRL_VENV:-$ROOT/.venv-trl}"
PYTHON="${PYTHON:-python3.11}"

PINS=(
    "torch==2.13.0"
    "transformers==5.23.0"
    "trl==1.16.0"
    "accelerate==1.15.0"
    "datasets==5.2.0"
)

# Exit 0 when every pin is installed at its version (a local label such as +cpu is accepted, as pip does).
pins_satisfied() {
    [[ -x "$VENV/bin/python" ]] || return 1
    "$VENV/bin/python" - "${PINS[@]}" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import PackageNotFoundError, version

for pin in sys.argv[1:]:
    name, wanted = pin.split("==")
    try:
        installed = version(name).split("+")[0]
    except PackageNotFoundError:
        sys.exit(1)
    if installed != wanted:
        sys.exit(1)
EOF
}

if pins_satisfied; then
    echo "$VENV: already set up (${PINS[*]})."
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "Creating $VENV with $("$PYTHON" --version)."
    "$PYTHON" -m venv "$VENV"
fi

"$VENV/bin/python" -m pip install --upgrade-strategy only-if-needed "${PINS[@]}"

if ! pins_satisfied; then
    echo "error: $VENV does not hold the pinned versions after pip install:" >&2
    "$VENV/bin/python" -m pip list 2>/dev/null | grep -iE '^(torch|transformers|trl|accelerate|datasets) ' >&2
    exit 1
fi
# The benchmark is CPU-only: refuse an environment where pip picked a CUDA torch after all.
"$VENV/bin/python" -c "import torch; assert torch.version.cuda is None, torch.__version__"
echo "$VENV ready: $("$VENV/bin/python" -c 'import torch, transformers, trl; print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")')"
