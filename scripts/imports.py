#!/usr/bin/env python3
"""Who imports whom inside src/: import circles and imports that run back up the floors.

Usage: python3 scripts/imports.py [--edges]

A module is a file (src/a/b.rs or src/a/b/mod.rs is `a::b`); a file of tests (declared
`#[cfg(test)] mod name;`) is left out. An edge A -> B is any `crate::B...` or `super::...` path
in A outside its `#[cfg(test)]` module. Circles are the
strongly connected components of the file graph with more than one file. Floors are listed in
FLOORS below, lowest first: an import from a module to one on a higher floor "runs back up".
"""

import os
import re
import sys

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")

# Lowest floor first; a module's floor is that of its longest listed prefix.
FLOORS = [
    ["error", "bytes", "tier"],
    ["quant", "storage"],
    ["model"],
    ["layout", "batch", "sampling", "schedule", "policy"],
    ["device"],
    ["gpu"],
    ["arch"],
    ["reference", "scorer"],
    ["plan"],
    ["exec"],
    ["calibrate"],
    ["engine"],
    ["job"],
    ["score", "generation"],
    ["cli"],
]


def module_files():
    mods = {}
    for root, _, files in os.walk(SRC):
        for f in files:
            if not f.endswith(".rs"):
                continue
            path = os.path.join(root, f)
            rel = os.path.relpath(path, SRC)[:-3].split(os.sep)
            if rel[-1] == "mod":
                rel = rel[:-1]
            if rel == ["lib"] or rel[0] == "bin":
                continue
            mods["::".join(rel)] = path
    return mods


def code_outside_tests(text):
    """The file's text up to its `#[cfg(test)] mod tests` (tests may import anything)."""
    m = re.search(r"#\[cfg\(test\)\]\s*(pub(\(crate\))?\s+)?mod\s+\w+\s*\{", text)
    text = text[: m.start()] if m else text
    # drop line comments and doc comments
    return re.sub(r"//[^\n]*", "", text)


def paths_in(text):
    """Every `crate::a::b` or `super::a` path, with `use crate::{a::b, c}` groups expanded."""
    out = []
    for m in re.finditer(r"\b(crate|super)((?:::\w+)*)(::\{)?", text):
        head = m.group(1)
        prefix = [p for p in m.group(2).split("::") if p]
        if m.group(3):
            # expand one level of braces (nested braces keep their first segment)
            depth, i = 1, m.end()
            while depth and i < len(text):
                depth += {"{": 1, "}": -1}.get(text[i], 0)
                i += 1
            inner = text[m.end() : i - 1]
            parts, depth, cur = [], 0, ""
            for ch in inner:
                if ch == "," and depth == 0:
                    parts.append(cur)
                    cur = ""
                    continue
                depth += {"{": 1, "}": -1}.get(ch, 0)
                cur += ch
            parts.append(cur)
            for p in parts:
                segs = [s for s in re.split(r"::|\{", p.strip()) if s and re.match(r"^\w+$", s)]
                out.append((head, prefix + segs))
        else:
            out.append((head, prefix))
    return out


def resolve(mods, me, head, segs):
    if head == "super":
        # `super` from a/b.rs and from a/b/mod.rs (both module a::b) is `a`
        segs = me.split("::")[:-1] + segs
    best = None
    for n in range(len(segs), 0, -1):
        cand = "::".join(segs[:n])
        if cand in mods:
            best = cand
            break
    return best


def floor_of(mod):
    best, best_len = None, -1
    for i, names in enumerate(FLOORS):
        for n in names:
            if (mod == n or mod.startswith(n + "::")) and len(n) > best_len:
                best, best_len = i, len(n)
    return best


def sccs(graph):
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [c for c in out if len(c) > 1]


def test_modules(mods):
    """Modules declared `#[cfg(test)] mod name;` in their parent: tests, which may import anything."""
    out = set()
    for me, path in mods.items():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for m in re.finditer(r"#\[cfg\(test\)\]\s*(?:pub(?:\(crate\))?\s+)?mod\s+(\w+)\s*;", text):
            out.add(f"{me}::{m.group(1)}")
    return out


def main():
    mods = module_files()
    for t in test_modules(mods):
        mods.pop(t, None)
    graph = {}
    for me, path in sorted(mods.items()):
        with open(path, encoding="utf-8") as f:
            text = code_outside_tests(f.read())
        deps = set()
        for head, segs in paths_in(text):
            target = resolve(mods, me, head, segs)
            if target and target != me and not me.startswith(target + "::"):
                # a child naming its parent module's items counts; a parent's `mod child` does not
                deps.add(target)
        graph[me] = deps
    if "--edges" in sys.argv:
        for me in sorted(graph):
            print(me, "->", ", ".join(sorted(graph[me])))
    circles = sccs(graph)
    print(f"{len(mods)} modules")
    print(f"{len(circles)} import circles")
    for c in circles:
        print("  circle:", " <-> ".join(c))
    up = []
    for me, deps in sorted(graph.items()):
        fm = floor_of(me)
        for d in sorted(deps):
            fd = floor_of(d)
            if fm is None or fd is None:
                print(f"  (no floor listed for {me if fm is None else d})")
                continue
            if fd > fm:
                up.append((me, d))
    print(f"{len(up)} imports that run back up")
    for a, b in up:
        print(f"  up: {a} -> {b}")
    unplaced = sorted(m for m in mods if floor_of(m) is None)
    if unplaced:
        print("modules on no floor:", ", ".join(unplaced))
    return 0


if __name__ == "__main__":
    sys.exit(main())
