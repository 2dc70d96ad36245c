"""The README's commands run as shown, and the docs' links lead somewhere.

Every `python -m X` / `torchrun ... -m X` in a fenced bash block of README.md must name a
module that parses `--help` (exit 0), every `bash Y.sh` a script that exists and `bash -n`
parses; every relative link in README.md, docs/ and bench/results/ must point to an existing
file (and heading, when it names one). The --help calls share one subprocess: importing
torch once costs seconds, once per module it would cost a minute.
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import unicodedata
from functools import lru_cache
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.M | re.S)
OPERATORS = {"&&", "||", ";", "|", "&"}


def bash_blocks(text: str) -> list[str]:
    """The bodies of the ```bash / ```sh fenced blocks of a markdown text."""
    return [body for lang, body in FENCE.findall(text) if lang in ("bash", "sh", "shell")]


def simple_commands(block: str) -> list[list[str]]:
    """A shell block -> its simple commands as word lists (comments, continuation lines,
    `&&` / `;` / `|` chains and leading VAR=value assignments handled)."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        command: list[str] = []
        for word in [*lexer, ";"]:
            if word not in OPERATORS:
                command.append(word)
                continue
            while command and re.fullmatch(r"[A-Za-z_]\w*=.*", command[0]):
                command.pop(0)
            if command:
                commands.append(command)
            command = []
    return commands


def readme_targets() -> tuple[list[str], list[str]]:
    """(modules run with `python -m` or `torchrun -m`, scripts run with `bash`) in the README."""
    modules, scripts = [], []
    for block in bash_blocks(README.read_text()):
        for cmd in simple_commands(block):
            if cmd[0] in ("python", "python3", "torchrun") and "-m" in cmd[:-1]:
                modules.append(cmd[cmd.index("-m") + 1])
            elif cmd[0] == "bash" and len(cmd) > 1 and cmd[1].endswith(".sh"):
                scripts.append(cmd[1])
    return sorted(set(modules)), sorted(set(scripts))


MODULES, SCRIPTS = readme_targets()

# Runs each module as `python -m M --help` would, in one process; prints
# {module: exit code, or "missing", or the exception} as JSON on its last line.
HELP_RUNNER = r"""
import contextlib, importlib.util, io, json, runpy, sys
results = {}
for name in sys.argv[1:]:
    try:
        if importlib.util.find_spec(name) is None:
            results[name] = "missing"
            continue
    except ModuleNotFoundError:
        results[name] = "missing"
        continue
    sys.argv = [name, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            runpy.run_module(name, run_name="__main__", alter_sys=True)
        results[name] = "returned without exiting: --help was not parsed"
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        results[name] = 0 if code == 0 else f"exit {code}: {out.getvalue()[-400:]}"
    except BaseException as e:
        results[name] = f"{type(e).__name__}: {e}"
print(json.dumps(results))
"""


@lru_cache(maxsize=1)
def help_results() -> dict:
    proc = subprocess.run([sys.executable, "-c", HELP_RUNNER, *MODULES], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def is_repo_module(name: str) -> bool:
    top = name.split(".")[0]
    return (ROOT / top).is_dir() or (ROOT / f"{top}.py").is_file()


def test_readme_commands_were_found():
    # Guards the parser: the README's own core commands must be among what it found.
    assert {"tti.train", "tti.export", "tti.evaluate"} <= set(MODULES), MODULES
    assert "scripts/test.sh" in SCRIPTS and "scripts/quickstart.sh" in SCRIPTS, SCRIPTS


@pytest.mark.parametrize("module", MODULES)
def test_python_m_target_parses_help(module):
    result = help_results()[module]
    if result == "missing" and not is_repo_module(module):
        pytest.skip(f"{module} is not installed in this environment (an external tool)")
    assert result == 0, f"`python -m {module} --help` in README.md: {result}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_target_exists_and_parses(script):
    path = ROOT / script
    assert path.is_file(), f"README.md runs `bash {script}`, which does not exist"
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, f"bash -n {script}: {proc.stderr}"


def test_readme_shows_the_ci_test_command():
    # CI runs the README's test command: what .ci/run runs must be shown as is.
    ci = [c for c in simple_commands((ROOT / ".ci" / "run").read_text()) if c[0] == "bash"]
    shown = [c for block in bash_blocks(README.read_text()) for c in simple_commands(block)]
    assert ci and all(c in shown for c in ci), ci


# ---------------------------------------------------------------- links

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# A reference definition is the whole line: [label]: destination "optional title"
REF_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*$", re.M)
HTML_LINK = re.compile(r"\b(?:src|href)=\"([^\"]+)\"")


def markdown_files() -> list[Path]:
    docs = sorted((ROOT / "docs").rglob("*.md")) + sorted((ROOT / "bench" / "results").glob("*.md"))
    return [README, *docs]


def strip_code(text: str) -> str:
    """Markdown without fenced blocks and inline code spans (links there are not links)."""
    text = FENCE.sub("", text)
    return re.sub(r"(`+)(?:(?!\1).)+?\1", "", text, flags=re.S)


def heading_slugs(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a markdown file."""
    slugs, seen = set(), {}
    for title in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", FENCE.sub("", path.read_text()), re.M):
        text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", title).strip().lower()
        slug = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
        slug = slug.replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        slugs.add(slug if n == 0 else f"{slug}-{n}")
    return slugs


def relative_links(path: Path) -> list[str]:
    text = strip_code(path.read_text())
    targets = LINK.findall(text) + REF_LINK.findall(text) + HTML_LINK.findall(text)
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.I)]


@pytest.mark.parametrize("md", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(md):
    broken = []
    for target in relative_links(md):
        file_part, _, anchor = unquote(target).partition("#")
        dest = (md.parent / file_part).resolve() if file_part else md
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor.lower() not in heading_slugs(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert not broken, f"{md.relative_to(ROOT)}: broken links: {broken}"


def test_link_check_sees_links():
    # Guards the link pattern: the README's picture and a docs page link must be found.
    links = relative_links(README)
    assert "images/shapes32_grid.png" in links and "docs/config.md" in links, links
