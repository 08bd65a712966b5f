"""CI proves the README: `.ci/run` runs exactly the commands README's Development section says CI runs."""

from __future__ import annotations

import re

from tests.conftest import ROOT


def commands(text: str) -> list[str]:
    """Command lines of a shell snippet: comments, blank lines, `set` and `cd` left out."""
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith(("set ", "cd ")):
            out.append(re.sub(r"\s+", " ", line))
    return out


def test_ci_runs_the_readme_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    development = readme.split("\n## Development\n", 1)[1].split("\n## ", 1)[0]
    first_block = re.search(r"```bash\n(.*?)```", development, flags=re.S)
    assert first_block, "README's Development section starts with the commands CI runs"
    documented = commands(first_block.group(1))
    assert "make test" in documented and "make lint" in documented
    assert commands((ROOT / ".ci" / "run").read_text()) == documented
