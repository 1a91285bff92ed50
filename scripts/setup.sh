#!/usr/bin/env bash
# Create .venv (if missing) and install dsearch into it: torch's CPU build first, then the project.
#
#   bash scripts/setup.sh [--dry-run] [EXTRAS]      e.g. bash scripts/setup.sh "[test]"
#
# Environment:
#   PYTHON               the Python 3.11+ that creates .venv [default: python3]
#   DSEARCH_TORCH        the torch build: cpu [default], or a PyTorch CUDA/ROCm variant such as cu128
#   DSEARCH_TORCH_INDEX  where that build is published [default: https://download.pytorch.org/whl/$DSEARCH_TORCH]
#
# Why: on Linux, `pip install torch==X` from the public index alone gives the CUDA build plus a dozen nvidia-*
# packages and triton (several GB) that dsearch never uses. PyTorch publishes CPU-only wheels (versions with a
# `+cpu` suffix) on its own index, so we ask for exactly that build. A torch 2.13 already in .venv (a GPU build
# you installed yourself, say) is kept unless DSEARCH_TORCH asks for another build.
set -euo pipefail

TORCH_VERSION=2.13.0
VENV=.venv
DRY_RUN=0

say() { echo "setup.sh: $*" >&2; }

# Commands that change something go through `run`, so that --dry-run can print them instead.
run() {
    if [[ $DRY_RUN == 1 ]]; then
        echo "+ $*"
    else
        "$@"
    fi
}

# pip inside .venv (a function, so tests can stand in for it).
venv_pip() { run "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }

# pip with its output kept in a log (shown only if every attempt fails); under --dry-run, the command itself.
pip_logged() {
    local log="$1"
    shift
    if [[ $DRY_RUN == 1 ]]; then
        venv_pip "$@"
    else
        venv_pip "$@" >>"$log" 2>&1
    fi
}

# The torch requirement for a build: Linux wheels carry the variant in their version (2.13.0+cpu); macOS has
# only CPU builds, published without a suffix.
torch_requirement() {
    local variant="$1" system="${2:-$(uname -s)}"
    if [[ $system == Linux ]]; then
        echo "torch==${TORCH_VERSION}+${variant}"
    else
        echo "torch==${TORCH_VERSION}"
    fi
}

# The torch version installed in .venv, or nothing (reads package metadata: does not import torch).
installed_torch() {
    [[ -x $VENV/bin/python ]] || return 0
    "$VENV/bin/python" -c 'import importlib.metadata as m
try:
    print(m.version("torch"))
except m.PackageNotFoundError:
    pass'
}

# Install the chosen torch build. First from the build's own index, with a short timeout and no retries so that
# an unreachable index costs seconds, not minutes (pip's own configuration — find-links, extra indexes — still
# applies, which is how a machine with a local wheel gets it); then from pip's configuration alone (a mirror
# that carries the build). Never falls back to another build: that would be the multi-GB CUDA one.
install_torch() {
    local variant="${DSEARCH_TORCH:-cpu}"
    local index="${DSEARCH_TORCH_INDEX:-https://download.pytorch.org/whl/$variant}"
    local requirement have log
    requirement="$(torch_requirement "$variant")"
    have="$(installed_torch)"
    # Keep the build asked for, or without DSEARCH_TORCH any 2.13 build (one you installed yourself, say).
    if [[ "torch==$have" == "$requirement" || (-z ${DSEARCH_TORCH:-} && $have == "$TORCH_VERSION"*) ]]; then
        say "keeping torch $have, already in $VENV"
        return 0
    fi
    log="$(mktemp)"
    say "installing $requirement from $index"
    if pip_logged "$log" install --quiet --timeout 15 --retries 0 --index-url "$index" "$requirement"; then
        rm -f "$log"
        return 0
    fi
    say "$index did not give $requirement; trying pip's configured indexes"
    if pip_logged "$log" install --quiet "$requirement"; then
        rm -f "$log"
        return 0
    fi
    tail -n 5 "$log" >&2
    rm -f "$log"
    say "error: could not install $requirement: $index could not be reached or lacks it, and so do pip's" \
        "configured indexes. Set DSEARCH_TORCH_INDEX to a mirror that has it, or install the torch $TORCH_VERSION" \
        "you want into $VENV yourself (for example $VENV/bin/pip install torch==$TORCH_VERSION, which is the CUDA" \
        "build on Linux, several GB) and run this script again."
    return 1
}

# .venv needs Python 3.11 or newer; say so before pip fails with a resolver message.
check_python() {
    local python="$1" version
    if ! version="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)"; then
        say "error: $python not found; install Python 3.11 or newer, or set PYTHON to one"
        return 1
    fi
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        say "error: dsearch needs Python 3.11 or newer, and $python is $version; set PYTHON to a newer one"
        return 1
    fi
}

main() {
    if [[ ${1:-} == --dry-run ]]; then
        DRY_RUN=1
        shift
    fi
    local extras="${1:-}" python="${PYTHON:-python3}"
    cd "$(dirname "${BASH_SOURCE[0]}")/.."
    check_python "$python"
    [[ -x $VENV/bin/python ]] || run "$python" -m venv "$VENV"
    install_torch
    # pip's output goes to a log, shown if it fails: warnings about a machine's own pip configuration are noise.
    local log
    log="$(mktemp)"
    say "installing dsearch${extras} and its dependencies into $VENV"
    if ! pip_logged "$log" install --quiet -e ".${extras}"; then
        tail -n 20 "$log" >&2
        rm -f "$log"
        say "error: pip could not install dsearch (its last lines are above)"
        return 1
    fi
    rm -f "$log"
}

# Sourced (by the tests) it only defines the functions above.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    main "$@"
fi
