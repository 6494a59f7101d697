#!/bin/sh
# The task input is the text. Pass it on as a work_request that keeps our correlation id.
text=$(cat)
echo "intake: received $(printf '%s' "$text" | wc -c | tr -d ' ') bytes" > "$FS9_MNT/topics/pipeline"
printf 'type: work_request\ncorrelation-id: %s\n\n%s\n' "$FS9_CORR" "$text" > "$FS9_OUTBOX/tally"
echo "handed to tally"
