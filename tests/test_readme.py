"""The README is tested: its Python snippets run as written (in order, one namespace, offline
on the tiny model), every `wanx ...` command line in it parses with the real CLI parser, and
its test command is the one CI runs."""

import re
import shlex
from pathlib import Path

import pytest

from wanx.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def test_python_snippets_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANX_HOME", str(tmp_path / "wanx-home"))
    snippets = blocks("python")
    assert len(snippets) >= 4
    namespace: dict = {}
    for snippet in snippets:
        exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert (tmp_path / "cat.mp4").is_file()
    assert namespace["frames"].shape[:2] == (1, 3)  # the last `frames` is the VAE's decode
    assert namespace["embeddings"].shape[1] == 512


def command_lines():
    for block in blocks("bash"):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words and Path(words[0]).name == "wanx":
                yield words[1:]


@pytest.mark.parametrize("argv", list(command_lines()), ids=lambda argv: " ".join(argv)[:60])
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
    layout = README[README.index("## Layout"):]
    for name in re.findall(r"^  (\S+\.py|\S+/)", layout, flags=re.M):
        assert (ROOT / "src" / "wanx" / name).exists(), name
