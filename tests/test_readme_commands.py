"""Every command the README (and docs/) shows is run here, in the order a reader meets them (README.md, then
docs/*.md by file name), in one scratch folder, as a user would type it (issue 13: several README commands failed
as written). So a command that reads what another one writes comes after it in that order, and each run has a
folder of its own (tests/test_docs.py checks the folders by reading).

Commands are shortened by flags appended at the end (the last value of a flag wins): a few steps of a tiny model
instead of hours of a big one. Commands that need the network (a Hugging Face dataset or model, an lm-eval
benchmark) must stop with one `error:` line here, where there is none. A few cannot run on one CPU machine as
written and are rewritten the least that makes them run: 8 GPUs become 2 (or 4) CPU processes (and --tp=4 or 8
becomes --tp=2), two nodes one, slurm's `srun` and `scontrol` are stand-ins, TensorBoard's server becomes its
`--inspect` summary, and the lm-eval command runs the README's own local task instead of a download. The files a
reader is asked to bring (prompt.txt, alpaca.json, notes, a task of their own) are made from what the README shows
of them."""
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import ROOT, write_dataset

DOCS = [os.path.join(ROOT, "README.md")] + sorted(
    os.path.join(ROOT, "docs", name) for name in (os.listdir(os.path.join(ROOT, "docs"))
                                                    if os.path.isdir(os.path.join(ROOT, "docs")) else [])
    if name.endswith(".md"))

# Flags that shrink each script's run to seconds. The model is tiny, so the pipeline commands get 8 layers
# (interleaved 1F1B over 4 stages needs 2 per virtual stage) and micro-batches that divide the batch.
SHORT = {
    "train.py": "--max_iters=4 --eval_interval=2 --eval_iters=1 --log_interval=1 --gradient_accumulation_steps=1 "
                "--compile=False --n_head=2 --n_embd=32 --block_size=128",
    "finetune_lora.py": "--max_iters=2 --eval_interval=1 --eval_iters=1 --batch_size=2 --gradient_accumulation_steps=1",
    "generate.py": "--max_new_tokens=8",
    "eval_lm.py": "--limit=4 --batch_size=32",
    "bench.py": "--repeats=1 --warmup_steps=1 --train_steps=2 --sample_tokens=8 --sample_batch_sizes=1 "
                "--soak_steps=4 --n_layer=2 --n_head=2 --n_embd=32 --block_size=32 --batch_size=4 --compile=False",
}
NETWORK_TASKS = ("hellaswag", "lambada_openai", "arc_easy")


def code_blocks(text: str, language: str) -> list[str]:
    """The bodies of the fenced blocks of `language` in a Markdown text."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def split_commands(block: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments dropped, `a && b` split in two
    (neither inside quotes nor inside `$(...)`)."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        quote, depth, current = None, 0, ""
        i = 0
        while i < len(line):
            ch = line[i]
            if quote:
                quote = None if ch == quote else quote
            elif ch in "'\"":
                quote = ch
            elif line.startswith("$(", i):
                depth += 1
            elif ch == ")" and depth:
                depth -= 1
            elif depth == 0 and ch == "#" and (i == 0 or line[i - 1].isspace()):
                break
            elif depth == 0 and line.startswith("&&", i):
                commands.append(current.strip())
                current, i = "", i + 2
                continue
            current += ch
            i += 1
        commands.append(current.strip())
    return [c for c in commands if c]


def needs_network(command: str) -> bool:
    """A Hugging Face id (`owner/name`) as dataset, data or model, GPT-2's weights, or an lm-eval benchmark."""
    words = shlex.split(command)
    for word in words:
        name, _, value = word.partition("=")
        if name in ("--dataset", "--data") and "/" in value and not os.path.exists(value):
            return True
        if name == "--init_from" and value.startswith("gpt2"):
            return True
        if name == "--tasks" and any(task in value.split(",") for task in NETWORK_TASKS):
            return True
    return False


