"""Tests for sppo.py and pairrm_lite.py. CPU only, no downloads: every model is built from a small
config with a fixed seed, saved to a temporary folder and loaded back with from_pretrained."""
import json
import math
import os
import subprocess
import sys

import signal

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


def report_bench(name, ours, theirs, unit, **extra):
    """Print one line and append it as JSON to bench.jsonl (or $SPPO_BENCH_FILE)."""
    print(f"\nbench {name}: ours {ours:.4g}, theirs {theirs:.4g}, ratio {ours / theirs:.2f} ({unit})")
    with open(os.environ.get("SPPO_BENCH_FILE", os.path.join(HERE, "bench.jsonl")), "a") as f:
        f.write(json.dumps(dict(name=name, ours=ours, theirs=theirs, ratio=ours / theirs, unit=unit,
                                threads=torch.get_num_threads(), **extra)) + "\n")


def run_sppo(*args, cwd=HERE, timeout=300):
    return subprocess.run([sys.executable, os.path.join(HERE, "sppo.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


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
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])  # sorted, descending
    keep = lambda p: sppo.nucleus(probs, p)[0].tolist()
    assert keep(0.4) == [True, False, False, False]  # the most likely token is always kept
    assert keep(0.7) == [True, True, False, False]  # 0.5 < 0.7, 0.8 ≥ 0.7
    assert keep(0.85) == [True, True, True, False]
    assert keep(1.0) == [True, True, True, True]


def test_next_token_samples_only_from_the_nucleus_in_proportion():
    p = torch.tensor([0.15, 0.5, 0.05, 0.3])  # unsorted on purpose
    logits = torch.log(p).repeat(20000, 1)
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(sppo.next_token(logits, 1.0, 0.7, u), minlength=4).float() / 20000
    assert counts[0] == 0 and counts[2] == 0
    assert abs(counts[1] - 0.625) < 0.02 and abs(counts[3] - 0.375) < 0.02
    # without top-p: every token, in proportion; temperature 0.5 squares and renormalises
    counts = torch.bincount(sppo.next_token(logits, 0.5, 1.0, u), minlength=4).float() / 20000
    assert torch.allclose(counts, p**2 / (p**2).sum(), atol=0.02)
    # inverse CDF by hand: u just below / above the cumulative mass 0.5 (sorted order: 1, 3, 0, 2)
    two = torch.log(p).repeat(2, 1)
    assert sppo.next_token(two, 1.0, 1.0, torch.tensor([0.149, 0.151])).tolist() == [0, 1]  # vocabulary order
    assert sppo.next_token(two, 1.0, 0.7, torch.tensor([0.62, 0.63])).tolist() == [1, 3]  # 0.5 / 0.8 = 0.625


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
    model = tiny_causal_lm("gpt2", tmp_path)
    prompts, responses = [[5, 6, 7], [9]], [[10, 11], [12, 13, 14, 2]]
    ids, mask, resp = sppo.collate([dict(prompt=p, response=r) for p, r in zip(prompts, responses)], 0)
    got = sppo.sequence_logps(model, ids, mask, resp)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        seq = torch.tensor([p + r])
        with torch.no_grad():
            logp = torch.log_softmax(model(seq).logits[0].double(), -1)  # no padding at all
        expected = sum(logp[len(p) + n - 1, tok].item() for n, tok in enumerate(r))
        assert math.isclose(got[b].item(), expected, abs_tol=1e-4)


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
    tok = sppo.tiny_tokenizer()
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


def test_no_training_prompts_left_is_a_clear_error(tmp_path):
    r = run_sppo("--num-prompts", "8", "--eval-prompts", "8", "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "lower --eval-prompts" in r.stderr and "Traceback" not in r.stderr


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


# ---------------------------------------------------------------------------- end to end


def test_default_run_learns_and_its_outputs_reload(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path / "run"
    r = run_sppo("--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
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
    for out, seed in zip(runs, ["1", "1", "2"]):
        r = run_sppo("--out", str(out), "--seed", seed, *args)
        assert r.returncode == 0, r.stderr[-3000:]
    samples = [(out / "iter1" / "samples.jsonl").read_text() for out in runs]
    weights = [load_file(out / "iter1" / "model.safetensors") for out in runs]
    assert samples[0] == samples[1] and samples[0] != samples[2]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_real_model_path_with_a_local_checkpoint_and_prompt_file(tmp_path):
    """--model DIR goes through AutoModelForCausalLM / AutoTokenizer (GPT-2, no chat template,
    gradient checkpointing on by default), --prompts through datasets."""
    from transformers import AutoModelForCausalLM
    tok = sppo.tiny_tokenizer()
    tok.chat_template = None
    model = tiny_causal_lm("gpt2", tmp_path, vocab=len(tok))
    model.save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    (tmp_path / "policy" / "training_args.bin").write_bytes(pickle.dumps(Trap(tmp_path / "UNPICKLED")))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"question": f"what is {i}?"}) + "\n" for i in range(12)))
    out = tmp_path / "run"
    r = run_sppo("--model", str(tmp_path / "policy"), "--prompts", str(prompts), "--prompt-field", "question",
                 "--judge", "toy", "--iterations", "1", "--k", "3", "--max-new-tokens", "6", "--eval-prompts", "4",
                 "--batch-size", "4", "--grad-accum", "2", "--lr", "1e-3", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "iter1" / "samples.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in rows] == [f"what is {i}?" for i in range(8)]  # the last 4 are held out
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"step"' in line]
    assert len(steps) == 2 and steps[0]["lr"] == 0.0  # 8 prompts / 4 per step; warm-up starts at 0
    trained = AutoModelForCausalLM.from_pretrained(out / "iter1")
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), model.state_dict().values()))
    assert not (tmp_path / "UNPICKLED").exists()  # no pickle in the model folder was opened
    assert sppo.parse_config(["--model", "x"]).trust_remote_code is False  # hub code only when asked for


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


