"""Documentation that cannot rot: docstrings with shapes and dtypes; every ```python block of
README.md and docs/ run, page by page; every relative link resolved; the drop-in and
multi-GPU pages show what they promise."""
import importlib
import inspect
import pathlib
import re
import traceback

import pytest
import torch

MODULES = ["vqkern", "vqkern.functional", "vqkern.modules", "vqkern.reference", "vqkern.kmeans",
           "vqkern.distributed", "vqkern.compat", "vqkern.compat.vector_quantize", "vqkern.compat.residual_vq",
           "vqkern.compat.codebook", "vqkern.compat.rotation", "vqkern.compat.layout", "vqkern.compat.topk"]
SHAPE = re.compile(r"\((\.\.\.|[A-Z]|B,|C,|M,|x |num_)|shape")
DTYPE = re.compile(r"float|int64|bool|dtype")


def _public_api():
    seen = {}
    for name in MODULES:
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(obj):
                seen[f"{module.__name__}.{attr}"] = obj
            elif inspect.isclass(obj):
                seen[f"{module.__name__}.{attr}"] = obj
                for member, value in vars(obj).items():
                    if (member.startswith("_") or member == "extra_repr") and member != "forward":
                        continue
                    if inspect.isfunction(value) or isinstance(value, property):
                        seen[f"{module.__name__}.{attr}.{member}"] = value
    return seen


def _takes_tensors(obj) -> bool:
    if not inspect.isfunction(obj):
        return False
    text = str(inspect.signature(obj))
    return "Tensor" in text or obj.__name__ == "forward"


@pytest.mark.parametrize("name,obj", sorted(_public_api().items()), ids=sorted(_public_api()))
def test_docstring_with_shapes_and_dtypes(name, obj):
    doc = inspect.getdoc(obj.fget if isinstance(obj, property) else obj)
    assert doc, f"{name} has no docstring"
    if _takes_tensors(obj):
        assert SHAPE.search(doc), f"{name}'s docstring gives no shape"
        assert DTYPE.search(doc), f"{name}'s docstring gives no dtype"


ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PAGE_IDS = [str(p.relative_to(ROOT)) for p in PAGES]
FENCE = re.compile(r"^(`{3,})([^\n`]*)\n(.*?)^\1[ \t]*$", re.M | re.S)
NOT_RUN = re.compile(r"# not-run:\s*(\S.*)")
# Languages whose blocks are not Python; any other info string (py, pycon, none) is refused,
# so that no Python example escapes the run by its fence.
OTHER_LANGUAGES = {"bash", "sh", "console", "text", "yaml", "toml", "json", "cmake", "cpp", "cuda", "make"}


def code_blocks(text: str):
    """(language, first code line (1-based), source) of every fenced block of a Markdown text."""
    for m in FENCE.finditer(text):
        language = m.group(2).strip().split(" ")[0]
        yield language, text.count("\n", 0, m.start(3)) + 1, m.group(3)


def run_page(path: pathlib.Path) -> int:
    """Run the page's python blocks in order in one namespace; fail naming page and line.

    Returns how many blocks ran. A block whose first line is ``# not-run: <reason>`` is
    skipped (GPU-only or long examples); the reason is required."""
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    namespace = {"__name__": f"docs_{path.stem}"}
    torch.manual_seed(0)
    ran = 0
    for language, line, source in code_blocks(path.read_text()):
        if language != "python":
            continue
        first = source.lstrip("\n").split("\n", 1)[0].strip()
        if first.startswith("# not-run"):
            if not NOT_RUN.fullmatch(first):
                pytest.fail(f"{name}:{line}: '# not-run:' needs a reason after the colon")
            continue
        # Padded so that a traceback's line numbers are the page's own.
        code = compile("\n" * (line - 1) + source, str(name), "exec")
        try:
            exec(code, namespace)
        except Exception as exc:
            trace = "".join(traceback.format_exception(exc)[-6:])
            pytest.fail(f"{name}:{line}: the python block starting here failed: {type(exc).__name__}: {exc}\n"
                        f"{trace}", pytrace=False)
        ran += 1
    return ran


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_examples_run(page):
    run_page(page)


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_every_code_block_declares_its_language(page):
    for language, line, _ in code_blocks(page.read_text()):
        assert language == "python" or language in OTHER_LANGUAGES, (
            f"{page.relative_to(ROOT)}:{line}: a code block with language {language!r}: mark Python as "
            f"```python (it then runs in the tests) and other text with its language ({sorted(OTHER_LANGUAGES)})")


def test_the_collector_runs_blocks_in_order_and_reports_page_and_line(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# t\n\n```python\nx = 1\n```\n\n```python\n# not-run: needs a GPU\nraise SystemExit\n```\n\n"
                    "```bash\nexit 1\n```\n\n```python\ny = x + 1\nassert y == 2\n```\n")
    assert run_page(page) == 2
    page.write_text("# t\n\n```python\nx = 1\n```\n\ntext\n\n```python\ny = x\nz = undefined_name\n```\n")
    with pytest.raises(pytest.fail.Exception, match=r"page\.md:10: .*NameError.*undefined_name"):
        run_page(page)
    page.write_text("```python\n# not-run:\nx = 1\n```\n")
    with pytest.raises(pytest.fail.Exception, match="needs a reason"):
        run_page(page)


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _prose(text: str) -> str:
    """The text without code blocks, inline code and HTML comments (links there are not links)."""
    text = FENCE.sub("", text)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchors(path: pathlib.Path) -> set[str]:
    """Heading anchors as GitHub and mkdocs' toc extension make them."""
    anchors = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", FENCE.sub("", path.read_text()), re.M):
        title = re.sub(r"[`*_]|<[^>]+>", "", m.group(1)).strip().lower()
        anchors.add(re.sub(r"[\s]+", "-", re.sub(r"[^\w\s-]", "", title)))
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_relative_links_resolve(page):
    """Every relative link of README.md and docs/ names a file of the repository (and a
    heading of it, for an anchor into a Markdown page), as GitHub shows the pages."""
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):
            continue  # http(s), mailto: not checked here (no network in the tests)
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        where = f"{page.relative_to(ROOT)}: link {target!r}"
        assert resolved.is_relative_to(ROOT), f"{where} leaves the repository"
        assert resolved.exists(), f"{where}: {resolved.relative_to(ROOT)} does not exist"
        if anchor and resolved.suffix == ".md":
            assert anchor in _anchors(resolved), f"{where}: no heading #{anchor} in {resolved.relative_to(ROOT)}"


def _page(name: str) -> str:
    return (ROOT / "docs" / name).read_text()


def test_drop_in_page_shows_the_switch_and_every_supported_option():
    from test_compat import FORWARD_SUPPORTED, RVQ_SUPPORTED, SUPPORTED

    for text in (_page("drop-in.md"), (ROOT / "README.md").read_text()):
        switch = re.search(r"# from vector_quantize_pytorch import (.+)\n(from vqkern\S* import \1)\n", text)
        assert switch, "the one-line switch of the import is not shown"
        exec(switch.group(2), {})  # the line it shows works
    section = _page("drop-in.md")
    for option in (*SUPPORTED, *RVQ_SUPPORTED, *FORWARD_SUPPORTED):
        assert f"`{option}`" in section, f"{option} is not in docs/drop-in.md's list of options"


def test_distributed_page_shows_multi_gpu_training():
    text = _page("distributed.md")
    assert "DistributedDataParallel" in text and "init_process_group" in text and "torchrun" in text
