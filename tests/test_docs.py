"""The documentation: every Python block runs, the site builds strictly, and
every table of figures is one that a command in the repository printed.

Blocks run page by page, in order, in one fresh Python process per page
(what a reader pasting them one after the other gets), in a scratch
directory. What a page says a line prints is checked: a `print(...)` with a
trailing comment must write it as `# => TEXT`, and the line must print TEXT
(`...` in TEXT matches anything). A block may be preceded by a marker line:

    <!-- skip: needs a GPU | a cluster | a download (...) -->   not run
    <!-- session: NAME=VALUE ... -->   this block and the rest of the page
                                       run in a new process with this
                                       environment (e.g. KERAS_BACKEND=jax)
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import installed

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RESULTS = DOCS / "results"
PAGES = sorted(p for p in DOCS.rglob("*.md") if RESULTS not in p.parents)
SOURCES = [ROOT / "README.md", *PAGES]
MARKER = re.compile(r"<!--\s*(skip|session):\s*(.*?)\s*-->")
SKIP_REASONS = ("GPU", "cluster", "download")

pytestmark = pytest.mark.tensorflow_only


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def blocks(path: Path) -> list[dict]:
    """The page's ```python blocks: code, first line, marker."""
    lines = path.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            end = lines.index("```", start)
            marker = MARKER.fullmatch(lines[i - 1].strip()) if i else None
            found.append({"code": "\n".join(lines[start:end]),
                          "line": start + 1,
                          "kind": marker.group(1) if marker else None,
                          "arg": marker.group(2) if marker else None})
            i = end
        i += 1
    return found


def sessions(path: Path) -> list[tuple[dict, list[dict]]]:
    """(environment, blocks) per process, skipped blocks left out."""
    out = [({}, [])]
    for block in blocks(path):
        if block["kind"] == "skip":
            continue
        if block["kind"] == "session":
            env = dict(item.split("=", 1) for item in block["arg"].split())
            out.append((env, []))
        out[-1][1].append(block)
    return [(env, code) for env, code in out if code]


# `print(ARGS)  # => TEXT` on one line of a block.
CLAIM = re.compile(r"^(?P<indent>\s*)print\((?P<args>.*)\)\s*#\s*=>\s*"
                   r"(?P<text>.*?)\s*$")
COMMENTED_PRINT = re.compile(r"^\s*print\(.*\)\s*#")


def checked(code: str, where: str) -> str:
    """The block with each `print(ARGS)  # => TEXT` line made a check that
    ARGS print TEXT."""
    lines = []
    for n, line in enumerate(code.splitlines()):
        claim = CLAIM.match(line)
        if claim:
            line = (f"{claim['indent']}__expect__("
                    f"{claim['text']!r}, {where!r} + ':{n}', "
                    f"{claim['args']})")
        lines.append(line)
    return "\n".join(lines)


RUNNER = """
import io, json, re, sys

def __expect__(text, where, *args, **kwargs):
    out = io.StringIO()
    print(*args, file=out, **kwargs)
    printed = out.getvalue().rstrip("\\n")
    print(printed, flush=True)
    pattern = ".*".join(re.escape(part) for part in text.split("..."))
    if not re.fullmatch(pattern, printed, re.S):
        raise AssertionError(
            f"{where}: the page says this line prints {text!r}; it printed "
            f"{printed!r}")

namespace = {"__name__": "__main__", "__expect__": __expect__}
for block in json.load(open(sys.argv[1])):
    print(f"--- {block['where']}", flush=True)
    exec(compile(block["code"], block["where"], "exec"), namespace)
"""


@pytest.mark.parametrize("page", [_name(p) for p in SOURCES
                                  if any(b["kind"] != "skip"
                                         for b in blocks(p))])
def test_every_python_block_of_the_page_runs(page, tmp_path):
    path = ROOT / page
    missing = []
    for n, (extra_env, code) in enumerate(sessions(path)):
        backend = extra_env.get("KERAS_BACKEND", "tensorflow")
        if not installed(backend):
            missing.append(f"session {n} needs {backend}")
            continue
        script = tmp_path / f"blocks{n}.json"
        script.write_text(json.dumps(
            [{"code": checked(b["code"], f"{page}:{b['line']}"),
              "where": f"{page}:{b['line']}"}
             for b in code]))
        env = {**os.environ, "KERAS_BACKEND": "tensorflow",
               "TF_CPP_MIN_LOG_LEVEL": "3", "MPLBACKEND": "Agg",
               **extra_env}
        run = subprocess.run([sys.executable, "-c", RUNNER, str(script)],
                             cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=900)
        assert run.returncode == 0, (
            f"{page}, session {n} ({extra_env}):\n{run.stdout[-2000:]}\n"
            f"{run.stderr[-4000:]}")
    if missing:
        pytest.skip(f"the other sessions passed; not installed: "
                    f"{', '.join(missing)}")


