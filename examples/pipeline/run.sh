#!/bin/sh
# Three agents in three languages (sh, Perl, Python) pass work along by mail and
# report on the topic `pipeline`. One command: sh examples/pipeline/run.sh [TEXT]
# It mounts fs9 in a temporary directory, runs the pipeline, prints what the topic
# saw and the trace of the work, and unmounts.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
fs9=${FS9:-$here/../../.venv/bin/fs9}
text=${1:-the quick brown fox jumps over the lazy dog}
tmp=$(mktemp -d)
chmod 711 "$tmp"                            # confined agents (their own uids) walk to the mount
mnt=$tmp/mnt
"$fs9" mount "$mnt" --agents "$here/agents" --state "$tmp/state" --vault "$tmp/vault" --background >/dev/null
trap '"$fs9" umount "$mnt" >/dev/null; rm -rf "$tmp"' EXIT
cd "$mnt"
for a in intake tally report; do echo "spawn $a" > ctl; done
touch topics/pipeline
cat topics/pipeline > "$tmp/topic" &
reader=$!
i=0                                         # the subscription starts at open: wait for it
until ls -l /proc/$reader/fd 2>/dev/null | grep -q ' -> .*/topics/pipeline$'; do
    i=$((i + 1)); [ $i -lt 600 ] || { echo "the topic was not opened after 60 s" >&2; exit 1; }
    sleep 0.1
done
echo "run $text" > agents/intake/ctl
i=0
until grep -q '^report:' "$tmp/topic" 2>/dev/null; do
    i=$((i + 1)); [ $i -lt 600 ] || { echo "no report after 60 s" >&2; exit 1; }
    sleep 0.1
done
kill $reader
i=0                                         # report publishes before its task ends
until grep -q ' queued=0 running=0 ' ctl; do
    i=$((i + 1)); [ $i -lt 600 ] || { echo "tasks still running after 60 s" >&2; exit 1; }
    sleep 0.1
done
cat "$tmp/topic"
corr=$(grep '^corr=' agents/intake/tasks/*/status | cut -d= -f2)
echo "trace: $(cut -d, -f3,4 "log/trace/$corr" | sed 's/"kind"://; s/"agent"://; s/"//g' | tr '\n' ' ')"
