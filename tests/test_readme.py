"""The README's commands point at things that exist, and its quick-start and test commands are real.

The commands themselves run elsewhere: training under each launcher (test_distributed, test_slurm),
evaluate/predict/show-data (test_commands), the benchmark (test_bench), resume (test_resume);
.ci/run runs `bash tests/run.sh`, then the quick start and a prediction.
"""

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def commands() -> list[str]:
    """Every shell line in the README: fenced bash blocks and `code` in the launch table."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        lines += [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    lines += re.findall(r"^\| [^|]+ \| `([^`]+)`", README, re.M)
    return [line for line in lines if line]


def test_readme_has_the_two_quick_start_commands():
    assert "bash launch/quickstart.sh" in README and "bash tests/run.sh" in README
    assert "bash tests/run.sh" in (REPO / ".ci" / "run").read_text()


def test_every_referenced_file_exists():
    found = 0
    for line in commands():
        for path in re.findall(r"((?:configs|launch|slurm|dist_cifar|tests)/[\w./-]+\.(?:yaml|sh|sbatch|py))", line):
            assert (REPO / path).is_file(), f"README names {path}, which does not exist: {line}"
            found += 1
    assert found >= 15


def test_every_console_script_is_installed():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    used = {word for line in commands() for word in line.split() if word.startswith("dist-cifar-")}
    used |= {Path(word).name for line in commands() for word in line.split() if "/dist-cifar-" in word}
    assert used and used <= set(scripts), used - set(scripts)
    for target in scripts.values():
        module, func = target.split(":")
        assert (REPO / (module.replace(".", "/") + ".py")).is_file() and f"def {func}(" in (
            REPO / (module.replace(".", "/") + ".py")).read_text()


def test_readme_numbers_say_machine_and_date():
    results = README.split("## Results", 1)[1].split("## Troubleshooting", 1)[0]
    assert "PLACEHOLDER" not in results
    assert re.search(r"20\d\d-\d\d-\d\d", results), "results need the date they were measured"
    assert "seed" in results and "±" in results, "accuracy claims need seeds and spread"