def is_assignment(command: str) -> bool:
    """`name=value` or `name=$(...)` alone: a shell variable, not a command."""
    return re.fullmatch(r"[A-Za-z_]\w*=(\$\(.*\)|\S+)", command) is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def runnable(command: str) -> tuple[str, str]:
    """(how to check it, the command to run): 'run' must succeed, 'offline' must stop with one error line,
    'skip' is not run (the reason in place of the command)."""
    if command.startswith("pip install"):
        return "skip", ".ci/run installs the requirements this way before the tests"
    if command.startswith("python -m pytest"):
        return "skip", "this is the test run itself"
    if command.startswith("tensorboard "):
        return "run", command.replace("tensorboard ", "tensorboard --inspect ", 1)
    if command.startswith("lm_eval "):   # the README's own task (my_tasks/) instead of a download
        return "run", re.sub(r"--tasks \S+", "--tasks my_task --include_path my_tasks --limit 4", command)
    if is_assignment(command):
        return "run", command             # a shell variable for the commands after it
    if needs_network(command):
        return "offline", command
    script = next((w for w in shlex.split(command) if w.endswith(".py")), None)
    if script is None or command.startswith("python -c"):
        return "run", command
    short = SHORT.get(script, "")
    if script == "train.py" and "--dry_run" in command:
        short = ""                         # the dry run builds nothing: it runs at full size in a second
    elif script == "train.py":
        pipelined = "--pp=" in command
        batch = 8 if pipelined else 2
        short += f" --n_layer={8 if pipelined else 2} --batch_size={batch}"
        if "--init_from=resume" in command:
            short = short.replace("--max_iters=4", "--max_iters=6")
    elif script == "finetune_lora.py" and "--init_from=resume" in command:
        short = short.replace("--max_iters=2", "--max_iters=3")
    if command.startswith(("torchrun", "srun torchrun")):
        pp = int(re.search(r"--pp=(\d+)", command).group(1)) if "--pp=" in command else 1
        # --tp=4 or 8 becomes 2 (the tiny model's 2 heads), on pp x 2 processes: one replica
        tp = 2 if "--tp=" in command else 1
        command = re.sub(r"--tp=\d+", f"--tp={tp}", command)
        if "--nproc-per-node=8" in command:
            nproc = {1: 2, 2: 4}.get(pp, pp) if tp == 1 else pp * tp
        else:
            nproc = None
        if nproc:
            command = command.replace("--nproc-per-node=8", f"--nproc-per-node={nproc}")
        command = command.replace("--nnodes=2", "--nnodes=1").replace(":29500", f":{free_port()}")
    redirect = command.find(" > ")
    if redirect >= 0:
        return "run", f"{command[:redirect]} {short}{command[redirect:]}"
    return "run", f"{command} {short}".strip()


def make_readers_files(folder: str, docs: str) -> None:
    """The files the README asks a reader to bring, made from what it shows of them; and a stand-in for the
    OpenWebText download, which needs the network (its prepare.py command is checked for its offline error)."""
    def write(name: str, text: str) -> None:
        os.makedirs(os.path.dirname(os.path.join(folder, name)) or folder, exist_ok=True)
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
    alpaca = next(b for b in code_blocks(docs, "json") if '"instruction"' in b)
    write("alpaca.json", alpaca)
    write("prompt.txt", "ROMEO:\n")
    write("notes.txt", "To be, or not to be: that is the question.\n" * 20)
    write("notes/a.md", "# Notes\nSome words of my own, " * 50)
    write("chats.jsonl", "".join(json.dumps({"text": f"chat number {i}: hello there"}) + "\n" for i in range(20)))
    task = next(b for b in code_blocks(docs, "yaml") if "task: my_task" in b)
    write("my_tasks/my_task.yaml", task)
    write("my_tasks/my_task.jsonl", "".join(
        json.dumps({"question": f"What comes after {i}?", "choices": [str(i + 1), str(i + 7)], "answer": 0}) + "\n"
        for i in range(6)))
    rng = np.random.default_rng(0)
    write_dataset(os.path.join(folder, "data", "openwebtext"), rng.integers(0, 50257, 20_000), 0.1, 50257)
    for name in ("scontrol", "srun"):   # slurm's tools, for one node: this machine
        write(f"bin/{name}", "#!/bin/sh\n" + ('echo localhost\n' if name == "scontrol" else 'exec "$@"\n'))
        os.chmod(os.path.join(folder, "bin", name), 0o755)


# --- what some commands must produce, beyond their exit status (issue 24) ---

