"""The documentation builds with warnings as errors, its examples run, and it cannot fall behind the CLI.

Sphinx runs in a subprocess of this interpreter (the project's virtual environment), exactly as a person would run
it: ``python -m sphinx -W --keep-going -b html docs OUT``. With ``-W`` every broken cross-reference, missing
anchor or unknown directive option fails the build. The doctest builder runs every ``{doctest}`` block: the policy
files the guides show are the ones the doctests load, and the attestation examples verify real (simulated)
evidence. The CLI reference is generated from ``confnb.cli.build_parser()``, and this module checks the rendered
page names every command and subcommand, so a new command without documentation fails here.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from confnb.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
BUILD_TIMEOUT_S = 300

# [text](target) and ![alt](target); the target ends at whitespace or the closing parenthesis.
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_FENCE = re.compile(r"^(`{3,}|~{3,}).*?^\1\s*$", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_INCLUDE = re.compile(r"^```\{(?:literalinclude|include)\}\s+(\S+)\s*$", re.MULTILINE)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def _sphinx(builder: str, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", builder, str(DOCS), str(out)],
        capture_output=True,
        text=True,
        check=False,
        timeout=BUILD_TIMEOUT_S,
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def html(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("docs-html")
    build = _sphinx("html", out)
    assert build.returncode == 0, f"sphinx html build failed:\n{build.stdout}\n{build.stderr}"
    return out


def _commands(parser: argparse.ArgumentParser, prefix: str) -> Iterator[str]:
    """Every command path under ``parser`` as the ids sphinx-argparse gives them: ``confnb-attest-verify``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                path = f"{prefix}-{name}"
                yield path
                yield from _commands(subparser, path)


def test_html_builds_without_warnings(html: Path) -> None:
    for page in ("index", "concepts", "analyst-guide", "owner-guide", "privacy", "operator-guide", "cli", "benchmarks"):
        assert (html / f"{page}.html").is_file(), f"{page}.md was not built (missing from the toctree?)"


def test_cli_reference_names_every_command(html: Path) -> None:
    page = (html / "cli.html").read_text(encoding="utf-8")
    parser = build_parser()
    top_level = [path for path in _commands(parser, "confnb") if path.count("-") == 1]
    assert len(top_level) >= 7, top_level  # the walk found the CLI's commands, so the check below means something
    missing = [path for path in _commands(parser, "confnb") if f'id="{path}"' not in page]
    assert not missing, f"the CLI reference lacks {', '.join(missing)}"


def test_doctests_pass(tmp_path: Path) -> None:
    build = _sphinx("doctest", tmp_path)
    report = (tmp_path / "output.txt").read_text(encoding="utf-8") if (tmp_path / "output.txt").exists() else ""
    assert build.returncode == 0, f"doctests failed:\n{report}\n{build.stdout}\n{build.stderr}"
    ran = re.search(r"^\s*(\d+) tests$", report, re.MULTILINE)
    assert ran is not None and int(ran.group(1)) >= 20, f"too few doctests ran:\n{report}"
    assert re.search(r"^\s*0 failures in tests$", report, re.MULTILINE), report


def _relative_targets(markdown: Path) -> Iterator[tuple[str, Path]]:
    """Each relative link or include in ``markdown`` with the file it must name (code is not searched)."""
    text = markdown.read_text(encoding="utf-8")
    includes = _INCLUDE.findall(text)
    prose = _INLINE_CODE.sub("", _FENCE.sub("", text))
    for target in [*_LINK.findall(prose), *includes]:
        # MyST's path: scheme offers a repository file as a download; it names a file like a plain relative link.
        local = target.removeprefix("path:")
        if local.startswith("#") or _SCHEME.match(local):
            continue  # in-page anchors are checked by the -W build; URLs are outside the offline check
        path = local.split("#", 1)[0]
        if path:
            yield target, (markdown.parent / path).resolve()


@pytest.mark.parametrize(
    "markdown",
    [REPO / "README.md", *sorted(DOCS.glob("*.md"))],
    ids=lambda path: str(path.relative_to(REPO)),
)
def test_relative_links_point_to_existing_files(markdown: Path) -> None:
    broken = [target for target, path in _relative_targets(markdown) if not path.exists()]
    assert not broken, f"{markdown.relative_to(REPO)} links to missing files: {', '.join(broken)}"


def test_the_link_check_finds_links() -> None:
    """The checker must see the links the guides do have, or the test above could pass on nothing."""
    targets = {target for page in DOCS.glob("*.md") for target, _ in _relative_targets(page)}
    assert {"concepts.md#threat-model", "examples/owner-policy.toml", "path:../benchmarks/README.md"} <= targets
