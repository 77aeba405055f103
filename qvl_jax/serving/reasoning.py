"""Splitting a Thinking checkpoint's answer into its reasoning and its content, incrementally.

Qwen3's Thinking chat templates write `<think>\\n` at the end of the generation prompt, so the answer
starts inside the reasoning and closes it with `</think>`; a hybrid checkpoint may open `<think>`
itself at the start of the answer. What lies between the tags is `reasoning_content`; what follows
`</think>` (its leading newlines dropped) is `content`. Text arrives in chunks split anywhere: a
chunk ending in part of a tag holds that part back until the next chunk decides it, so the deltas
of a stream always join to the split of the whole text. Host only (no JAX).
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag (text may go on into it)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningSplitter:
    """feed(text) -> (reasoning delta, content delta); finish() flushes what was held back.

    started: the prompt already opened `<think>` (the template did), so the answer begins inside
    the reasoning."""

    def __init__(self, started: bool = False):
        self.state = "reasoning" if started else "start"
        self.buf = ""

    def feed(self, text: str) -> tuple[str, str]:
        self.buf += text
        reasoning, content = [], []
        while self.buf:
            if self.state == "start":  # may the answer open <think> itself?
                if OPEN.startswith(self.buf):
                    break  # too short to tell yet
                if self.buf.startswith(OPEN):
                    self.buf, self.state = self.buf[len(OPEN):], "reasoning"
                else:
                    self.state = "content"
            elif self.state == "reasoning":
                at = self.buf.find(CLOSE)
                if at >= 0:
                    reasoning.append(self.buf[:at])
                    self.buf, self.state = self.buf[at + len(CLOSE):], "after"
                    continue
                keep = _partial_suffix(self.buf, CLOSE)
                reasoning.append(self.buf[:len(self.buf) - keep])
                self.buf = self.buf[len(self.buf) - keep:]
                break
            elif self.state == "after":  # the newlines between </think> and the content
                rest = self.buf.lstrip("\n")
                if not rest:
                    self.buf = ""
                    break
                self.buf, self.state = rest, "content"
            else:
                content.append(self.buf)
                self.buf = ""
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """What is held back at the end: an unfinished tag's start is text of the part it is in."""
        buf, self.buf = self.buf, ""
        if self.state == "reasoning":
            return buf, ""
        if self.state == "after":
            return "", ""
        return "", buf


def split(text: str, started: bool = False) -> tuple[str, str]:
    """(reasoning, content) of a whole answer."""
    s = ReasoningSplitter(started)
    r1, c1 = s.feed(text)
    r2, c2 = s.finish()
    return r1 + r2, c1 + c2
