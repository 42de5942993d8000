"""eval_lm.py: lm-evaluation-harness end to end on a local task, and perplexity, both against log-likelihoods
computed here directly from the model's full logits."""
import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, import_extra, run_script
from eval_lm import EvalConfig, default_output, make_adapter_class, rolling_windows, score_continuations
from gpt2_weights import go_offline_if_hub_unreachable
from checkpoints import save_checkpoint
from tokenization import get_tokenizer
from model import GPT, GPTConfig

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

QUESTIONS = [
    ("The capital of France is", ["Paris", "a small dog", "blue", "42"], 0),
    ("Two plus two equals", ["four", "the moon", "seven hundred", "green"], 0),
    ("Romeo loved", ["Juliet", "Hamlet's father", "nobody at all", "bread"], 0),
    ("The sun rises in the", ["east", "west of the river", "cupboard", "north"], 0),
    ("Water freezes at zero degrees", ["Celsius", "Fahrenheit or so", "Kelvin", "nothing"], 1),
    ("A cat says", ["meow", "woof woof", "moo", "hello there"], 0),
    ("To be, or not to be:", ["that is the question", "a banana", "yes", "maybe later"], 0),
    ("Caffè, naïve and 東京 are", ["words", "numbers like 3.14", "fish", "verbs"], 2),
    ("One, two, three,", ["four", "ten", "the end of it", "zero"], 3),
    ("The opposite of hot is", ["cold", "warm water", "tepid", "fire"], 1),
]


def random_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=50257))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def direct_log_likelihood(model: GPT, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context) from one full forward pass over the unpadded sequence."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        log_probs = F.log_softmax(model(ids[:, :-1])[0].float(), dim=-1)      # (T - 1, V)
    positions = range(len(context) - 1, len(context) + len(continuation) - 1)
    return sum(log_probs[t, ids[0, t + 1]].item() for t in positions)


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> tuple[GPT, str]:
    model = random_gpt()
    out = tmp_path_factory.mktemp("out")
    save_checkpoint({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config)},
                    str(out / "ckpt.pt"))
    return model, str(out)


def test_score_continuations_matches_full_forward_passes():
    """Batched, right-padded, LM head only at the continuation, too-long sequences cut to the window: the
    same numbers as separate full forward passes over what fits."""
    model = random_gpt(1)
    rng = np.random.default_rng(0)
    pairs = [(rng.integers(0, 50257, n).tolist(), rng.integers(0, 50257, m).tolist())
             for n, m in ((1, 1), (5, 3), (20, 7), (40, 4), (3, 12))]
    scored = score_continuations(model, pairs)
    for (context, continuation), (log_p, _) in zip(pairs, scored):
        ids = (context + continuation)[-33:]
        expected = direct_log_likelihood(model, ids[:len(ids) - len(continuation)], continuation)
        assert log_p == pytest.approx(expected, rel=1e-5, abs=1e-4)


def test_score_continuations_waits_for_the_device_once(monkeypatch):
    """The scores of a batch come back to the host together: no .item() per row and one .tolist() per result
    (each is a wait for the GPU), and the greedy flags are those of an argmax computed here."""
    model = random_gpt(1)
    pairs = [([1, 2, 3], [4, 5]), ([7], [8]), ([9, 10], [11, 12, 13])]
    with torch.no_grad():
        logits = [model(torch.tensor([c + t[:-1]]))[0, -len(t):] for c, t in pairs]
    expected_greedy = [bool((row.argmax(-1) == torch.tensor(t)).all()) for row, (_, t) in zip(logits, pairs)]
    calls = {"item": 0, "tolist": 0}
    item, tolist = torch.Tensor.item, torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "item", lambda t: (calls.__setitem__("item", calls["item"] + 1), item(t))[1])
    monkeypatch.setattr(torch.Tensor, "tolist",
                        lambda t: (calls.__setitem__("tolist", calls["tolist"] + 1), tolist(t))[1])
    with torch.no_grad():
        scored = score_continuations(model, pairs)
    assert calls == {"item": 0, "tolist": 2}
    assert [greedy for _, greedy in scored] == expected_greedy


def test_rolling_windows_predict_every_token_once():
    for n_tokens, block_size in ((2, 4), (9, 4), (10, 4), (11, 4), (100, 7)):
        predicted = [t for start, end in rolling_windows(n_tokens, block_size) for t in range(start + 1, end)]
        assert predicted == list(range(1, n_tokens))
        assert all(end - start - 1 <= block_size for start, end in rolling_windows(n_tokens, block_size))


