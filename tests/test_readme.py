"""The README's promises: the two set-up commands, `.ci/run`, and a quickstart that really trains."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.S | re.M)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def test_readme_states_exactly_two_setup_commands_and_ci_runs_the_test_one():
    commands = re.findall(r"```bash\n(.*?)\n```", _section("Two commands"), re.S)
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    ci_lines = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "set ", "cd "))
    ]
    assert ci_lines == ["bash scripts/test.sh"]
    for script in ("scripts/demo.sh", "scripts/test.sh"):
        assert (ROOT / script).is_file()


def test_python_quickstart_trains(tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)\n```", _section("Python quickstart"), re.S).group(1)
    assert len(code.splitlines()) <= 20
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code.replace("max_steps=4", "max_steps=1"), "README-quickstart", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 1
    logged = {key for entry in trainer.state.log_history for key in entry}
    assert {"diffusion/nfe/mean", "diffpo/is_weight/mean", "sampler_head/loss"} <= logged


def test_the_demo_duration_is_stated_the_same_everywhere(capsys):
    # before: 15 min (`trl-diffpo --help`, demo.py), 4 min (README) and 10.8 min (docs/demo.md)
    from trl_diffpo.cli import DEMO_DURATION, main
    from trl_diffpo.demo import build_parser

    assert main(["--help"]) == 0
    assert DEMO_DURATION.split(",")[0] in capsys.readouterr().out
    assert DEMO_DURATION in " ".join(build_parser().description.split())
    for document in (README, (ROOT / "docs" / "demo.md").read_text()):
        assert DEMO_DURATION in " ".join(document.split())
        assert "15 min" not in document
