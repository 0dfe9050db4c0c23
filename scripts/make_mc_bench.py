#!/usr/bin/env python3
"""Writes a multiple-choice scoring benchmark as lm-eval sends it: `questions` contexts of
`context_words` words from a text, each followed by 4 endings of `ending_words` words (the
true next words and three from elsewhere), one {"id", "context", "continuation"} record per
ending, a question's endings consecutive.

    python3 scripts/make_mc_bench.py TEXT OUT.jsonl [questions] [context_words] [ending_words]
"""
import json
import random
import re
import sys


def main():
    text, out = sys.argv[1], sys.argv[2]
    questions = int(sys.argv[3]) if len(sys.argv) > 3 else 64
    context_words = int(sys.argv[4]) if len(sys.argv) > 4 else 120
    ending_words = int(sys.argv[5]) if len(sys.argv) > 5 else 12
    words = open(text, encoding="utf-8").read().split()
    # the Britannica scan's clean part, without OCR debris
    words = words[len(words) // 20 : len(words) * 7 // 10]
    words = [w for w in words if re.fullmatch(r"[A-Za-z][A-Za-z,.;:'-]*", w)]
    rng = random.Random(7)
    span = context_words + ending_words
    with open(out, "w", encoding="utf-8") as f:
        for q in range(questions):
            at = (q + 1) * 997 * span % (len(words) - span)
            context = " ".join(words[at : at + context_words])
            endings = [words[at + context_words : at + span]]
            for _ in range(3):
                o = rng.randrange(len(words) - ending_words)
                endings.append(words[o : o + ending_words])
            for e, ending in enumerate(endings):
                record = {"id": f"q{q}-{e}", "context": context, "continuation": " " + " ".join(ending)}
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
