#!/bin/sh
# The README's 60-second walkthrough, runnable: sh examples/walkthrough.sh MOUNTPOINT
# (make run mounts fs9 at mountpoints/fs9 and spawns the example agents first).
set -e
cd "${1:-mountpoints/fs9}"
cat status                                    # one line per agent: name state pid restarts queued done failed
echo 'run hello fs9' > agents/upper/ctl       # give an agent work...
cat agents/upper/out                          # ...and read its result: HELLO FS9
echo 3 > agents/counter/in                    # a whole file written to `in` is one task
cat agents/counter/out                        # prints 1 2 3 as they come, ends when the task ends
ls agents/counter/tasks                       # every task keeps its input, out, err and status
echo 'frobnicate' > agents/upper/ctl || echo "refused, and the reason is in err:"
tail -n 1 agents/upper/err
printf 'type: work_request\n\nshout this\n' > agents/upper/mail/new   # a request by mail...
cat mail/next                                 # ...its result comes back to your mailbox
ls agents/upper/view/agents                   # upper's view: of agents/ it sees only itself
cat registry/by-capability/upper-casing       # who provides a capability: upper
id=$(cat models/scripted/clone)               # open a conversation with a model (offline:
echo 'hello model' > models/scripted/$id/request   # the scripted one, labelled as such)
cat models/scripted/$id/reply                 # its reply streams; tokens in models/usage
