#!/bin/sh
# make's environment step: create the virtual environment VENV for the checkout in the
# current folder and install the project into it, but never install into a venv that this
# checkout did not make (another checkout's, or one of the user's own).
#
#   tools/venv.sh VENV PYTHON 'TORCH WHEELS' STAMP
#
# A venv is this checkout's when VENV/.aoq-checkout names it (written when the venv is
# made here) or when the venv lies inside the checkout (.venv, made before that file
# existed). Another venv is used as it is when it already has this checkout's package
# installed (`pip install -e <checkout>`); otherwise the step stops with an error.
set -eu
venv=$1 python=$2 torch=$3 stamp=$4
here=$(pwd -P)
marker=$venv/.aoq-checkout
if [ -x "$venv/bin/python" ]; then
    owner=$(cat "$marker" 2>/dev/null || true)
    case "$(cd "$venv" && pwd -P)/" in
        "$here"/*) owner=$here ;;
    esac
    if [ "$owner" != "$here" ]; then
        installed=$(cd / && "$venv/bin/python" -I -c 'import os, stages
print(os.path.dirname(os.path.realpath(stages.__file__)))' 2>/dev/null || true)
        if [ "$installed" = "$here/stages" ]; then
            echo "using VENV=$venv as it is: it has this checkout's package installed" \
                 "(make installs only into a venv it made)"
            exit 0
        fi
        echo "error: VENV=$venv was not made by this checkout ($here): its" \
             "$marker names ${owner:-no checkout}, and make installs only into a venv" \
             "it made. Give VENV a path that does not exist yet (make creates it), or" \
             "install this checkout into that venv yourself" \
             "($venv/bin/pip install -e '$here[test]'; make then uses it as it is)." >&2
        exit 1
    fi
else
    "$python" -m venv "$venv"
fi
echo "$here" > "$marker"
"$venv/bin/pip" install --quiet $torch
"$venv/bin/pip" install --quiet -e ".[test]"
touch "$stamp"
