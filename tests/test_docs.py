"""The docs are the manual: docs/flags.md's tables match the run dataclasses, and CI runs the README's test
command. `python tests/test_docs.py` prints docs/flags.md's tables from the code."""
import dataclasses
import os
import re

from conftest import ROOT   # first: it puts the scripts on the path
import bench
import eval_lm
import finetune_lora
import generate
import hf_gpt2
import plot
import prepare
import train
from model import GPTConfig

README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
FLAGS = open(os.path.join(ROOT, "docs", "flags.md"), encoding="utf-8").read()

# Each script and the dataclasses whose fields are its flags, as docs/flags.md documents them under its heading.
# bench.py also passes every flag of train.py through (documented under train.py).
TABLES = {
    "prepare.py": (prepare.PrepareConfig,),
    "train.py": (train.TrainConfig, GPTConfig),
    "generate.py": (generate.GenerateConfig,),
    "finetune_lora.py": (finetune_lora.FinetuneConfig,),
    "hf_gpt2.py": (hf_gpt2.ExportConfig,),
    "eval_lm.py": (eval_lm.EvalConfig,),
    "plot.py": (plot.PlotConfig,),
    "bench.py": (bench.BenchConfig,),
}


def table_row(f: dataclasses.Field) -> str:
    choices = f.metadata.get("choices")
    meaning = f.metadata["help"] + (f" ({' / '.join(choices)})" if choices else "")
    return f"| `--{f.name}` | `{f.default}` | {meaning.replace('|', chr(92) + '|')} |"


def sections(text: str) -> dict[str, str]:
    """The text under each `## heading` of a Markdown file, by heading."""
    parts = re.split(r"^## (.+)\n", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_every_script_with_flags_has_a_table():
    """A new script that parses flags gets its section in docs/flags.md (and an entry in TABLES)."""
    scripts = {name for name in os.listdir(ROOT) if name.endswith(".py") and name != "model.py"
               and "parse_args(" in open(os.path.join(ROOT, name), encoding="utf-8").read()}
    assert scripts == set(TABLES)
    assert set(sections(FLAGS)) == set(TABLES), "docs/flags.md has one `## script.py` section per script"


def test_flag_tables_match_the_dataclasses():
    """Under each script's heading, one row per field of its dataclasses, in their order, each row as the code
    says (default, help, choices), and no row for a flag that does not exist."""
    for script, text in sections(FLAGS).items():
        documented = re.findall(r"^\| `--(\w+)` \|", text, flags=re.M)
        expected = []
        for config in TABLES[script]:
            for f in dataclasses.fields(config):
                assert table_row(f) in text, \
                    f"docs/flags.md row for {config.__name__}.{f.name} ({script}) is out of date:\n{table_row(f)}"
                expected.append(f.name)
        assert documented == expected, f"docs/flags.md, {script}: rows {documented}, fields {expected}"


def test_ci_runs_the_readme_test_command():
    ci_lines = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read().strip().splitlines()
    blocks = re.findall(r"```bash\n(.*?)\n```", README, flags=re.DOTALL)
    test_command = next(b for b in blocks if "pytest" in b)
    assert ci_lines[-1] == test_command


if __name__ == "__main__":
    for script_name, configs in TABLES.items():
        print(f"## {script_name}\n")
        for config_class in configs:
            print(f"{config_class.__name__}:\n\n| flag | default | meaning |\n| --- | --- | --- |")
            print("\n".join(table_row(field) for field in dataclasses.fields(config_class)) + "\n")
