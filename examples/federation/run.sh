#!/bin/sh
# Three independent fs9 systems cooperating through a federation over NATS JetStream:
# a customer reports that the CSV export corrupts files. The Support OS triages it and
# hands the bug, redacted, to the Coding OS; Coding fixes it (reporting progress) and
# tells the Knowledge OS, which updates the known-issues docs; Support, told by its case
# mailbox, notifies the customer and closes the case. Coding also announces the release
# on its exported topic `releases`, which Support subscribed to (event-driven). Each OS
# is its own mount, log and agents; they share only the NATS server (127.0.0.1, a free
# port, every write fsynced).
# Offline, with exec agents. Everything happens in a fresh temp dir; nothing is kept.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=${FS9:+$(dirname "$FS9")}
BIN=${BIN:-$HERE/../../.venv/bin}
FS9=$BIN/fs9
NATS=${NATS_SERVER:-$BIN/nats-server}
[ -x "$NATS" ] || { echo "no nats-server at $NATS: make deps installs the pinned one"; exit 1; }
WORK=$(mktemp -d /tmp/fs9-federation.XXXXXX)
chmod 755 "$WORK"  # agents' uids walk through it
PORT=$("$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL=nats://127.0.0.1:$PORT
OSES="support coding knowledge"
# each member signs in with its own nkey, and may publish only as itself
"$FS9" federation-keys "$WORK/keys" $OSES >/dev/null
printf 'listen: "127.0.0.1:%s"\njetstream {\n  store_dir: "%s/nats"\n  sync_interval: always\n}\n' \
    "$PORT" "$WORK" > "$WORK/nats.conf"
cat "$WORK/keys/auth.conf" >> "$WORK/nats.conf"
"$NATS" -c "$WORK/nats.conf" > "$WORK/nats.log" 2>&1 &
NATS_PID=$!
cleanup() {
    for os in $OSES; do "$FS9" umount "$WORK/$os/mnt" >/dev/null 2>&1 || true; done
    kill "$NATS_PID" 2>/dev/null || true
    wait "$NATS_PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
why() {  # what each OS says went wrong
    for os in $OSES; do
        [ -e "$WORK/$os/mnt/federation/status" ] || continue
        echo "$os: $(grep -E 'last_error|outbox|rejected' "$WORK/$os/mnt/federation/status" | tr '\n' ' ')"
        for a in "$WORK/$os/mnt/agents"/*; do sed "s|^|$os/$(basename "$a"): |" "$a/err"; done
    done
}
wait_for() {  # wait_for WHAT COMMAND...: poll for 60 s
    what=$1; shift; i=0
    until "$@" >/dev/null 2>&1; do
        i=$((i + 1)); [ $i -lt 600 ] || { echo "timed out waiting for $what"; why; exit 1; }
        sleep 0.1
    done
}
wait_for "nats-server" grep -q "Server is ready" "$WORK/nats.log"

for os in $OSES; do
    mkdir -p "$WORK/$os/state"
    cp -r "$HERE/$os/agents" "$WORK/$os/agents"
    chmod -R a+rX "$WORK/$os"
    "$FS9" mount "$WORK/$os/mnt" --agents "$WORK/$os/agents" --state "$WORK/$os/state" \
        --background >/dev/null
    for a in "$WORK/$os/agents"/*; do echo "spawn $(basename "$a")" > "$WORK/$os/mnt/ctl"; done
    echo "join $URL AS $os key=$WORK/keys/$os.nk" > "$WORK/$os/mnt/federation/ctl"
    for peer in $OSES; do
        [ "$peer" = "$os" ] || echo "peer $peer ceiling=internal auth=delegated" \
            > "$WORK/$os/mnt/federation/ctl"
    done
done
S=$WORK/support/mnt C=$WORK/coding/mnt K=$WORK/knowledge/mnt
for os in $OSES; do wait_for "$os connected" grep -q connection=connected "$WORK/$os/mnt/federation/status"; done
echo "--- three members joined: $(sed -n 's/^peers=//p' "$S/federation/status") are Support's peers"
# event-driven: Coding offers its topic `releases`; Support subscribes (its `news` agent
# gets each event as mail). Coding's fixer publishes there, naming no one.
echo "export releases" > "$C/federation/ctl"
echo "subscribe coding releases" > "$S/federation/ctl"
wait_for "Support subscribed to releases@coding" grep -q 'releases@coding state=active' "$S/federation/topics"

echo "--- a customer's report reaches Support (confidential: it names the customer)"
printf 'type: work_request\nclassification: confidential\ncorrelation-id: case-4521\n\nFrom jane.doe@example.com (+44 20 7946 0958): the CSV export corrupts my files.\n' \
    > "$S/agents/triage/mail/new"
has_result() { grep -l '^type: result' "$S"/agents/cases/mail/[0-9]* ; }
wait_for "the fix reported to Support's case" has_result
wait_for "the known-issues docs updated" grep -qx 'done=1' "$K/agents/docs/status"
wait_for "the docs' answer back on Coding" sh -c "ls '$C/agents/fixer/mail' | grep -q '^[0-9]'"

echo "--- what crossed to Coding (the request fixer@coding got):"
cat "$C"/agents/fixer/tasks/*/input
echo "--- Support's case mailbox (status updates, then the result):"
for m in "$S"/agents/cases/mail/[0-9]*; do
    printf '%s from %s: %s\n' "$(sed -n 's/^type: //p' "$m")" "$(sed -n 's/^from: //p' "$m")" \
        "$(sed '1,/^$/d' "$m")"
done
echo "--- Support's record of the request: $(cat "$S/federation/requests/case-4521" | cut -d' ' -f1,3,4)"
echo "--- the Knowledge OS: $(cat "$K"/agents/docs/tasks/*/out)"
wait_for "Coding's release event on Support" sh -c "ls '$S/agents/news/mail' | grep -q '^[0-9]'"
echo "--- Coding's release, on its topic releases, heard by Support's news agent: $(sed '1,/^$/d' "$S"/agents/news/mail/[0-9]*)"
echo "--- Support notifies the customer and closes the case:"
echo "Dear customer, the CSV export is fixed in release 1.2.3. Case case-4521 closed."
for m in "$S"/agents/cases/mail/[0-9]*; do rm "$m"; done
echo "--- the case in each OS's own log (log/trace/case-4521, its own entries):"
for os in $OSES; do
    printf '%s:' "$os"
    grep "\"member\":\"$os\"" "$WORK/$os/mnt/log/trace/case-4521" |
        sed -n 's/.*"kind":"\([a-z_]*\)".*/\1/p' | uniq | tr '\n' ' '
    echo
done
# each OS's part goes to the OS that asked it, Knowledge's on through Coding
wait_for "Knowledge's part on Support" grep -q '"member":"knowledge"' "$S/log/trace/case-4521"
echo "--- the whole case on Support (log/trace/case-4521), entries by OS:$(for os in $OSES; do
    printf ' %s=%s' "$os" "$(grep -c "\"member\":\"$os\"" "$S/log/trace/case-4521")"; done)"
echo "--- the declassification, logged on Support: $(grep -c '"kind":"declassified"' "$S/log/trace/case-4521")"
