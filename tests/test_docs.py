"""The pages stay true: every `difusion` command quoted in README.md and docs/**/*.md parses
against the CLI as it is (the subcommand and each option exist), the `--help` ones run, and
every picture and relative link they show exists (anchors checked against the headings)."""

from __future__ import annotations

import re
import shlex
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from difusion.cli import app

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^[ \t]*```(\w*)[^\n]*\n(.*?)^[ \t]*```", re.M | re.S)  # list items indent
INLINE = re.compile(r"`([^`]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\)")
IMG_SRC = re.compile(r"<img[^>]*\bsrc=\"([^\"]+)\"")
SHELL_BLOCKS = {"bash", "sh", "shell", "console", ""}  # "": a fence with no language
SEPARATORS = {"|", "||", "&&", ";", ">", ">>", "2>", "&"}
PREFIXES = {"$", "time", "sudo", "exec", "nohup"}  # `$` of a console prompt


@dataclass(frozen=True)
class Quoted:
    page: str
    text: str
    args: tuple[str, ...]  # what follows `difusion`
    whole: bool  # from a shell block (a whole command), not an inline mention


def _is_difusion(tokens: list[str], i: int) -> bool:
    """Does tokens[i] start a `difusion` invocation (`difusion`, `.venv/bin/difusion`, or
    `python -m difusion` / `torchrun ... -m difusion`)?"""
    token = tokens[i]
    if token == "difusion" or token.endswith("/bin/difusion"):
        j = i - 1
        while j >= 0 and (tokens[j] in PREFIXES or re.fullmatch(r"\w+=\S*", tokens[j])):
            j -= 1
        return j < 0 or tokens[j] in SEPARATORS or tokens[j] == "-m"
    return False


def commands_in(text: str, page: str, whole: bool) -> list[Quoted]:
    try:
        tokens = shlex.split(text, comments=whole)
    except ValueError:
        return []
    found = []
    for i in range(len(tokens)):
        if _is_difusion(tokens, i):
            args = []
            for token in tokens[i + 1 :]:
                if token in SEPARATORS:
                    break
                args.append(token)
            found.append(Quoted(page, text.strip(), tuple(args), whole))
    return found


def _outside_code(markdown: str) -> str:
    return FENCE.sub("", markdown)


def quoted_commands(path: Path) -> list[Quoted]:
    return quoted_commands_of(path.read_text(), path)


def quoted_commands_of(markdown: str, path: Path) -> list[Quoted]:
    page, found = str(path.relative_to(ROOT)), []
    for lang, body in FENCE.findall(markdown):
        if lang in SHELL_BLOCKS:
            for line in body.replace("\\\n", " ").splitlines():
                found += commands_in(line, page, whole=True)
    for span in INLINE.findall(_outside_code(markdown)):
        if "\n\n" not in span:
            found += commands_in(span.replace("\n", " "), page, whole=False)
    return found


CLI = typer.main.get_command(app)


def problems_of(command: Quoted) -> list[str]:
    """What in a quoted command the CLI would refuse before running it; [] when it parses.
    An all-capitals word stands for a value (`difusion COMMAND --help`, `-n N`), and `...`
    for the rest of the command."""
    args = list(command.args)
    if "..." in args:
        args = args[: args.index("...")]
    if not args or args[0].isupper():
        return []
    if args[0].startswith("-"):  # options of `difusion` itself
        return [f"difusion has no option {a}" for a in args if a not in ("--help",)]
    name, *args = args
    sub = CLI.commands.get(name)
    if sub is None:
        return [f"no command {name!r}"]
    while hasattr(sub, "commands"):  # a group (`difusion lora merge`): its command
        if not args or args[0] not in sub.commands:
            return [] if not args or args[0] == "--help" else [f"{name} has no command {args[0]}"]
        name, sub, args = f"{name} {args[0]}", sub.commands[args[0]], args[1:]
    params = sub.get_params(sub.context_class(sub))  # typer's own click: duck-typed
    options = {
        o: p for p in params if p.param_type_name == "option" for o in p.opts + p.secondary_opts
    }
    arguments = [p for p in params if p.param_type_name == "argument"]
    slots = [p.nargs for p in arguments]
    problems, positional, i = [], 0, 0
    while i < len(args):
        token, i = args[i], i + 1
        if token.startswith("-") and len(token) > 1 and not re.fullmatch(r"-[\d.]+", token):
            option = options.get(token.split("=", 1)[0])
            if option is None:
                problems.append(f"{name} has no option {token.split('=', 1)[0]}")
                if i < len(args) and not args[i].startswith("-"):
                    i += 1  # its value, most likely
            elif not (option.is_flag or option.count) and "=" not in token:
                i += max(option.nargs, 1)  # its value(s)
                if i > len(args) and command.whole:  # inline, `--sampler` names the option
                    problems.append(f"{token} needs a value")
        else:
            positional += 1
    if -1 not in slots and positional > sum(slots):
        problems.append(f"{name} takes {sum(slots)} arguments, got {positional}")
    required = [p for p in arguments if p.required]
    if (
        command.whole
        and "--help" not in args
        and "..." not in command.args
        and positional < len(required)
    ):
        problems.append(f"{name} needs {', '.join(p.name.upper() for p in required)}")
    return problems


