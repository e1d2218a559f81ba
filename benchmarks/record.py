"""Run a benchmark or example and keep the tables it prints for the docs.

    python benchmarks/record.py NAME -- python examples/mnist1d_sam.py [ARGS]

runs the command from the repository's root (its output shows as it runs)
and writes docs/results/NAME.md: a line naming the command, the date, the
machine and the commit, then every table the command printed, each with the
paragraph printed just before it (its caption), and whatever the command
printed after its last table. The documentation pages include these files
(`--8<-- "docs/results/NAME.md"`), so every figure in the docs is one that a
command printed; rerun this to bring a page up to date.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
MARKER = "<!-- Written by benchmarks/record.py: rerun the command to update. -->"


def escape_norms(line: str) -> str:
    """A table row with `||x||` (a norm, printed as such) escaped, so that
    Markdown does not read its bars as cell borders: a border has a space,
    a dash or the line's end on both sides."""
    if not line.startswith("|"):
        return line
    out = []
    for i, char in enumerate(line):
        before = line[i - 1] if i else " "
        after = line[i + 1] if i + 1 < len(line) else " "
        border = before in " -" and after in " -"
        out.append("\\|" if char == "|" and not border else char)
    return "".join(out)


def report(stdout: str) -> str:
    """The tables of `stdout`, their captions and the lines after the last."""
    lines = [escape_norms(line.rstrip()) for line in stdout.splitlines()]
    tables = [i for i, line in enumerate(lines) if line.startswith("|")]
    if not tables:
        raise SystemExit("record.py: the command printed no table")
    keep = set(tables)
    for i in tables:
        if i - 1 in keep:
            continue
        j = i - 1
        while j >= 0 and not lines[j]:   # at most the blank lines before
            j -= 1
        while j >= 0 and lines[j] and not lines[j].startswith("|"):
            keep.add(j)                  # the caption paragraph
            j -= 1
    keep.update(range(tables[-1] + 1, len(lines)))
    out, previous = [], None
    for i in sorted(keep):
        gap = previous is not None and i != previous + 1
        starts_table = lines[i].startswith("|") and (
            previous is None or not lines[previous].startswith("|"))
        if out and out[-1] and (gap or starts_table):
            out.append("")            # Markdown wants a table set apart
        out.append(lines[i])
        previous = i
    return "\n".join(out).strip() + "\n"


def commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
    sha = git("rev-parse", "--short", "HEAD") or "unknown"
    return sha + ("+changes" if git("status", "--porcelain", "--",
                                    "keras_sam", "benchmarks", "examples")
                  else "")


def header(command: list[str]) -> str:
    from keras_sam import __version__
    shown = " ".join(shlex.quote(a) for a in command)
    if command[0] in (sys.executable, "python3"):
        shown = "python " + shown.split(" ", 1)[1]
    machine = f"{platform.system()}, {os.cpu_count()} CPU cores"
    return (f"{MARKER}\n\nPrinted by `{shown}` on "
            f"{datetime.date.today().isoformat()} ({machine}; keras-sam "
            f"{__version__}, commit {commit()}):\n")


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name", help="writes docs/results/NAME.md")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="-- then the command, e.g. python examples/x.py")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    if command[0] == "python":
        command[0] = sys.executable
    run = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                           text=True)
    printed = []
    for line in run.stdout:
        sys.stdout.write(line)
        printed.append(line)
    if run.wait():
        raise SystemExit(f"record.py: the command failed ({run.returncode});"
                         " nothing written")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{args.name}.md"
    path.write_text(header(command) + "\n" + report("".join(printed)))
    print(f"\nwritten: {path.relative_to(ROOT)}", file=sys.stderr)
    return path


if __name__ == "__main__":
    main()
