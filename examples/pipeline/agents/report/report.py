"""Input: `words=N` then the text. Output: a one-line report, also published."""
import os
import sys

first, _, text = sys.stdin.read().partition("\n")
words = int(first.removeprefix("words="))
longest = max(text.split(), key=len, default="")
line = f"report: {words} words, longest '{longest}'"
with open(os.path.join(os.environ["FS9_MNT"], "topics", "pipeline"), "w") as topic:
    topic.write(line + "\n")
print(line)
