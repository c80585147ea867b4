"""mkdocs hook: links from docs/ to the rest of the repository.

The pages link to result files, plots and notes outside docs/ (``../benchmarks/...``), as
GitHub shows them. mkdocs knows only the files under docs/, so ``mkdocs build --strict``
would fail on every such link. This hook resolves each one against the repository: a
target that does not exist is a warning (so the strict build fails on it, as on a broken
link between pages); one that exists is copied into the site under ``repo/`` as a plain
file (a Markdown file stays raw, it is not rendered as a page) and the link points there.
Links inside code are left alone.
"""
from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.plugins.vqkern_repo_links")

LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(`{3,}).*?^\1[ \t]*$", re.M | re.S)
INLINE = re.compile(r"`[^`\n]*`")
SITE_FOLDER = "repo"


class RepoFile(File):
    """A repository file copied into the site as it is, whatever its suffix."""

    def is_documentation_page(self) -> bool:
        return False


def _masked(text: str) -> str:
    """text with the same length and line breaks, where HTML comments, fenced code and the
    inside of inline code are blanked: links found in it are real links, and their
    positions are those of text."""
    def blank(m):
        return re.sub(r"[^\n]", " ", m.group(0))
    text = re.sub(r"<!--.*?-->", blank, text, flags=re.S)
    text = FENCE.sub(blank, text)
    return INLINE.sub(lambda m: "`" + "x" * (len(m.group(0)) - 2) + "`", text)


def _repo_links(page_path: Path, docs_dir: Path, text: str):
    """(match, target, resolved path) of each relative link of text that leaves docs/."""
    for m in LINK.finditer(_masked(text)):
        target = text[m.start(2):m.end(2)]
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith(("#", "/")):
            continue
        resolved = (page_path.parent / target.split("#", 1)[0]).resolve()
        if resolved.is_relative_to(docs_dir):
            continue  # mkdocs checks these itself
        yield m, target, resolved


def on_files(files, config):
    """Add every repository file the pages link to, so that mkdocs copies and checks it."""
    docs_dir = Path(config["docs_dir"]).resolve()
    root = docs_dir.parent
    seen = set()
    for page in list(files.documentation_pages()):
        page_path = Path(page.abs_src_path)
        for _, _, resolved in _repo_links(page_path, docs_dir, page_path.read_text()):
            if not resolved.is_file() or not resolved.is_relative_to(root):
                continue  # reported by on_page_markdown, with the page's name
            rel = resolved.relative_to(root).as_posix()
            if rel not in seen:
                seen.add(rel)
                files.append(RepoFile(rel, str(root), config["site_dir"], config["use_directory_urls"],
                                      dest_uri=f"{SITE_FOLDER}/{rel}"))
    return files


def on_page_markdown(markdown, page, config, files):
    """Point each link that leaves docs/ at the copy under repo/; warn on a missing target."""
    docs_dir = Path(config["docs_dir"]).resolve()
    root = docs_dir.parent
    page_path = Path(page.file.abs_src_path)
    here = posixpath.dirname(page.file.src_uri)
    out, last = [], 0
    for m, target, resolved in _repo_links(page_path, docs_dir, markdown):
        if not resolved.is_relative_to(root) or not resolved.is_file():
            log.warning(f"Doc file '{page.file.src_uri}' links to '{target}', which is not a file of the repository")
            continue
        anchor = target[len(target.split("#", 1)[0]):]
        # The copy's src_uri is its repository path; mkdocs resolves the link relative to
        # the page's src_uri and points it at the copy's place in the site.
        new = posixpath.relpath(resolved.relative_to(root).as_posix(), here or ".") + anchor
        out.append(markdown[last:m.start(2)] + new)
        last = m.end(2)
    out.append(markdown[last:])
    return "".join(out)
