"""The README's quick start is what CI runs, and the CLI answers."""
import json
import os
import re

from sdalign_rt import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


VLLM_TEST_COMMAND = "bash bench/vllm_env.sh; then .venv-vllm/bin/python -m pytest tests/test_vllm_plugin.py"


def quick_start_commands() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    block = re.search(r"## Quick start.*?```(?:bash)?\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_quick_start_is_two_commands_and_ci_runs_the_second():
    commands = quick_start_commands()
    assert len(commands) == 2
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci_lines = [line for line in f.read().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert ci_lines[0] == commands[1]
    # After it, only the optional vLLM check, with the command docs/vllm.md gives users.
    assert len(ci_lines) == 2 and VLLM_TEST_COMMAND in ci_lines[1]
    with open(os.path.join(ROOT, "docs", "vllm.md")) as f:
        assert VLLM_TEST_COMMAND.replace("; then", " &&") in f.read()
    assert "torch==2.13.0" in commands[0] and "torch==2.13.0" in commands[1]


def test_info_command(capsys):
    assert cli.main(["info"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "reference" in report["backends"]["cpu"]
