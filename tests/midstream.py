"""A sender and a receiver program moving mail through a mailbox until the stream is
well under way, then the server killed (-9): what each said it did, for Jepsen's counts
(lost, duplicated, unexpected, recovered). Shared by the mail tests of each path
(test_mail.py: new/next/rm; test_mail_batch.py: batches; test_mail_stream.py: held
open)."""
import subprocess
import sys
import threading


def killed_mid_stream(mount, sender: str, receiver: str, box: str, sent: int,
                      acked: int, what: str) -> tuple[list[str], list[str]]:
    """Run the Python sources sender and receiver (argv[1]: the mailbox folder box), each
    printing a line per thing done (the receiver's acknowledgements start with "A "),
    until the sender said over `sent` lines and the receiver over `acked`
    acknowledgements; kill -9 the server; return the lines each said (each program stops
    at its first error: the server is gone)."""
    procs = [subprocess.Popen([sys.executable, "-c", src, box], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
             for src in (sender, receiver)]
    said: list[list[str]] = [[], []]  # their lines as they come

    def collect(i):
        for line in procs[i].stdout:
            said[i].append(line)
    readers = [threading.Thread(target=collect, args=(i,), daemon=True) for i in (0, 1)]
    for t in readers:
        t.start()
    try:
        mount.wait_for(lambda: len(said[0]) > sent and
                       sum(line.startswith("A ") for line in said[1]) > acked, what=what)
        mount.kill9()
        for p in procs:
            p.wait(timeout=30)
        for t in readers:
            t.join(timeout=30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return said[0], said[1]