def generated(*flags: str) -> str:
    """What generate.py prints on stdout for these flags, run in this process (a fraction of a second, where
    a fresh Python would take seconds to import torch)."""
    import contextlib
    import io
    import generate
    text = io.StringIO()
    with contextlib.redirect_stdout(text), contextlib.redirect_stderr(io.StringIO()):
        generate.main(list(flags))
    return text.getvalue()


def generate_problems(line: str, result: subprocess.CompletedProcess, folder: str) -> list[str]:
    """`--prompt_file=prompt.txt --num_samples=3 --temperature=0.9 --top_p=0.95`: three samples, each the
    prompt file's text and more. Against the same seed: without --top_p the draw differs (the nucleus cut
    changes which token a uniform draw lands on), and --top_k=1 gives greedy decoding's text."""
    prompt = open(os.path.join(folder, "prompt.txt"), encoding="utf-8").read()
    samples = result.stdout.split("\n" + "-" * 40 + "\n")
    problems = [] if len(samples) == 3 else [f"{len(samples)} samples printed, not 3"]
    problems += [f"sample {i} does not continue the prompt file: {sample!r}" for i, sample in enumerate(samples)
                 if not (sample.startswith(prompt) and len(sample.rstrip("\n")) > len(prompt))]
    base = [f"--out_dir={folder}/out", f"--prompt_file={folder}/prompt.txt", "--max_new_tokens=8"]
    if generated(*base, "--temperature=0.9") == generated(*base, "--temperature=0.9", "--top_p=0.95"):
        problems.append("--top_p=0.95 draws the same text as no --top_p with the same seed")
    if generated(*base, "--temperature=0.9", "--top_k=1") != generated(*base, "--temperature=0"):
        problems.append("--top_k=1 does not give the greedy (--temperature=0) text")
    return problems


def windowed_mean_nll(model, stream: list[int]) -> float:
    """Mean negative log-likelihood of every token of stream after the first, each predicted from the tokens
    before it in its window: windows of block_size inputs start every block_size tokens."""
    import torch
    import torch.nn.functional as F
    T, total = model.config.block_size, 0.0
    with torch.no_grad():
        for start in range(0, len(stream) - 1, T):
            window = torch.tensor([stream[start:start + T + 1]])
            total += F.cross_entropy(model(window[:, :-1])[0], window[0, 1:], reduction="sum").item()
    return total / (len(stream) - 1)


def perplexity_problems(line: str, result: subprocess.CompletedProcess, folder: str) -> list[str]:
    """`eval_lm.py --perplexity=FILE --limit=4`: its results file holds the loss of the first 4 windows of
    [<|endoftext|>] + the file's tokens (a .bin as it is, a text file encoded), computed here from the
    checkpoint, and the perplexity exp(loss), a finite number."""
    import math
    import numpy as np
    from checkpoints import load_checkpoint, model_from_checkpoint
    from tokenization import load_tokenizer
    file = re.search(r"--perplexity=(\S+)", line).group(1)
    limit = int(re.findall(r"--limit=(\d+)", line)[-1])
    results = os.path.join(folder, "out", f"eval-perplexity-{os.path.basename(file)}-limit{limit}.json")
    if not os.path.isfile(results):
        return [f"no results file {results}"]
    measured = json.load(open(results))
    checkpoint = load_checkpoint(os.path.join(folder, "out", "ckpt.pt"))
    model = model_from_checkpoint(checkpoint, dropout=0.0).eval()
    tokenizer = load_tokenizer(checkpoint.get("tokenizer"))
    path = os.path.join(folder, file)
    tokens = np.fromfile(path, dtype=np.uint16).tolist() if file.endswith(".bin") else \
        tokenizer.encode(open(path, encoding="utf-8").read())
    stream = ([tokenizer.eot_token] + tokens)[:limit * model.config.block_size + 1]
    problems = []
    if measured["tokens"] != len(stream) - 1:
        problems.append(f"{measured['tokens']} tokens evaluated, not {len(stream) - 1}")
    if not (math.isfinite(measured["perplexity"]) and measured["perplexity"] == math.exp(measured["loss"])):
        problems.append(f"perplexity {measured['perplexity']} is not exp(loss {measured['loss']})")
    by_hand = windowed_mean_nll(model, stream)
    if not math.isclose(measured["loss"], by_hand, rel_tol=1e-5):
        problems.append(f"loss {measured['loss']} nats/token, computed here {by_hand}")
    return problems


