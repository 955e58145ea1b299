#!/usr/bin/env bash
# Fails when nbdev_export, nbdev_clean or the README generator would change a file: notebooks are the source.
set -euo pipefail
snap() {
  find nbs spectraldiffusion README.md -type f \( -name '*.ipynb' -o -name '*.py' -o -name '*.md' \) \
       -not -path '*/.ipynb_checkpoints/*' -not -path '*/__pycache__/*' -print0 | sort -z | xargs -0 md5sum
}
before=$(snap)
nbdev_export
nbdev_clean
python tools/make_readme.py
after=$(snap)
if ! diff <(echo "$before") <(echo "$after"); then
  echo "sync check FAILED: nbdev_export / nbdev_clean / tools/make_readme.py changed the files listed above." >&2
  echo "Run them locally and commit the result." >&2
  exit 1
fi
echo "sync check: notebooks, package and README agree"
