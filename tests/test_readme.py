"""The README opens with the commands that CI runs: install, make an image with the demo model, test."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ['pip install -e ".[test]" -c constraints.txt',
            'python -m ipadapter_min.sample --prompt "a large red star on the left" --out star.png',
            "python -m pytest"]


def test_readme_opens_with_the_ci_commands():
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```sh\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert first_block == COMMANDS
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[-len(COMMANDS):] == COMMANDS