def merge_problems(line: str, result: subprocess.CompletedProcess, folder: str) -> list[str]:
    """`finetune_lora.py --init_from=resume --out_dir=out-lora --merge`: out-lora/ckpt.pt holds the base's
    weights with W + (alpha / R) B A, from the adapter file, in place of each adapted weight, the rest as
    they were."""
    import torch
    import lora
    from checkpoints import load_checkpoint
    adapter = lora.load_adapter(os.path.join(folder, "out-lora", "adapter.pt"))
    base = load_checkpoint(os.path.join(folder, adapter["base"]["path"]))["model"]
    merged = load_checkpoint(os.path.join(folder, "out-lora", "ckpt.pt"))["model"]
    if merged.keys() != base.keys():
        return [f"the merged checkpoint's weights are not the base's: {sorted(merged.keys() ^ base.keys())}"]
    scale, tensors = adapter["lora"]["alpha"] / adapter["lora"]["rank"], adapter["tensors"]
    problems, adapted = [], 0
    for name, weight in base.items():
        layer = name.removesuffix(".weight")
        expected = weight
        if f"{layer}.lora_A" in tensors:
            adapted += 1
            expected = weight + scale * tensors[f"{layer}.lora_B"] @ tensors[f"{layer}.lora_A"]
        if not torch.allclose(merged[name], expected, rtol=0, atol=1e-6):
            problems.append(f"{name}: merged weight is not base + (alpha / R) B A")
    if adapted == 0 or not any(t.abs().sum() > 0 for n, t in tensors.items() if n.endswith("lora_B")):
        problems.append("no trained adapter (B = 0 everywhere) to check the merge with")
    return problems


def tensor_parallel_problems(line: str, result: subprocess.CompletedProcess, folder: str) -> list[str]:
    """`torchrun ... train.py --tp=2 --sequence_parallel`: run again in float32, every logged loss equals one
    process's on the same flags (run here: a tiny run), up to float rounding: the split matmuls and the
    vocabulary-parallel loss sum in another order, 1e-5 on the losses of the initial weights (step 0's
    evaluation, step 1), and AdamW's first steps, which move each weight by about the learning rate whatever
    its gradient's size, let that grow to 1e-4 by step 4. (As written the command computes in --dtype=auto,
    bfloat16 on a CPU that has it, whose rounding alone moves these losses by 4e-5 to 7e-5 from float64's.)"""
    out_dir = re.search(r"--out_dir=(\S+)", line).group(1)
    flags = shlex.split(re.sub(r"--out_dir=\S+ ", "", line[line.index("train.py "):])) + ["--dtype=float32"]
    nproc = re.search(r"--nproc-per-node=(\d+)", line).group(1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    split_run, reference = out_dir + "-fp32", out_dir + "-one-process"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                    *flags, f"--out_dir={split_run}"], cwd=folder, check=True, capture_output=True, timeout=300,
                   env=env)
    one_process = [flag for flag in flags if not re.fullmatch(r"--tp=\d+|--sequence_parallel", flag)]
    subprocess.run([sys.executable, *one_process, f"--out_dir={reference}"], cwd=folder, check=True,
                   capture_output=True, timeout=300, env=env)
    def losses(run: str) -> dict:
        records = [json.loads(x) for x in open(os.path.join(folder, run, "metrics.jsonl"))]
        return {(r["step"], key): r[key] for r in records for key in ("loss", "val_loss") if key in r}
    split, one = losses(split_run), losses(reference)
    if split.keys() != one.keys() or len(split) < 4:
        return [f"logged {sorted(split)}, one process {sorted(one)}"]
    return [f"step {step} {key}: {split[step, key]} under --tp, {one[step, key]} on one process"
            for step, key in split if abs(split[step, key] - one[step, key]) > (3e-5 if step <= 1 else 3e-4)]


OUTPUT_CHECKS = {   # a command's words -> what it must produce
    ("generate.py", "--num_samples=3"): generate_problems,
    ("eval_lm.py", "--perplexity=data/shakespeare/val.bin"): perplexity_problems,
    ("eval_lm.py", "--perplexity=notes.txt"): perplexity_problems,
    ("finetune_lora.py", "--merge"): merge_problems,
    ("torchrun", "--nproc-per-node=2", "--tp=2", "--sequence_parallel"): tensor_parallel_problems,
}