@pytest.mark.slow
def test_local_task_accuracy_equals_hand_computation(checkpoint_dir, tmp_path):
    """A multiple-choice task in the harness's local-dataset format (dataset_path: json, data_files) runs end
    to end through eval_lm.py; acc and acc_norm equal the argmax over log-likelihoods computed here."""
    import_extra("lm_eval")
    model, out = checkpoint_dir
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tmp_path / "tiny_choice.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                            for q, c, a in QUESTIONS), encoding="utf-8")
    (tasks / "tiny_choice.yaml").write_text(
        "task: tiny_choice\n"
        "dataset_path: json\n"
        "dataset_name: null\n"
        "dataset_kwargs:\n"
        f"  data_files: {data}\n"
        "test_split: train\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\n"
        "metric_list:\n"
        "  - metric: acc\n"
        "  - metric: acc_norm\n", encoding="utf-8")
    output = tmp_path / "results.json"
    result = run_script("eval_lm.py", f"--out_dir={out}", "--tasks=tiny_choice", f"--include_path={tasks}",
                        f"--output={output}", "--batch_size=3",
                        env={**OFFLINE, "HF_DATASETS_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tiny_choice" in result.stdout and "acc_norm" in result.stdout          # the table
    measured = json.loads(output.read_text())["results"]["tiny_choice"]

    # By hand: the harness puts " " between question and choice; acc_norm divides by the choice's length.
    tokenizer = get_tokenizer()
    correct, correct_norm = [], []
    for question, choices, answer in QUESTIONS:
        context = tokenizer.encode(question)
        log_ps = [direct_log_likelihood(model, context, tokenizer.encode(question + " " + c)[len(context):])
                  for c in choices]
        correct.append(int(np.argmax(log_ps)) == answer)
        correct_norm.append(int(np.argmax([lp / len(c) for lp, c in zip(log_ps, choices)])) == answer)
    print(f"local task: acc {measured['acc,none']} (by hand {np.mean(correct)}), "
          f"acc_norm {measured['acc_norm,none']} (by hand {np.mean(correct_norm)})")
    assert measured["acc,none"] == pytest.approx(np.mean(correct), abs=1e-12)
    assert measured["acc_norm,none"] == pytest.approx(np.mean(correct_norm), abs=1e-12)


def test_perplexity_of_a_token_file_equals_direct_computation(checkpoint_dir, tmp_path):
    """Each token t >= 1 of [<|endoftext|>] + file is predicted from the tokens before it in its window of
    block_size (windows start every block_size tokens); 70 tokens span three windows."""
    model, out = checkpoint_dir
    tokens = np.random.default_rng(1).integers(0, 50257, 70).astype(np.uint16)
    tokens.tofile(tmp_path / "val.bin")
    result = run_script("eval_lm.py", f"--out_dir={out}", f"--perplexity={tmp_path / 'val.bin'}",
                        f"--output={tmp_path / 'ppl.json'}", "--dtype=float32")   # the reference is fp32
    assert result.returncode == 0, result.stderr
    measured = json.loads((tmp_path / "ppl.json").read_text())
    stream = [50256] + tokens.tolist()
    block_size = model.config.block_size
    nll = []
    with torch.no_grad():
        for t in range(1, len(stream)):
            start = (t - 1) // block_size * block_size
            logits = model(torch.tensor([stream[start:t]]))[0, -1]
            nll.append(-F.log_softmax(logits, dim=-1)[stream[t]].item())
    assert measured["tokens"] == 70
    assert measured["perplexity"] == pytest.approx(math.exp(np.mean(nll)), rel=1e-5)
    # --limit=1 was accepted and ignored with --perplexity; now it evaluates the first window's predictions.
    result = run_script("eval_lm.py", f"--out_dir={out}", f"--perplexity={tmp_path / 'val.bin'}", "--limit=1",
                        f"--output={tmp_path / 'ppl1.json'}", "--dtype=float32")
    assert result.returncode == 0, result.stderr
    limited = json.loads((tmp_path / "ppl1.json").read_text())
    assert limited["tokens"] == block_size < 70
    assert limited["perplexity"] == pytest.approx(math.exp(np.mean(nll[:block_size])), rel=1e-5)


def test_each_run_writes_its_own_results_file(checkpoint_dir, tmp_path):
    """Every run wrote out_dir/eval.json, so a second evaluation overwrote the first one's results. Now the
    default file is named after what the run evaluates; --output still picks the file."""
    model, out = checkpoint_dir
    rng = np.random.default_rng(2)
    for name in ("val.bin", "test.bin"):
        rng.integers(0, 50257, 40).astype(np.uint16).tofile(tmp_path / name)
        result = run_script("eval_lm.py", f"--out_dir={out}", f"--perplexity={tmp_path / name}")
        assert result.returncode == 0, result.stderr
        assert f"results: {os.path.join(out, f'eval-perplexity-{name}.json')}" in result.stdout
    results = {name: json.loads(open(os.path.join(out, f"eval-perplexity-{name}.json")).read())
               for name in ("val.bin", "test.bin")}
    assert {r["file"] for r in results.values()} == {str(tmp_path / "val.bin"), str(tmp_path / "test.bin")}
    assert results["val.bin"]["perplexity"] != results["test.bin"]["perplexity"]
    assert not os.path.exists(os.path.join(out, "eval.json"))


@pytest.mark.parametrize("flags, expected", [
    (dict(tasks="hellaswag"), "out/eval-hellaswag.json"),
    (dict(tasks="hellaswag, arc_easy", num_fewshot=5, limit=200),
     "out/eval-hellaswag+arc_easy-5shot-limit200.json"),
    (dict(tasks="arc_easy", num_fewshot=0), "out/eval-arc_easy-0shot.json"),
    (dict(tasks="hellaswag", init_from="gpt2-medium"), "./eval-gpt2-medium-hellaswag.json"),
    (dict(tasks="hellaswag", init_from="models/hf-out/"), "./eval-hf-out-hellaswag.json"),
    (dict(perplexity="data/shakespeare/val.bin"), "out/eval-perplexity-val.bin.json"),
    (dict(perplexity="data/shakespeare/val.bin", limit=4), "out/eval-perplexity-val.bin-limit4.json"),
    (dict(perplexity="my notes.txt", out_dir="runs/a"), "runs/a/eval-perplexity-my_notes.txt.json"),
])
def test_default_output_is_named_after_the_run(flags, expected):
    assert default_output(EvalConfig(**flags)) == expected


def test_default_output_of_a_long_task_list_stays_short_and_distinct():
    tasks = [f"mmlu_subject_number_{i}" for i in range(40)]
    names = {default_output(EvalConfig(tasks=",".join(tasks[:n]))) for n in (30, 31, 40)}
    assert len(names) == 3 and all(len(os.path.basename(n)) < 120 for n in names)
    assert all(os.path.basename(n).startswith("eval-mmlu_subject_number_0+") for n in names)


def test_generate_until_is_greedy_and_stops_at_the_stop_sequence():
    import_extra("lm_eval")
    model, tokenizer = random_gpt(2), get_tokenizer()
    adapter = make_adapter_class()(model, tokenizer, 4, "cpu", torch.float32)
    context = "Once upon a time"
    ids = tokenizer.encode(context)
    greedy = []
    with torch.no_grad():
        for _ in range(12):
            greedy.append(model(torch.tensor([ids + greedy]))[0, -1].argmax().item())
    text = tokenizer.decode(greedy)
    stop = text[len(text) // 2:len(text) // 2 + 2]
    request = types.SimpleNamespace(args=(context, {"until": [stop], "max_gen_toks": 12}))
    unstopped = types.SimpleNamespace(args=(context, {"until": ["\x00"], "max_gen_toks": 12}))
    assert adapter.generate_until([request, unstopped]) == [text[:text.index(stop)], text]


# --- without a network ---

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def closed_port() -> int:
    """A local TCP port that nothing listens on: connecting to it is refused at once, as with no network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def online_env(monkeypatch):
    """No offline variable set (whatever the shell had), restored after the test even where the probe sets
    one: monkeypatch only restores the variables it has touched."""
    for name in OFFLINE_VARIABLES:
        monkeypatch.setenv(name, "0")
        monkeypatch.delenv(name)
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_unreachable_hub_turns_on_offline_mode(online_env):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    online_env.setenv("HF_ENDPOINT", endpoint)
    assert go_offline_if_hub_unreachable(timeout_s=5) == endpoint
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_reachable_hub_stays_online(online_env):
    with socket.create_server(("127.0.0.1", 0)) as server:
        online_env.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert go_offline_if_hub_unreachable(timeout_s=5) is None
    assert "HF_HUB_OFFLINE" not in os.environ


@pytest.mark.parametrize("variable, value", [("HF_HUB_OFFLINE", "0"), ("HF_DATASETS_OFFLINE", "1"),
                                             ("https_proxy", "http://127.0.0.1:3128")])
def test_no_probe_when_the_user_decided_or_a_proxy_carries_the_traffic(online_env, variable, value):
    """The user's own offline setting, either way, is kept; through a proxy, a direct connection proves
    nothing about the Hub, so the libraries are left to find out."""
    online_env.setenv("HF_ENDPOINT", f"https://127.0.0.1:{closed_port()}")
    online_env.setenv(variable, value)
    assert go_offline_if_hub_unreachable(timeout_s=5) is None
    assert os.environ.get("HF_HUB_OFFLINE") == (value if variable == "HF_HUB_OFFLINE" else None)


@pytest.mark.slow
def test_hub_task_without_a_network_is_one_line(checkpoint_dir, tmp_path):
    """Without a network, `eval_lm.py --tasks=hellaswag` printed a 40-line traceback after ~25 s of
    huggingface_hub's retries (1 + 2 + 4 + 8 + 8 s). A closed local port stands in for the Hub (HF_ENDPOINT),
    with no offline variable set, as on a machine without a network: now one line saying so, and no retries
    (the rest of the time is the harness indexing its tasks)."""
    import_extra("lm_eval")
    _, out = checkpoint_dir
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_VARIABLES}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", HF_HOME=str(tmp_path / "hf"))
    start = time.perf_counter()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "eval_lm.py"), f"--out_dir={out}",
                             "--tasks=hellaswag", "--limit=5"], capture_output=True, text=True, env=env,
                            timeout=300, cwd=tmp_path)
    print(f"hellaswag without a network: {time.perf_counter() - start:.1f} s")
    assert result.returncode == 1
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --tasks=hellaswag: the Hugging Face Hub"), lines
    assert "is unreachable" in lines[0]


SHOTS = [("The capital of Italy is", ["Rome", "a red car", "cold", "7"], 0),
         ("Three plus four equals", ["a fish", "seven", "the sea", "blue"], 1)]


@pytest.mark.slow
def test_few_shot_task_puts_the_solved_examples_before_each_question(tmp_path):
    """--num_fewshot=2 end to end: the harness puts two solved examples from the task's fewshot split before
    every question (first_n: the first two, in order, so the context is known here: "question answer"
    joined by the harness's default delimiters, " " and a blank line), and acc equals the argmax over
    log-likelihoods computed here with that context; the 0-shot answers differ, so the shots were used."""
    pytest.importorskip("lm_eval")
    torch.manual_seed(3)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=128, vocab_size=50257))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.eval()
    out = tmp_path / "out"
    out.mkdir()
    save_checkpoint({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config)},
                    str(out / "ckpt.pt"))
    files = {}
    for split, rows in (("shots", SHOTS), ("questions", QUESTIONS)):
        files[split] = tmp_path / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                                        for q, c, a in rows), encoding="utf-8")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_fewshot.yaml").write_text(
        "task: tiny_fewshot\n"
        "dataset_path: json\n"
        "dataset_name: null\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    train: {files['shots']}\n"
        f"    test: {files['questions']}\n"
        "fewshot_split: train\n"
        "test_split: test\n"
        "fewshot_config:\n"
        "  sampler: first_n\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\n"
        "metric_list:\n"
        "  - metric: acc\n", encoding="utf-8")
    output = tmp_path / "results.json"
    result = run_script("eval_lm.py", f"--out_dir={out}", "--tasks=tiny_fewshot", f"--include_path={tasks}",
                        "--num_fewshot=2", f"--output={output}", "--batch_size=4", "--dtype=float32",
                        env={**OFFLINE, "HF_DATASETS_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(output.read_text())
    assert results["n-shot"]["tiny_fewshot"] == 2
    tokenizer = get_tokenizer()
    shots = "".join(f"{q} {c[a]}\n\n" for q, c, a in SHOTS)

    def chosen(prefix: str) -> list[int]:
        answers = []
        for question, choices, _ in QUESTIONS:
            context = tokenizer.encode(prefix + question)
            continuations = [tokenizer.encode(f"{prefix}{question} {c}")[len(context):] for c in choices]
            log_ps = [direct_log_likelihood(model, context, continuation) for continuation in continuations]
            answers.append(int(np.argmax(log_ps)))
        return answers
    two_shot, zero_shot = chosen(shots), chosen("")
    assert two_shot != zero_shot
    accuracy = np.mean([answer == a for answer, (_, _, a) in zip(two_shot, QUESTIONS)])
    assert results["results"]["tiny_fewshot"]["acc,none"] == pytest.approx(accuracy, abs=1e-12)