def test_pairrm_command_line(pairrm_dirs, rm):
    r = subprocess.run([sys.executable, os.path.join(HERE, "pairrm_lite.py"), str(pairrm_dirs["hf"]),
                        "--prompt", "w1 w2", "--a", "w3", "--b", "w4 w5"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    expected = torch.sigmoid(rm.compare(["w1 w2"], ["w3"], ["w4 w5"])[0]).item()
    assert f"P(A beats B) = {expected:.4f}" in r.stdout


def test_sppo_runs_end_to_end_with_a_pairrm_judge(pairrm_dirs, tmp_path):
    out = tmp_path / "run"
    r = run_sppo("--judge", str(pairrm_dirs["hf"]), "--iterations", "1", "--num-prompts", "24", "--eval-prompts", "8",
                 "--epochs", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "iter1" / "samples.jsonl").read_text().splitlines()]
    M = torch.tensor(rows[0]["logits"])
    # the stored matrix is PairRM's: recompute it from the decoded responses and the rendered prompt
    rm = pairrm_lite.PairRM.from_pretrained(str(pairrm_dirs["hf"]))
    text, _ = sppo.render_prompt(sppo.tiny_tokenizer(), rows[0]["prompt"])
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
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           script, *args], cwd=HERE, capture_output=True, text=True, timeout=timeout)


