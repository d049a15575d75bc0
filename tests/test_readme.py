"""What a reader of README.md (and docs/*.md) relies on points at things that exist.

Every file and module a command or the prose names, every flag given to one of our commands, every
console script, every config key, every relative link. The commands themselves run elsewhere:
training under each launcher (test_distributed, test_slurm), evaluate/predict/show-data/sweep
(test_commands), the benchmark (test_bench), resume (test_resume); .ci/run runs `bash tests/run.sh`,
then the quick start and a prediction.
"""

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from dist_cifar.config import Config, load_config

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
DOCS = {path: path.read_text() for path in sorted((REPO / "docs").glob("*.md"))}
PAGES = {REPO / "README.md": README, **DOCS}
MAX_README_LINES = 250
# What the reader is told to run from the repository: these prefixes, these endings.
PATH = re.compile(r"(?<![\w./-])((?:configs|launch|slurm|dist_cifar|tests|docs|\.ci)/[\w./-]*[\w/])")
SECTIONS = {f.name for f in dataclasses.fields(Config) if f.default_factory is not dataclasses.MISSING}  # data, train, ...
FILE_ENDINGS = (".safetensors", ".yaml", ".json", ".jsonl", ".png", ".py", ".sh", ".sbatch", ".md", ".pt", ".lock")


def commands(text: str = README) -> list[str]:
    """Every shell line of a page: fenced bash blocks and the `code` cell of a table row (the launch table)."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = block.replace("\\\n", " ")
        lines += [line.split(" # ")[0].split("  #")[0].strip() for line in joined.splitlines()]
    lines += re.findall(r"^\| [^|]+ \| `([^`]+)`", text, re.M)
    return [line for line in lines if line and not line.startswith("#")]


def code_spans(text: str) -> list[str]:
    """Inline `code` outside fenced blocks, plus every line of the fenced blocks."""
    fenced = re.findall(r"```\w*\n(.*?)```", text, re.S)
    rest = re.sub(r"```\w*\n.*?```", "", text, flags=re.S)
    return re.findall(r"`([^`\n]+)`", rest) + [line for block in fenced for line in block.splitlines()]


def module_file(module: str) -> Path | None:
    """The source file of `dist_cifar.x.y`: a module, or a package's __init__.py."""
    base = REPO / module.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def test_readme_has_the_two_quick_start_commands():
    assert "bash launch/quickstart.sh" in README and "bash tests/run.sh" in README
    assert "bash tests/run.sh" in (REPO / ".ci" / "run").read_text()


def test_readme_is_a_guide_not_a_notebook():
    lines = README.count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines: move depth to docs/ (at most {MAX_README_LINES})"


def test_every_command_names_files_that_exist():
    found = 0
    for page, text in PAGES.items():
        for line in commands(text):
            for path in PATH.findall(line):
                if "<" in path or path.startswith(("runs/", "bench-results/")):
                    continue
                assert (REPO / path).exists(), f"{page.name} runs `{line}`, but {path} does not exist"
                found += 1
    assert found >= 20, found


def test_every_path_in_the_prose_exists():
    """Module and file paths named in `code` (the package layout moves: the docs must move with it)."""
    for page, text in PAGES.items():
        for span in code_spans(text):
            for path in PATH.findall(span):
                if "<" in path or "*" in span and "*" in path:
                    continue
                assert (REPO / path).exists(), f"{page.name} names `{path}`, which does not exist"


def test_every_python_module_run_with_dash_m_exists():
    found = 0
    for page, text in PAGES.items():
        for line in commands(text):
            for module in re.findall(r"-m (dist_cifar(?:\.\w+)*)", line):
                source = module_file(module)
                assert source, f"{page.name} runs `python -m {module}`, which does not exist"
                if source.name == "__init__.py":
                    assert (source.parent / "__main__.py").is_file(), f"`python -m {module}` needs {module}/__main__.py"
                found += 1
    assert found >= 3, found


def test_every_console_script_is_installed():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    used = set(re.findall(r"(?<![\w/-])(dist-cifar-[a-z]+(?:-[a-z]+)*)", README))
    assert used and used <= set(scripts), f"not console scripts in pyproject.toml: {sorted(used - set(scripts))}"
    for name, target in scripts.items():
        module, func = target.split(":")
        source = module_file(module)
        assert source, f"{name} -> {target}: no module {module}"
        text = source.read_text()
        assert re.search(rf"^def {func}\(|^from \S+ import .*\b{func}\b|^{func} = ", text, re.M), (
            f"{name} -> {target}: {source.relative_to(REPO)} defines no {func}")


