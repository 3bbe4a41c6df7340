"""Sphinx configuration for confnb's documentation (MyST markdown, built with warnings as errors).

The build needs no network: there is no intersphinx, no remote image and no linkcheck. Internal references are
strict instead: ``nitpicky`` plus MyST's cross-reference warnings, which ``sphinx-build -W`` turns into errors, so a
renamed page or heading breaks the build rather than leaving a dead link.
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
# The CLI reference is generated from the parser itself: import the checkout being documented, not an older install.
sys.path.insert(0, str(ROOT))

from confnb import __version__  # noqa: E402

project = "confnb"
author = "the confnb authors"
copyright = "the confnb authors"
release = __version__
version = ".".join(__version__.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.doctest",
    "sphinxarg.ext",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# Strictness: every reference must resolve; -W (used by the tests) makes each warning an error.
nitpicky = True
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence", "deflist"]
# Links to repository files outside docs/ must not become silent external links.
myst_all_links_external = False

# Option names such as --policy must stay two hyphens, not become an en dash.
smartquotes = False

html_theme = "alabaster"
html_title = f"confnb {release}"
html_static_path: list[str] = []
html_theme_options = {
    "description": "Confidential notebooks on AMD SEV-SNP",
    "fixed_sidebar": True,
    "page_width": "1160px",
    "sidebar_width": "220px",
}
html_show_sourcelink = False

# Doctests run hermetically: a throwaway simulated chip, never AMD's KDS, and the example files beside this one.
doctest_global_setup = f"""
import os as _os
import tempfile as _tempfile
from pathlib import Path

DOCS = Path({str(DOCS)!r})
EXAMPLES = DOCS / "examples"
_scratch = Path(_tempfile.mkdtemp(prefix="confnb-docs-"))
_os.environ["CONFNB_SIMULATED_TEE_DIR"] = str(_scratch / "simulated-tee")
_os.environ["CONFNB_KDS_CACHE"] = str(_scratch / "kds")
_os.environ["CONFNB_OFFLINE"] = "1"
_os.environ["NO_COLOR"] = "1"
_os.environ.pop("CONFNB_VAULT_SOCKET", None)  # the analyst API's examples run outside a kernel
"""
doctest_global_cleanup = """
import shutil as _shutil

_shutil.rmtree(_scratch, ignore_errors=True)
"""
