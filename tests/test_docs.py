"""The README is the manual: its flag tables match the run dataclasses, and CI runs its test command."""
import dataclasses
import os
import re

import bench
import eval_lm
import finetune_lora
import generate
import hf_gpt2
import plot
import prepare
import train
from conftest import ROOT
from model import GPTConfig

README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def table_row(f: dataclasses.Field) -> str:
    choices = f.metadata.get("choices")
    meaning = f.metadata["help"] + (f" ({' / '.join(choices)})" if choices else "")
    return f"| `--{f.name}` | `{f.default}` | {meaning.replace('|', chr(92) + '|')} |"


def test_readme_flag_tables_match_the_dataclasses():
    documented = set(re.findall(r"^\| `--(\w+)` \|", README, flags=re.MULTILINE))
    expected = set()
    for config in (prepare.PrepareConfig, train.TrainConfig, GPTConfig, generate.GenerateConfig,
                   finetune_lora.FinetuneConfig, hf_gpt2.ExportConfig, eval_lm.EvalConfig, plot.PlotConfig,
                   bench.BenchConfig):
        for f in dataclasses.fields(config):
            assert table_row(f) in README, f"README row for {config.__name__}.{f.name} is out of date"
            expected.add(f.name)
    assert documented == expected, f"README documents flags that do not exist: {documented - expected}"


def test_ci_runs_the_readme_test_command():
    ci_lines = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read().strip().splitlines()
    blocks = re.findall(r"```bash\n(.*?)\n```", README, flags=re.DOTALL)
    test_command = next(b for b in blocks if "pytest" in b)
    assert ci_lines[-1] == test_command
