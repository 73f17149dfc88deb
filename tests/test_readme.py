"""The README and the manual in docs/ are tested: their Python snippets run as written (each
page's in order, in one namespace per page, offline on the tiny model), every `wanx ...` command
line in them parses with the real CLI parser, every relative link points to a file and heading
that exist, the README's test command is the one CI runs, and the site's nav lists every page.
None of this needs mkdocs: `make docs` is the site build."""

import re
import shlex
import unicodedata
from pathlib import Path

import pytest

from wanx.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
TEXT = {page.relative_to(ROOT).as_posix(): page.read_text(encoding="utf-8") for page in PAGES}
README = TEXT["README.md"]


def blocks(language: str, text: str = README) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def prose(text: str) -> str:
    """The text outside fenced code blocks, with inline code spans blanked."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "``", text)


# What each page's snippets must leave behind, so a snippet that silently stops doing its job
# (or moves to another page unnoticed) fails here.
def _generate_checks(namespace, cwd):
    assert (cwd / "cat.mp4").is_file()


def _models_checks(namespace, cwd):
    assert namespace["frames"].shape[:2] == (1, 3)  # the last `frames` is the VAE's decode
    assert namespace["embeddings"].shape[1] == 512


SNIPPET_CHECKS = {"docs/generate.md": _generate_checks, "docs/models.md": _models_checks}
SNIPPET_PAGES = [name for name, text in TEXT.items() if blocks("python", text)]


def test_snippets_are_all_found():
    """The README had 7 Python snippets before the manual moved to docs/; none was lost."""
    assert sum(len(blocks("python", TEXT[name])) for name in SNIPPET_PAGES) >= 7
    assert set(SNIPPET_CHECKS) <= set(SNIPPET_PAGES)


@pytest.mark.parametrize("page", SNIPPET_PAGES)
def test_python_snippets_run_as_written(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for snippet in blocks("python", TEXT[page]):
        exec(compile(snippet, page, "exec"), namespace)  # noqa: S102 - our own docs
    if page in SNIPPET_CHECKS:
        SNIPPET_CHECKS[page](namespace, tmp_path)


def wanx_argv(words: list[str]) -> list[str] | None:
    """The CLI arguments of a shell line that runs wanx: `wanx ...`, `.venv/bin/wanx ...`, or a
    launcher's `... -m wanx.cli ...` (accelerate launch, torchrun)."""
    if Path(words[0]).name == "wanx":
        return words[1:]
    for i in range(len(words) - 1):
        if words[i] == "-m" and words[i + 1] in ("wanx", "wanx.cli"):
            return words[i + 2:]
    return None


def command_lines():
    for page, text in TEXT.items():
        for block in blocks("bash", text):
            for line in block.splitlines():
                words = shlex.split(line, comments=True)
                if words and words[-1] == "&":  # started in the background: the command is the rest
                    words = words[:-1]
                argv = wanx_argv(words) if words else None
                if argv is not None:
                    yield pytest.param(argv, id=f"{Path(page).stem}: " + " ".join(argv)[:60])


COMMANDS = list(command_lines())


def test_command_lines_are_all_found():
    """The README held 48 `wanx` lines before the manual moved to docs/ (none may be lost), and
    3 launcher lines (accelerate, torchrun) that are checked now too."""
    assert len(COMMANDS) >= 48 + 3


@pytest.mark.parametrize("argv", COMMANDS)
def test_command_lines_parse(argv):
    try:
        build_parser().parse_args(argv)  # an unknown flag or a bad value exits with code 2
    except SystemExit as done:
        assert done.code == 0, argv  # --version, --help


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^make test\b", ci, flags=re.M)
    assert re.search(r"^make test\b", blocks("bash")[0], flags=re.M)


def test_layout_lists_real_files():
    text = TEXT["docs/development.md"]
    layout = text[text.index("## Layout"):]
    names = re.findall(r"^  (\S+\.py|\S+/)", layout, flags=re.M)
    assert len(names) > 20
    for name in names:
        assert (ROOT / "src" / "wanx" / name).exists(), name


# Links. A heading's anchor is the same on GitHub and in the mkdocs site only when both slug
# rules agree, so a linked anchor must be a heading under both.
def github_slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def mkdocs_slug(heading: str) -> str:  # Python-Markdown's toc.slugify, which mkdocs uses
    value = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode("ascii")
    value = re.sub(r"[^\w\s-]", "", value).strip().lower()
    return re.sub(r"[-\s]+", "-", value)


def headings(text: str) -> list[str]:
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    titles = re.findall(r"^#{1,6} +(.+?) *#*$", text, flags=re.M)
    return [re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title).replace("`", "") for title in titles]


def links(text: str) -> list[str]:
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose(text))


LINKS = [(page, target) for page, text in TEXT.items() for target in links(text) if not re.match(r"[a-z]+:", target)]


def test_links_are_all_found():
    assert len(LINKS) >= 40
    linked = {(ROOT / page).parent.joinpath(target.split("#")[0]).resolve() for page, target in LINKS if page == "README.md"}
    assert set(PAGES[1:]) <= linked, "every docs/ page is linked from the README"


@pytest.mark.parametrize(("page", "target"), LINKS, ids=[f"{p}->{t}" for p, t in LINKS])
def test_relative_links_resolve(page, target):
    path, _, anchor = target.partition("#")
    file = (ROOT / page).parent.joinpath(path).resolve() if path else ROOT / page
    assert file.is_file(), f"{page}: {target}: no such file"
    if page.startswith("docs/"):  # the site holds docs/ only: a link out of it breaks there
        assert file.is_relative_to(DOCS), f"{page}: {target}: outside docs/"
    if anchor:
        titles = headings(file.read_text(encoding="utf-8"))
        assert anchor in [github_slug(title) for title in titles], f"{page}: {target}: no such heading (GitHub)"
        assert anchor in [mkdocs_slug(title) for title in titles], f"{page}: {target}: no such heading (mkdocs)"


def test_readme_is_a_front_door():
    """The README stays short (issue 24): the manual lives in docs/."""
    assert len(README.splitlines()) <= 200


def test_site_nav_lists_every_page():
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = re.findall(r"^ +- (?:[^:\n]+: )?(\S+\.md)$", config, flags=re.M)
    assert sorted(nav) == sorted(page.name for page in PAGES[1:])
    assert re.search(r"^docs_dir: docs$", config, flags=re.M)
