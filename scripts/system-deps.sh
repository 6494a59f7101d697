#!/bin/sh
# Install the system packages fs9 needs, when absent: through apt as root,
# otherwise name them and stop. stress-ng is only for the test suite.
set -e
need=""
command -v fusermount3 >/dev/null 2>&1 || need="$need fuse3"
pkg-config --exists fuse3 2>/dev/null || need="$need libfuse3-dev"
command -v pkg-config >/dev/null 2>&1 || need="$need pkg-config"
ldconfig -p 2>/dev/null | grep -q 'libseccomp\.so\.2' || need="$need libseccomp2"
[ "$1" = "--test" ] && { command -v stress-ng >/dev/null 2>&1 || need="$need stress-ng"; }
[ "$1" = "--test" ] && { command -v gio >/dev/null 2>&1 || need="$need libglib2.0-bin"; [ -e /usr/share/mime/mime.cache ] || need="$need shared-mime-info"; }  # tests/test_gio.py
# tests/test_nonblock.py: a Node.js program reads a stream in its event loop
[ "$1" = "--test" ] && { command -v node >/dev/null 2>&1 || need="$need nodejs"; }
# the escape suite compiles a C program that makes raw syscalls
[ "$1" = "--test" ] && { command -v gcc >/dev/null 2>&1 || need="$need gcc libc6-dev"; }
# tests/test_beneath.py traces fs9's own syscalls; tests/test_top.py drives fs9 top in a terminal
[ "$1" = "--test" ] && { command -v strace >/dev/null 2>&1 || need="$need strace"; }
[ "$1" = "--test" ] && { command -v tmux >/dev/null 2>&1 || need="$need tmux"; }
# scripts/model.sh builds llama-cpp-python's server from source (C++, CMake)
[ "$1" = "--model" ] && { command -v g++ >/dev/null 2>&1 || need="$need g++"; command -v cmake >/dev/null 2>&1 || need="$need cmake"; }
# bench/bus.py measures mail beside a local redis-server (bench/peers.py)
[ "$1" = "--bench" ] && { command -v redis-server >/dev/null 2>&1 || need="$need redis-server"; }
python3 -c 'import ensurepip, venv' 2>/dev/null || need="$need python3-venv"
[ -z "$need" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "fs9: installing system packages:$need"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
else
    echo "fs9: missing system packages:$need" >&2
    echo "fs9: install them first, e.g.: sudo apt-get install$need" >&2
    exit 1
fi
