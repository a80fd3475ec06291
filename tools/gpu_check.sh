#!/usr/bin/env bash
# make gpu-check: run tools/gpu_check.py from a tree whose folder need not be named masklab, on a
# machine with no network. A temporary folder holds a symlink masklab -> this tree and the wheels
# carried in .whl/ (make gpu-wheels), installed with --no-deps; both go first on PYTHONPATH.
# Usage: tools/gpu_check.sh [--device cuda|cpu] [--out DIR] (OUT in the environment sets the folder).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
ln -s "$root" "$tmp/masklab"
# Only where they are missing: a machine that has them (this project's venv) keeps its own.
if ! "$python" -c "import kornia, omegaconf, torchdata" 2>/dev/null && compgen -G "$root/.whl/*.whl" >/dev/null; then
	"$python" -m pip install -q --no-deps --no-index --target "$tmp/site" "$root"/.whl/*.whl
fi
export PYTHONPATH="$tmp:$tmp/site${PYTHONPATH:+:$PYTHONPATH}"
"$python" -c "import masklab, omegaconf, kornia, torchdata" || {
	echo "gpu-check: masklab or a dependency does not import; run make gpu-wheels where there is a network" >&2
	exit 2
}
cd "$root"
exec "$python" tools/gpu_check.py "$@"
