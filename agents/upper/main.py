import os
import sys

name, task = os.environ["FS9_AGENT"], os.environ["FS9_TASK"]
text = sys.stdin.read()
print(f"[{name} task {task}]", file=sys.stderr)
sys.stdout.write(text.upper())