def is_one_error_line(result: subprocess.CompletedProcess) -> bool:
    lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return result.returncode != 0 and len(errors) == 1 and "Traceback" not in result.stderr


@pytest.mark.slow
def test_every_readme_command_runs_as_written(tmp_path):
    """Each command block of the README, in order, in one folder: the commands that run here succeed, the ones
    that need the network stop with one error line, and those of OUTPUT_CHECKS produce what they must (the
    only test of several flags: before issue 24 an exit status of 0 was all that was asked of them). Before
    issue 13, `--decay_lr=False` was refused for its min_lr, the Hugging Face pipeline crashed past the
    context, the logging examples were refused because out/ckpt.pt existed, and eval_lm.py printed a 40-line
    traceback offline."""
    docs = "\n".join(open(path).read() for path in DOCS)
    folder = str(tmp_path)
    for name in os.listdir(ROOT):
        if name.endswith(".py") or name.startswith("requirements"):
            os.symlink(os.path.join(ROOT, name), os.path.join(folder, name))
    make_readers_files(folder, docs)
    env = {**os.environ, "PATH": f"{folder}/bin:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", "HEAD": "127.0.0.1",
           "SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "1", "SLURM_JOB_ID": "1",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    failures, ran, checked = [], 0, set()
    for block in code_blocks(docs, "bash"):
        variables = ""
        for command in split_commands(block):
            kind, line = runnable(command)
            if kind == "skip":
                continue
            if is_assignment(line):   # `head=$(...)` for the lines below it
                variables += line + "; "
                continue
            started = time.monotonic()
            result = subprocess.run(["bash", "-c", variables + line], cwd=folder, env=env, capture_output=True,
                                    text=True, timeout=300)
            ran += 1
            ok = is_one_error_line(result) if kind == "offline" else (
                result.returncode == 0 and "Traceback" not in result.stderr)
            if line.startswith("tensorboard --inspect"):   # it exits 0 on an empty folder too
                ok = ok and "Found event files in:" in result.stdout + result.stderr
            checks = [words for words in OUTPUT_CHECKS if ok and set(words) <= set(line.split())]
            problems = [p for words in checks for p in OUTPUT_CHECKS[words](line, result, folder)]
            checked.update(checks)
            ok = ok and not problems
            print(f"{'ok ' if ok else 'FAILED'} {time.monotonic() - started:5.1f} s {kind:7} {line}", flush=True)
            if problems:
                failures.append(f"`{command}` ran, but:\n" + textwrap.indent("\n".join(problems), "    "))
            elif not ok:
                lines = [x for x in (result.stdout + result.stderr).splitlines() if x.strip()]
                shown = [x for x in lines if x.startswith("error")][:3] or lines[-4:]
                failures.append(f"{'offline ' if kind == 'offline' else ''}`{command}` -> exit "
                                f"{result.returncode}:\n" + textwrap.indent("\n".join(shown), "    "))
    assert ran > 30, f"only {ran} README commands found"
    assert checked == set(OUTPUT_CHECKS), f"no command to check for {set(OUTPUT_CHECKS) - checked}"
    assert not failures, f"{len(failures)} README commands fail as written:\n" + "\n".join(failures)


def test_readme_test_command_is_what_ci_runs():
    """The README's test command is the one .ci/run runs on a clean clone, so it is tested by every CI run."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    test_command = next(c for b in code_blocks(readme, "bash") for c in split_commands(b)
                        if "pytest" in c and c.startswith("pip install"))
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert test_command in ci


def test_split_commands_reads_shell_blocks():
    """The parser the README test relies on: continuations, comments (not inside quotes) and &&."""
    block = ('python a.py --x=1 \\\n    --y="a # b"   # a comment\n# a whole comment\npython b.py && python c.py\n'
             'x=$([ -f a ] && echo b)   # c\n')
    assert split_commands(block) == ['python a.py --x=1      --y="a # b"', "python b.py", "python c.py",
                                     "x=$([ -f a ] && echo b)"]
