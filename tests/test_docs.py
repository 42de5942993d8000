"""The docs are the manual: docs/flags.md's tables match the run dataclasses, `--help` lists every flag, every
relative link leads to a file and a heading that exist, each run the docs show starts in a folder of its own,
and CI runs the README's test command. `python tests/test_docs.py` prints docs/flags.md's tables from the
code."""
import dataclasses
import os
import re
import shlex
import subprocess
import sys

import pytest

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
from test_readme_commands import DOCS, code_blocks, runnable, split_commands

README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
FLAGS = open(os.path.join(ROOT, "docs", "flags.md"), encoding="utf-8").read()

# Each script and the dataclasses whose fields are its flags, as docs/flags.md documents them under its
# heading. bench.py also takes train.py's loop, layout and model flags (documented under train.py) and passes
# them through.
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
HELP = {**TABLES, "bench.py": (bench.BenchConfig, bench.BenchRunConfig, GPTConfig)}   # what each parser takes


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
    scripts = {name for name in os.listdir(ROOT) if name.endswith(".py")
               and "parse_args(" in (text := open(os.path.join(ROOT, name), encoding="utf-8").read())
               and 'if __name__ == "__main__":' in text}
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
                    f"docs/flags.md row for {config.__name__}.{f.name} is out of date:\n{table_row(f)}"
                expected.append(f.name)
        assert documented == expected, f"docs/flags.md, {script}: rows {documented}, fields {expected}"


def help_groups(text: str) -> dict[str, tuple[list[str], str]]:
    """{argument group's title: (its flags in order, its text)} of an argparse --help output."""
    groups, title = {}, None
    for line in text.splitlines():
        if re.fullmatch(r"\S.*:", line):
            title = line[:-1]
            groups[title] = ([], "")
        elif title is not None:
            flags, body = groups[title]
            flag = re.match(r"  --(\w+)", line)
            groups[title] = (flags + [flag.group(1)] if flag else flags, body + line + "\n")
    return groups


@pytest.mark.parametrize("script", sorted(HELP))
def test_help_lists_every_flag(script):
    """`python SCRIPT --help` prints one group per dataclass of the script, holding each of its fields as a
    flag with its help text (compared without whitespace: argparse wraps lines)."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    groups = help_groups(result.stdout)
    printed = {title: flags for title, (flags, _) in groups.items() if title.endswith("Config")}
    assert printed == {c.__name__: [f.name for f in dataclasses.fields(c)] for c in HELP[script]}
    for config in HELP[script]:
        text = "".join(groups[config.__name__][1].split())
        for f in dataclasses.fields(config):
            assert "".join(f.metadata["help"].split()) in text, f"{script} --help: no help for --{f.name}"


def without_fences(text: str) -> str:
    """Markdown text without its fenced blocks, whose lines are neither headings nor links."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def anchors(text: str) -> set[str]:
    """GitHub's ids for the headings of a Markdown text: a link's text kept, lowercase, punctuation other than
    '-' and '_' dropped, spaces to '-'; a repeated id gets -1, -2, ..."""
    ids = []
    for heading in re.findall(r"^#{1,6} (.+?)\s*$", without_fences(text), flags=re.M):
        plain = re.sub(r"\[([^]]*)\]\([^)]*\)", r"\1", heading)
        slug = re.sub(r"[^\w\- ]", "", plain.lower()).replace(" ", "-")
        ids.append(f"{slug}-{ids.count(slug)}" if slug in ids else slug)
    return set(ids)


def test_relative_links_lead_to_files_and_headings():
    """Every relative link and image of README.md and docs/*.md names a file that exists and, after '#', one
    of its headings (the README links into docs/, the docs back to the README's sections, and from docs/ the
    plot is ../assets/)."""
    broken, checked = [], 0
    for path in DOCS:
        text = without_fences(open(path, encoding="utf-8").read())
        text = re.sub(r"`[^`\n]*`", "", text)   # inline code holds no links either
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):   # https:, mailto:
                continue
            checked += 1
            file_part, _, fragment = target.partition("#")
            file = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
            where = f"{os.path.relpath(path, ROOT)}: ({target})"
            if not os.path.exists(file):
                broken.append(f"{where}: no file {os.path.relpath(file, ROOT)}")
            elif fragment and not (file.endswith(".md")
                                   and fragment in anchors(open(file, encoding="utf-8").read())):
                broken.append(f"{where}: no heading #{fragment} in {os.path.relpath(file, ROOT)}")
    assert checked > 50, f"only {checked} relative links found"
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_each_run_the_docs_show_starts_in_a_folder_of_its_own():
    """test_readme_commands.py runs every command of README.md and docs/ in order in one folder, where a run
    from scratch or an export into a folder that an earlier command filled is refused: checked here by
    reading, in a second."""
    writes = {"train.py": "out_dir", "finetune_lora.py": "out_dir", "hf_gpt2.py": "out"}
    defaults = {script: next(f.default for f in dataclasses.fields(TABLES[script][0]) if f.name == flag)
                for script, flag in writes.items()}
    used = {}
    for path in DOCS:
        for block in code_blocks(open(path, encoding="utf-8").read(), "bash"):
            for command in split_commands(block):
                words = shlex.split(command) if runnable(command)[0] == "run" else []
                script = next((w for w in words if w.endswith(".py")), None)
                flags = dict(w[2:].partition("=")[::2] for w in words if w.startswith("--"))
                if script not in writes or "dry_run" in flags or flags.get("init_from") == "resume":
                    continue
                folder = flags.get(writes[script], defaults[script])
                assert folder not in used, f"`{command}` writes {folder}, which `{used[folder]}` wrote before"
                used[folder] = command
    assert len(used) > 15


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


def test_readme_file_map_gives_every_scripts_line_count():
    """The file map's lines column is what `wc -l` counts: every top-level script has a row, with its count."""
    rows = dict(re.findall(r"^\| [\d ]*\| \[`([\w.]+\.py)`\]\([\w.]+\) \| (\d+) \|", README, re.MULTILINE))
    scripts = sorted(name for name in os.listdir(ROOT) if name.endswith(".py"))
    assert sorted(rows) == scripts
    for name in scripts:
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            assert int(rows[name]) == sum(1 for _ in f), name