def test_what_a_page_says_a_line_prints_is_checked():
    """A comment after a `print` is a claim about its output: written as
    `# => TEXT`, which the block runner checks (a skipped block's too,
    as far as the form goes)."""
    loose = [f"{_name(path)}:{block['line'] + n}: {line.strip()}"
             for path in SOURCES for block in blocks(path)
             for n, line in enumerate(block["code"].splitlines())
             if COMMENTED_PRINT.match(line) and not CLAIM.match(line)]
    assert not loose, (
        "a print's comment must say what it prints, as `# => TEXT`:\n"
        + "\n".join(loose))
    claims = sum(bool(CLAIM.match(line)) for path in SOURCES
                 for block in blocks(path)
                 for line in block["code"].splitlines())
    assert claims >= 5


def test_a_block_that_needs_an_environment_says_so_on_the_page():
    """A session marker's variables (KERAS_BACKEND=jax, XLA_FLAGS=...) are
    in an HTML comment the reader does not see: the page's text must show
    each of them too."""
    for path in SOURCES:
        text = path.read_text()
        visible = re.sub(r"<!--.*?-->", "", text, flags=re.S)
        for block in blocks(path):
            if block["kind"] != "session":
                continue
            for item in block["arg"].split():
                name, value = item.split("=", 1)
                assert (item in visible or f'os.environ["{name}"] = '
                        f'"{value}"' in visible), (
                    f"{_name(path)}:{block['line']}: the block runs with "
                    f"{item}, which the page's text does not show")


def test_checked_lines_compare_what_they_print():
    """The check itself: a matching line passes, a wrong claim fails with
    both texts, `...` matches anything."""
    code = checked("x = 3\nprint(x, 'a')   # => 3 a\nprint([x])  # => [...]",
                   "page.md:1")
    namespace = {}
    exec(compile(RUNNER.split("namespace =")[0], "runner", "exec"), namespace)
    exec(compile(code, "page.md", "exec"), dict(namespace))
    wrong = checked("print(1 + 1)   # => 3", "page.md:9")
    with pytest.raises(AssertionError, match=r"page.md:9:0: the page says "
                       r"this line prints '3'; it printed '2'"):
        exec(compile(wrong, "page.md", "exec"), dict(namespace))


def test_only_blocks_that_need_a_gpu_a_cluster_or_a_download_are_skipped():
    counted = {"run": 0, "skipped": 0}
    for path in SOURCES:
        for block in blocks(path):
            if block["kind"] == "skip":
                counted["skipped"] += 1
                assert any(r in block["arg"] for r in SKIP_REASONS), (
                    f"{_name(path)}:{block['line']}: a skipped block must "
                    f"say that it needs one of {SKIP_REASONS}")
            else:
                counted["run"] += 1
    assert counted["run"] >= 30 and counted["skipped"] <= 3, counted
    # A fence that is not exactly ```python would escape the runner.
    for path in SOURCES:
        text = path.read_text()
        assert not re.search(r"^```(py|python3|pycon)\s*$", text, re.M), path


def test_mkdocs_builds_strictly(tmp_path):
    """No broken link or anchor, every API name resolves, every included
    table exists (mkdocs.yml sets strict: true)."""
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
         str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
        timeout=600)
    assert run.returncode == 0, run.stderr[-5000:]
    api = (tmp_path / "site" / "api" / "sam-model" / "index.html").read_text()
    assert "sam_every" in api and "Raises" in api
    # Defaults as values, not the names of constants.
    assert "DEFAULT_RHO" not in api and "0.05" in api


# ------------------------------------------------------------------ tables

FIGURE = re.compile(r"^\s*[-+]?\d+\.\d+")


def tables(text: str) -> list[list[list[str]]]:
    found, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):   # cells split at unescaped bars
            cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
            current.append([c.strip() for c in cells])
        elif current:
            found.append(current)
            current = []
    return found


def test_figures_in_the_pages_come_from_recorded_command_output():
    """A table with a measured number in it lives in docs/results/ (written
    by benchmarks/record.py from a command's output), never in a page."""
    for path in SOURCES:
        for table in tables(path.read_text()):
            figures = [c for row in table[2:] for c in row if FIGURE.match(c)]
            assert not figures, (
                f"{_name(path)}: a table of figures ({figures[:3]}) written "
                "into the page; record it with benchmarks/record.py and "
                "include docs/results/NAME.md")