# The flags a command of ours accepts are the strings in its source: "--out", "--seeds", ...
ENTRY_POINTS = {
    "dist_cifar/train.py": ["dist_cifar/train.py"], "-m dist_cifar.train": ["dist_cifar/train.py"],
    "dist-cifar-train": ["dist_cifar/train.py"],
    "dist-cifar-evaluate": ["dist_cifar/evaluate_cli.py"], "-m dist_cifar.evaluate_cli": ["dist_cifar/evaluate_cli.py"],
    "dist-cifar-predict": ["dist_cifar/predict.py"], "dist-cifar-show-data": ["dist_cifar/show_data.py"],
    "dist-cifar-sweep": ["dist_cifar/sweep.py"], "dist-cifar-bench": ["dist_cifar/bench"],
    "-m dist_cifar.bench": ["dist_cifar/bench"],
}


def source_text(paths: list[str]) -> str:
    files = [p for s in paths for p in ([REPO / s] if (REPO / s).is_file() else sorted((REPO / s).glob("**/*.py")))]
    return "".join(p.read_text() for p in files)


def test_every_flag_given_to_our_commands_exists():
    checked = 0
    for page, text in PAGES.items():
        for line in commands(text):
            for entry, sources in ENTRY_POINTS.items():
                match = re.search(rf"(?<![\w./-]){re.escape(entry)}(?![\w.-])(.*)", line)
                if not match:
                    continue
                source = source_text(sources)
                for flag in re.findall(r"(?<!\S)(--[a-z][\w-]*)", match.group(1)):
                    assert f'"{flag}"' in source, f"{page.name} runs `{line}`, but {entry} has no {flag}"
                    checked += 1
    assert checked >= 10, checked


def key_path_exists(key: str) -> bool:
    """`train.epochs`, `data.augment.flip`: a path of fields through the Config dataclasses to a leaf."""
    obj = Config()
    for part in key.split("."):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            return False
        obj = getattr(obj, part)
    return not dataclasses.is_dataclass(obj)


def named_keys(text: str) -> dict[str, set[str]]:
    """Config keys in `code`: `key.sub=value` (with its value) and bare `section.key` names."""
    keys: dict[str, set[str]] = {}
    for span in code_spans(text):
        for key, value in re.findall(r"(?<![\w./$-])([a-z_]+(?:\.[a-z_]+)+)=([^\s`]*)", span):
            keys.setdefault(key, set()).add(value.rstrip(":,;.)"))
        for key in re.findall(r"(?<![\w./$=-])([a-z_]+(?:\.[a-z_]+)+)(?![\w./=-])", span):
            if key.split(".")[0] in SECTIONS and not key.endswith(FILE_ENDINGS):
                keys.setdefault(key, set())
    return keys


def test_every_config_key_named_exists(monkeypatch):
    monkeypatch.delenv("DIST_CIFAR_DATA", raising=False)
    checked = 0
    for page, text in PAGES.items():
        for key, values in sorted(named_keys(text).items()):
            if key.split(".")[0] not in SECTIONS:
                continue  # `python -m dist_cifar.x`, `safetensors.torch.load_file`, ...
            assert key_path_exists(key), f"{page.name} names the config key {key}, which the Config dataclasses lack"
            checked += 1
            for value in values:
                # A placeholder (N, DIR, PATH, K) or a choice list cannot parse on its own: the key is enough.
                if value and not re.fullmatch(r"[A-Z]+|.*[|<].*", value):
                    try:
                        load_config(None, [f"{key}={value}"])
                    except Exception as err:  # noqa: BLE001: the message is the point
                        pytest.fail(f"{page.name}: `{key}={value}` is not a valid override on its own: {err}")
    assert checked >= 30, checked


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_exists():
    found = 0
    for page, text in PAGES.items():
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.exists(), f"{page.name} links to {target}, which does not exist"
            if anchor and file.suffix == ".md":
                anchors = {slug(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), re.M)}
                assert anchor in anchors, f"{page.name} links to {target}: no heading with that anchor"
            found += 1
    assert found >= 8, found


def test_the_readme_links_every_page_of_docs():
    for path in DOCS:
        assert f"(docs/{path.name})" in README, f"docs/{path.name} is not linked from README.md"
