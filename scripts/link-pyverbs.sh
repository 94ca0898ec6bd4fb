#!/usr/bin/env bash
# Make Debian's pyverbs (package python3-pyverbs, built for the system interpreter)
# importable from a virtual environment, without exposing the rest of the system's
# Python packages to it: a symbolic link to the one package in the venv's site-packages.
#
#   scripts/link-pyverbs.sh /opt/wqs          # the venv install.sh made
#   scripts/link-pyverbs.sh .venv
#
# The venv's Python must be the same minor version as the system's (the extension
# modules are built for it); the script checks that the import works.
set -euo pipefail
venv=${1:?usage: link-pyverbs.sh VENV}
src=$(/usr/bin/python3 -c 'import os, pyverbs; print(os.path.dirname(pyverbs.__file__))' \
      2>/dev/null) || { echo "link-pyverbs.sh: pyverbs is not installed for /usr/bin/python3" \
                             "(apt install python3-pyverbs)" >&2; exit 1; }
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ln -sfn "$src" "$site/pyverbs"
"$venv/bin/python" -c 'import pyverbs.device' || {
    rm -f "$site/pyverbs"
    echo "link-pyverbs.sh: $venv's Python cannot load the system's pyverbs" \
         "($("$venv/bin/python" -V) vs $(/usr/bin/python3 -V)); use a venv made by" \
         "/usr/bin/python3 -m venv" >&2
    exit 1
}
echo "link-pyverbs.sh: pyverbs from $src is importable in $venv"
