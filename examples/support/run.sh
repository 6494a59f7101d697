#!/bin/sh
# The customer-support scenario, end to end: support triages a bug report and hands it to
# the coder, who fixes vault/code/search.py and asks the knowledge agent to update
# vault/docs; the coder hands the case back and support closes it. Offline with the
# scripted model; `./run.sh MODELS.TOML` uses a real model named `support` from that file
# (docs/namespace.md, "Models"), `./run.sh --model NAME MODELS.TOML` its model NAME (`make
# example MODEL=local`: the local model of `make model`). Everything happens in a fresh
# temp dir; nothing is kept.
set -eu
MODEL=support
if [ "${1:-}" = "--model" ]; then MODEL=$2; shift 2; fi
HERE=$(cd "$(dirname "$0")" && pwd)
FS9=${FS9:-$HERE/../../.venv/bin/fs9}
WORK=$(mktemp -d /tmp/fs9-support.XXXXXX)
chmod 755 "$WORK"  # agents' uids walk through it
cp -r "$HERE/vault" "$HERE/agents" "$WORK/"
chmod -R a+rX "$WORK/vault" "$WORK/agents"
mkdir -p "$WORK/state"
WAIT=600  # tenths of a second for the result: a real model writes slower
if [ $# -gt 0 ]; then  # its [models.MODEL] as the agents' model, `support`
    grep -q "^\[models\.$MODEL\]" "$1" || { echo "no [models.$MODEL] in $1 (make model?)"; exit 1; }
    sed "s/^\[models\.$MODEL\]/[models.support]/" "$1" > "$WORK/state/models.toml"
    WAIT=3000
else
    printf '[models.support]\nprovider = "scripted"\nscript = "%s"\n' "$HERE/script.toml" \
        > "$WORK/state/models.toml"
fi
MNT=$WORK/mnt
"$FS9" mount "$MNT" --agents "$WORK/agents" --vault "$WORK/vault" --state "$WORK/state" \
    --background >/dev/null
trap '"$FS9" umount "$MNT" >/dev/null 2>&1; rm -rf "$WORK"' EXIT
cd "$MNT"
grep '^label=' models/support/info
for a in support coder knowledge; do echo "spawn $a" > ctl; done

echo "--- the operator sends a bug report to support"
printf 'type: work_request\n\nCustomer report: search crashes when the query is empty.\n' \
    > agents/support/mail/new
i=0
until ls mail | grep -q '^[0-9]'; do  # the result comes back to the operator's mailbox
    i=$((i + 1)); [ $i -lt $WAIT ] || { echo "no result after $((WAIT / 10)) s"; exit 1; }; sleep 0.1
done
# Support closes the case while the knowledge agent may still be writing the docs the coder
# asked for: show the case finished, every task of it ended (nothing queued or running).
i=0
until grep -q ' queued=0 running=0 ' ctl; do
    i=$((i + 1)); [ $i -lt $WAIT ] || { echo "tasks still running after $((WAIT / 10)) s"; exit 1; }; sleep 0.1
done
result=$(ls mail | grep '^[0-9]' | head -1)
corr=$(sed -n 's/^correlation-id: //p' "mail/$result")
echo "--- the answer support sent back (mail/$result):"
sed '1,/^$/d' "mail/$result"
echo "--- the chain, from log/trace/$corr:"
sed -n 's/.*"kind":"\(mail_sent\|task_done\|model_call\)","agent":"\([^"]*\)".*"type":"\([a-z_]*\)".*/\1 \2 \3/p; s/.*"kind":"\(task_done\|model_call\)","agent":"\([^"]*\)".*/\1 \2/p' "log/trace/$corr" | uniq -c
echo "--- vault/code/search.py, as the coder left it:"
cat vault/code/search.py
echo "--- vault/docs/search.md, as the knowledge agent left it:"
cat vault/docs/search.md
echo "--- model use:"
cat models/usage