ALL_COMMANDS = [c for page in PAGES for c in quoted_commands(page)]


def test_the_pages_quote_commands():
    pages = {c.page for c in ALL_COMMANDS}
    assert "README.md" in pages and len(pages) >= 4
    assert {c.args[0] for c in ALL_COMMANDS if c.args} >= {"train", "sample", "generate", "serve"}


def test_the_checker_refuses_what_the_cli_refuses():
    def check(text: str) -> list[str]:
        return problems_of(commands_in(text, "-", whole=True)[0])

    assert check("difusion train --data digits --out runs/a --flip --steps 10") == []
    assert check(".venv/bin/difusion sample runs/a -n 4 -o grid.png") == []
    assert check("torchrun --nproc_per_node 4 -m difusion train --no-such 3 --steps 3") == [
        "train has no option --no-such"
    ]
    assert check("difusion trian --steps 3") == ["no command 'trian'"]
    assert check("difusion --help") == [] and check("difusion --hlep") != []
    assert check("$ difusion sample runs/a --gif") == ["--gif needs a value"]
    indented = "- Train:\n\n  ```bash\n  difusion train --no-such\n  ```\n"
    page = ROOT / "README.md"
    assert [c.args for c in quoted_commands_of(indented, page)] == [("train", "--no-such")]
    assert check("OMP_NUM_THREADS=1 difusion eval runs/a --alignment ...") == []
    assert check("difusion sample runs/a 36") == ["sample takes 1 arguments, got 2"]
    assert check("difusion generate --steps 4") == ["generate needs PROMPTS"]
    assert check("difusion train --out") == ["--out needs a value"]
    assert commands_in("cd difusion && make test", "-", whole=True) == []


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=lambda c: f"{c.page}: {' '.join(c.args)}")
def test_quoted_command_parses(command: Quoted):
    assert problems_of(command) == [], command.text


def test_quoted_help_commands_run():
    runner = CliRunner()
    helps = {c.args for c in ALL_COMMANDS if "--help" in c.args and not c.args[0].isupper()}
    assert helps, "the pages quote no `difusion ... --help`"
    for args in sorted(helps):
        result = runner.invoke(app, list(args))
        assert result.exit_code == 0, (args, result.output)
        assert "Usage" in result.output


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading).strip().lower()
    text = "".join(c for c in text if c in " -" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", _outside_code(path.read_text()), re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
    return {f"{base}-{n}" if n else base for base, count in seen.items() for n in range(count)}


def broken_links(path: Path) -> list[str]:
    text = INLINE.sub("", _outside_code(path.read_text()))
    broken = []
    for target in LINK.findall(text) + IMG_SRC.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, mailto:, ...
            continue
        file, _, anchor = target.partition("#")
        where = (path.parent / file).resolve() if file else path
        if not where.exists():
            broken.append(f"{target}: no such file")
        elif anchor and where.suffix == ".md" and anchor not in anchors(where):
            broken.append(f"{target}: no heading with that anchor")
    return broken


def test_slugs_are_githubs():
    assert slug("Serving: a page and the APIs clients speak") == (
        "serving-a-page-and-the-apis-clients-speak"
    )
    assert slug("Which way round: the layout map") == "which-way-round-the-layout-map"
    assert slug("¿Qué es `difusion`?") == "qué-es-difusion"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_pictures_and_links_exist(page: Path):
    assert broken_links(page) == []


def test_a_broken_link_is_found(tmp_path: Path):
    page = tmp_path / "page.md"
    (tmp_path / "there.png").write_bytes(b"")
    page.write_text(
        "# Top\n\n![ok](there.png) [ok](#top) [gone](missing.png) [bad](#nowhere)\n"
        "`[not a link](nothing.md)`\n\n```bash\n[x](inside-code.md)\n```\n"
    )
    assert broken_links(page) == [
        "missing.png: no such file",
        "#nowhere: no heading with that anchor",
    ]