def test_every_recorded_table_names_its_command_and_is_shown():
    included = {m for path in SOURCES for m in re.findall(
        r'--8<-- "docs/results/([\w-]+)\.md"', path.read_text())}
    recorded = {p.stem for p in RESULTS.glob("*.md")}
    assert included <= recorded, included - recorded
    assert recorded <= included, f"not shown anywhere: {recorded - included}"
    listing = (DOCS / "benchmarks.md").read_text()
    for name in recorded:
        text = (RESULTS / f"{name}.md").read_text()
        command = re.search(r"Printed by `python ([^`]+)`", text)
        assert command, f"{name}.md does not name its command"
        script = ROOT / command.group(1).split()[0]
        assert script.exists(), f"{name}.md: no {script}"
        assert f"| `{name}` | `python {command.group(1).split()[0]}" in \
            listing, f"benchmarks.md does not list {name}"
        assert tables(text), f"{name}.md has no table"


def test_every_table_but_three_assembled_is_what_record_wrote():
    """benchmarks.md says so: each file is record.py's output as it was
    written, except the three it names, which say that they are assembled:
    the GPU tables (from several device calls; there is no GPU where the
    docs are built) and the Transformer study's (two tables side by side)."""
    record = _module("benchmarks/record.py")
    assembled = {"gpu_step_time_jax": "gpu_step_time.py",
                 "gpu_step_time_torch": "gpu_step_time.py",
                 "transformer_study": "transformer_case.py --study"}
    for path in RESULTS.glob("*.md"):
        first = path.read_text().splitlines()[0]
        if path.stem in assembled:
            assert first.startswith("<!-- Assembled from the output of "
                                    f"benchmarks/{assembled[path.stem]}"), \
                path.name
        else:
            assert first == record.MARKER, (
                f"{path.name} was not written by record.py: rerun "
                f"python benchmarks/record.py {path.stem} -- COMMAND")


def recorded_tables(name: str) -> list[list[list[str]]]:
    return tables((RESULTS / f"{name}.md").read_text())


def assert_same_columns_and_rows(printed: str, name: str):
    """The tables `printed` by a shortened run have the columns and the row
    labels of the recorded full run."""
    now, then = tables(printed), recorded_tables(name)
    assert [t[0] for t in now] == [t[0] for t in then], name
    assert [[r[0] for r in t[2:]] for t in now] == \
        [[r[0] for r in t[2:]] for t in then], name


def _module(relative: str):
    spec = importlib.util.spec_from_file_location(
        Path(relative).stem, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generalization_table_is_what_its_saved_results_print(capsys):
    """Figure for figure: the page's table is what `generalization.py
    --report` prints from benchmarks/results/generalization.json."""
    record = _module("benchmarks/record.py")
    generalization = _module("benchmarks/generalization.py")
    saved = json.loads((ROOT / "benchmarks" / "results" /
                        "generalization.json").read_text())
    generalization.report(saved["meta"], saved["results"])
    printed = record.report(capsys.readouterr().out)
    recorded = (RESULTS / "generalization.md").read_text()
    assert recorded.endswith(printed), "rerun: python benchmarks/record.py " \
        "generalization -- python benchmarks/generalization.py --report"


def test_record_keeps_tables_captions_and_what_follows():
    record = _module("benchmarks/record.py")
    out = record.report("Epoch 1/2\nprogress\n\ncaption one\n| a | b |\n"
                        "|---|---|\n| x | 1.0 |\nnoise\n\ncaption two\n\n"
                        "| c |\n|---|\n| 2.0 |\n\nfigures in docs\n")
    assert out == ("caption one\n\n| a | b |\n|---|---|\n| x | 1.0 |\n\n"
                   "caption two\n\n| c |\n|---|\n| 2.0 |\n\n"
                   "figures in docs\n")


# -------------------------------------------------------------- docstrings

def public_names():
    import keras_sam
    modules = [keras_sam] + [getattr(keras_sam, m) for m in (
        "analysis", "callbacks", "schedules", "selection", "variants")]
    for module in modules:
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                yield f"{module.__name__}.{name}", obj


@pytest.mark.parametrize("name,obj", list(public_names()),
                         ids=[n for n, _ in public_names()])
def test_public_docstrings_have_args_returns_raises_and_an_example(name, obj):
    doc = inspect.getdoc(obj) or ""
    function = obj.__init__ if inspect.isclass(obj) else obj
    if function is object.__init__:
        function = None
    params = [p for p in inspect.signature(function).parameters
              if p not in ("self", "args", "kwargs")] if function else []
    if params:
        assert "Args:" in doc, f"{name}: no Args section"
        for param in params:
            assert re.search(rf"^\s+{param}\b", doc, re.M), \
                f"{name}: argument {param!r} not documented"
    if inspect.isfunction(obj) and inspect.signature(obj).return_annotation \
            is not None:
        assert "Returns:" in doc, f"{name}: no Returns section"
    source = inspect.getsource(function) if function else ""
    if re.search(r"^\s+raise \w", source, re.M) or "validate" in source:
        assert "Raises:" in doc, f"{name}: raises, but no Raises section"
    assert "Example:" in doc, f"{name}: no Example section"