def test_two_processes_give_the_samples_and_weights_of_one(tmp_path):
    """45 prompts: 8 held out, 37 trained in batches of 8 with 4 micro-steps, so the last batch
    (5 prompts) leaves one rank without prompts in some micro-steps (it runs them with weight 0)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    args = ["--iterations", "1", "--num-prompts", "45", "--eval-prompts", "8", "--epochs", "1", "--grad-accum", "4"]
    r1 = run_sppo("--out", str(tmp_path / "one"), *args)
    r2 = torchrun(os.path.join(HERE, "sppo.py"), "--out", str(tmp_path / "two"), *args)
    assert r1.returncode == 0, r1.stderr[-3000:]
    assert r2.returncode == 0, r2.stderr[-3000:]
    one, two = tmp_path / "one" / "iter1", tmp_path / "two" / "iter1"
    assert (one / "samples.jsonl").read_text() == (two / "samples.jsonl").read_text()  # identical samples
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
    r = run_sppo("--model", "mistral-7b", "--dry-run", timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "mistralai/Mistral-7B-Instruct-v0.2" in r.stdout and "memory plan for 7.24B parameters" in r.stdout
    row8 = next(line for line in r.stdout.splitlines() if line.strip().startswith("8 "))
    assert row8.split()[-1] == "yes"  # the authors' 8 × 80 GB setting fits


def test_memory_plan_by_hand():
    a = dict(params=1e9, layers=10, hidden=1000, kv_dim=100, vocab=1000)
    cfg = sppo.Config(k=2, sample_batch_size=1, max_prompt_length=10, max_new_tokens=90, batch_size=2,
                      grad_accum=1, max_length=50, grad_checkpointing=True, optimizer="rmsprop")
    m = sppo.memory_plan(cfg, a, gpus=2)
    G = 2**30
    # sampling: 4e9/2 fp32 shard + 2e9 bf16 gathered + KV 2·10·100·2 bytes · 2 rows · 100 tokens
    assert math.isclose(m["sampling"], (2e9 + 2e9 + 2 * 10 * 100 * 2 * 2 * 100) / G)
    # training: shard + grads + RMSprop state (2e9 each) + 2 bf16 layers (4e8) + activations of
    # 1 prompt × 2 responses × 50 tokens = 100 tokens: 100·1000·2·(10 + 34) + 100·1000·10 logits
    assert math.isclose(m["training"], (6e9 + 4e8 + 100 * 1000 * 2 * 44 + 100 * 1000 * 10) / G)


# ---------------------------------------------------------------------------- benchmarks (SPPO_BENCH=1)


def bench_llama(size):
    from transformers import LlamaConfig, LlamaForCausalLM
    dims = {"tiny": dict(vocab_size=100, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
            "60m": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8)}
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(max_position_embeddings=512, initializer_range=0.3, **dims[size])).eval()


@bench
@pytest.mark.parametrize("size, prompts, k, new_tokens", [("tiny", 16, 4, 24), ("60m", 4, 4, 32)])
def test_bench_sampling_against_generate(size, prompts, k, new_tokens):
    """sample vs generate(do_sample=True): same model, temperature 1, top-p 0.9, batch prompts × K,
    new-token budget (EOS never hit, so both decode every step). Tokens per second."""
    model = bench_llama(size)
    ids = torch.randint(5, 90, (prompts * k, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    greedy = dict(max_new_tokens=8, temperature=0.0, top_p=1.0, eos_token_id=2, pad_token_id=0)
    theirs_greedy = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8,
                                   eos_token_id=2, pad_token_id=0)[:, 12:]  # the outputs agree where they can
    assert torch.equal(sppo.sample(model, ids, mask, **greedy)[:, : theirs_greedy.shape[1]], theirs_greedy)
    ours = lambda: sppo.sample(model, ids, mask, max_new_tokens=new_tokens, temperature=1.0, top_p=0.9, eos_token_id=-1,
                               pad_token_id=0, generator=[torch.Generator().manual_seed(i) for i in range(len(ids))])
    theirs = lambda: model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=0.9,
                                    top_k=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    t_ours, t_theirs, a, b = timed_pair(ours, theirs, repeats=5)
    assert a.shape == (len(ids), new_tokens) and b.shape == (len(ids), 12 + new_tokens)
    n = len(ids) * new_tokens
    report_bench(f"sampling_{size}", n / t_ours, n / t_theirs, "tokens/s", batch=len(ids))
    assert t_theirs / t_ours >= 1.0


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
    ids, mask, _ = sppo.collate([it for group in batch for it in group], 0)

    def ours():
        return sppo.train_step(model, opt_ours, batch, cfg, 0, sppo.Env())

    def theirs():
        plain(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        opt_plain.step()
        opt_plain.zero_grad(set_to_none=True)

    t_ours, t_theirs, sums, _ = timed_pair(ours, theirs, repeats=5)
    assert sums[7] == mask.sum().item()  # the same tokens
    n = mask.sum().item()
    report_bench("training_step", n / t_ours, n / t_theirs, "tokens/s", overhead=t_ours / t_theirs - 1)
    assert t_ours / t_theirs <= 1.10


@bench
def test_bench_default_run(tmp_path):
    """The default `python sppo.py`: wall time and the per-stage split (target ≤ 60 s on 2 cores)."""
    import time
    t0 = time.perf_counter()
    r = run_sppo("--out", str(tmp_path / "run"))
    wall = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr[-2000:]
    iters = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "win_rate_vs_base" in line]
    split = {s: round(sum(m[f"{s}_seconds"] for m in iters), 2) for s in ("sample", "judge", "train", "eval")}
    split["start-up, base eval, saving"] = round(wall - sum(m["seconds"] for m in iters), 2)
    print(f"\nbench default_run: {wall:.1f} s wall, split {split}")
    with open(os.environ.get("SPPO_BENCH_FILE", os.path.join(HERE, "bench.jsonl")), "a") as f:
        f.write(json.dumps(dict(name="default_run", wall_s=wall, split_s=split, threads=torch.get_num_threads())) + "\n")
    assert wall <= 60


# ---------------------------------------------------------------------------- reliability: resume, errors, interrupts

SMALL = ["--iterations", "2", "--num-prompts", "24", "--eval-prompts", "8", "--epochs", "1"]


def run_patched(tmp_path, patch, *args, timeout=300, env=None):
    """sppo.py's main with a patch applied first (Python source run before main: a kill point, a NaN, an interrupt)."""
    script = tmp_path / "patched.py"
    script.write_text(f"import os, signal, sys\nsys.path.insert(0, {HERE!r})\nimport sppo\n{patch}\nsppo.main()\n")
    return subprocess.run([sys.executable, str(script), *args], cwd=HERE, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    r = run_sppo("--out", str(out), *SMALL)
    assert r.returncode == 0, r.stderr[-2000:]
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
    killed = run_patched(tmp_path, KILL_POINTS[point], "--out", str(out), *SMALL)
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "iter2").exists()
    resumed = run_sppo("--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for t in (1, 2):
        a, b = load_file(out / f"iter{t}" / "model.safetensors"), load_file(uninterrupted_run / f"iter{t}" / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise: every random stream is seeded
        assert (out / f"iter{t}" / "samples.jsonl").read_text() == (uninterrupted_run / f"iter{t}" / "samples.jsonl").read_text()
    lines = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    strip = lambda ms: [{k: v for k, v in m.items() if "second" not in k and "_per_s" not in k} for m in ms]
    assert strip(lines(out)) == strip(lines(uninterrupted_run))  # no duplicated or lost lines
    assert not list((out / "work").iterdir())  # work files are gone once their iteration is saved


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
    r = run_patched(tmp_path, patch, "--out", str(out), *SMALL)
    assert r.returncode == 130 and f"Resume with: python sppo.py --resume {out}" in r.stderr
    assert "Traceback" not in r.stderr
    assert run_sppo("--resume", str(out)).returncode == 0
    a, b = load_file(out / "iter2" / "model.safetensors"), load_file(uninterrupted_run / "iter2" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_waits_for_an_atomic_write():
    done = []
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
    return loss(*a, **k) * (float("nan") if len(calls) == 3 else 1.0)  # iteration 2, first step
sppo.sppo_loss = nan"""
    r = run_patched(tmp_path, patch, "--out", str(out), *SMALL)
    assert r.returncode == 2 and "non-finite loss" in r.stderr and f"{out / 'iter1'}" in r.stderr
    assert "Traceback" not in r.stderr
    assert (out / "iter1" / "model.safetensors").exists() and not (out / "iter2").exists()


def test_outputs_are_never_clobbered(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "iteration-plan.txt").write_text("mine too")
    r = run_sppo("--out", str(out), *SMALL)
    assert r.returncode == 2 and "--resume" in r.stderr and "--overwrite" in r.stderr
    r = run_sppo("--out", str(out), *SMALL[:1], "1", *SMALL[2:], "--overwrite")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "notes.txt").read_text() == "mine" and (out / "iter1").is_dir()
    assert (out / "iteration-plan.txt").read_text() == "mine too"
    r = run_sppo("--out", str(out), *SMALL[:1], "1", *SMALL[2:], "--overwrite", "--seed", "7")  # replaces iter1
    assert r.returncode == 0 and (out / "notes.txt").exists() and json.loads((out / "config.json").read_text())["seed"] == 7
    r = run_sppo("--resume", str(out), "--eta", "5")
    assert r.returncode == 2 and "--eta 5.0 (saved: 100.0)" in r.stderr
    assert run_sppo("--resume", str(tmp_path)).returncode == 2  # not a run folder


def write_policy_without_eos(folder):
    tok = sppo.tiny_tokenizer()
    model, _ = sppo.tiny_model(0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["eos_token"] = None
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def test_bad_inputs_get_one_line_and_exit_code_2(tmp_path):
    """Every error names the problem and the fix, exits with 2, shows no traceback (one with
    --debug) and writes nothing outside --out."""
    (tmp_path / "empty.jsonl").write_text(json.dumps({"prompt": ""}) + "\n" + json.dumps({"prompt": "  "}) + "\n")
    (tmp_path / "broken.parquet").write_bytes(b"this is not parquet")
    (tmp_path / "neither").mkdir()
    (tmp_path / "neither" / "config.json").write_text('{"model_type": "bert"}')
    write_policy_without_eos(tmp_path / "no_eos")
    cases = {
        "missing file": (["--prompts", str(tmp_path / "nope.jsonl")], "not found"),
        "unreadable file": (["--prompts", str(tmp_path / "broken.parquet")], "cannot read prompts"),
        "unknown field": (["--prompts", str(tmp_path / "empty.jsonl"), "--prompt-field", "text"], "it has ['prompt']"),
        "empty prompts": (["--prompts", str(tmp_path / "empty.jsonl")], "no prompts in"),
        "unknown model": (["--model", str(tmp_path / "no-such-model")], "not a preset (tiny, mistral-7b, llama-3-8b, gpt2)"),
        "judge of neither layout": (["--judge", str(tmp_path / "neither")], "neither PairRM layout"),
        "tokenizer without EOS": (["--model", str(tmp_path / "no_eos")], "has no EOS token"),
        "K < 2": (["--k", "1"], "at least 2"),
        "eta <= 0": (["--eta", "-1"], "positive"),
        "batch not divisible": (["--batch-size", "8", "--grad-accum", "3"], "not divisible"),
    }
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for name, (args, message) in cases.items():
        r = subprocess.run([sys.executable, os.path.join(HERE, "sppo.py"), "--out", str(tmp_path / "out" / name), *args],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 2, (name, r.stderr[-1500:])
        assert message in r.stderr and "Traceback" not in r.stderr, (name, r.stderr[-1500:])
        assert len([x for x in r.stderr.splitlines() if x.startswith("sppo: error")]) == 1, name
    assert sorted(os.listdir(tmp_path)) == ["broken.parquet", "empty.jsonl", "neither", "no_eos", "out"]
    r = subprocess.run([sys.executable, os.path.join(HERE, "sppo.py"), "--k", "1", "--debug"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" in r.stderr and "UserError" in r.stderr


def test_empty_and_overlong_prompts_are_counted(tmp_path):
    prompts = ["", "a" * 300] + [f"prompt {i}" for i in range(20)]  # the tiny context leaves 256 - 24 = 232 tokens
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    r = run_sppo("--prompts", str(tmp_path / "p.jsonl"), "--iterations", "1", "--eval-prompts", "4", "--epochs", "1",
                 "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "skipped 1 empty prompt(s)" in r.stderr and "1 prompt(s) longer than 232 tokens" in r.stderr


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
