"""Repeated blocks of code: places where the same run of six or more lines appears twice.

    python -m tools.repeats                 # every repeated block in llmcore/ stages/ tools/ benchmarks/
    python -m tools.repeats stages          # only pairs whose both sides are under stages/

How it counts: each file's lines are stripped of surrounding whitespace; blank lines and lines that are only a
comment are dropped (they are not code). Every window of ``MIN_LINES`` consecutive remaining lines is hashed; two
places whose windows match are grown to the longest common run, and each maximal run is one "pair" (file A at
line a, file B at line b, n lines). A run repeated three times counts as three pairs. Lines that would match
anywhere by themselves (``)``, ``else:``, ``try:``, a lone decorator) still count inside a run: a run of six is
six lines of code in the same order.
"""

from __future__ import annotations

import argparse
import hashlib
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIN_LINES = 6
FOLDERS = ("llmcore", "stages", "tools", "benchmarks")


def code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of every line that is code (not blank, not only a comment)."""
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = line.strip()
        if text and not text.startswith("#"):
            out.append((n, text))
    return out


def repeated_blocks(files: list[Path], min_lines: int = MIN_LINES) -> list[tuple[Path, int, Path, int, int]]:
    """Maximal repeated runs: (file a, first line a, file b, first line b, code lines), a before b."""
    lines = {f: code_lines(f) for f in files}
    windows: dict[str, list[tuple[Path, int]]] = defaultdict(list)
    for f, ls in lines.items():
        for i in range(len(ls) - min_lines + 1):
            key = hashlib.sha1("\n".join(t for _, t in ls[i : i + min_lines]).encode()).hexdigest()
            windows[key].append((f, i))
    seen: set[tuple[Path, int, Path, int]] = set()
    blocks = []
    for places in windows.values():
        for x in range(len(places)):
            for y in range(x + 1, len(places)):
                (fa, ia), (fb, ib) = places[x], places[y]
                if fa == fb and abs(ia - ib) < min_lines:
                    continue  # a run overlapping itself (a repeated line pattern), not a copy
                # walk back to the start of the run, then forward to its end
                while ia > 0 and ib > 0 and lines[fa][ia - 1][1] == lines[fb][ib - 1][1] and (fa != fb or ia - 1 != ib):
                    ia, ib = ia - 1, ib - 1
                if (fa, ia, fb, ib) in seen:
                    continue
                seen.add((fa, ia, fb, ib))
                n = 0
                while (
                    ia + n < len(lines[fa]) and ib + n < len(lines[fb]) and lines[fa][ia + n][1] == lines[fb][ib + n][1]
                ):
                    n += 1
                blocks.append((fa, lines[fa][ia][0], fb, lines[fb][ib][0], n))
    return sorted(blocks, key=lambda b: (str(b[0]), b[1], str(b[2]), b[3]))


def python_files(folders: tuple[str, ...] = FOLDERS, root: Path = ROOT) -> list[Path]:
    return sorted(p for d in folders for p in (root / d).rglob("*.py") if "__pycache__" not in p.parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.repeats", description=__doc__.split("\n")[0])
    parser.add_argument("only", nargs="?", help="count only pairs whose both files are under this folder")
    args = parser.parse_args(argv)
    blocks = repeated_blocks(python_files())
    if args.only:
        blocks = [b for b in blocks if all(p.relative_to(ROOT).parts[0] == args.only for p in (b[0], b[2]))]
    for fa, la, fb, lb, n in blocks:
        print(f"{fa.relative_to(ROOT)}:{la}  {fb.relative_to(ROOT)}:{lb}  {n} lines")
    print(f"{len(blocks)} repeated block(s) of {MIN_LINES}+ code lines")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
