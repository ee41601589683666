"""
Self-Play Preference Optimization (SPPO, Wu et al. 2024, arXiv 2405.00675) in one file.

Alignment as a two-player constant-sum game over responses, judged by a preference model
P(y ≻ y' | x) that need not be transitive. SPPO approaches the game's Nash equilibrium with
multiplicative weights,  π_{t+1}(y|x) ∝ π_t(y|x) · exp(η · P(y ≻ π_t | x)),  which after
taking logs and replacing log Z by its value under π_t (η/2) becomes a regression:

    θ_{t+1} = argmin_θ  E_{x, y~π_t} ( log π_θ(y|x) − log π_t(y|x) − η (P̂(y ≻ π_t|x) − ½) )²

Algorithm 1, one iteration t (this file's sections, in order):
    1. sample K responses per prompt from π_t                      -> sample()
    2. judge every ordered pair with the preference model          -> ToyJudge / pairrm_lite
    3. estimate each response's win rate P̂ against π_t             -> pairwise_probs(), win_rates()
    4. minimise the squared loss above; the result is π_{t+1}      -> sequence_logps(), sppo_loss()

Defaults are the authors' recipe (../shared/FACTS.md §2): K=5, T=0.7, top-p 0.9, η=1000,
RMSprop lr 5e-7, winner/loser pairs chosen from aggregated PairRM scores. `--pairs all` and
`--pair-prob paper` switch to the paper's own Algorithm 1 (all K responses, PairRM's own
pairwise probability). Deviation: we train on the sampled token ids, not on re-tokenised text.

    python sppo.py                                          # tiny model, toy judge, CPU, ~30 s
    python sppo.py --model gpt2                             # classroom preset, one consumer GPU
    torchrun --nproc_per_node 8 sppo.py --model mistral-7b  # the paper's recipe, FSDP2 on 8 GPUs
    python sppo.py --model mistral-7b --dry-run             # print the recipe and the memory plan
    python sppo.py --demo nash                              # exact SPPO on a cyclic game vs Bradley-Terry

Left out on purpose: vLLM, DeepSpeed, accelerate, Trainer subclasses, a loss zoo.
"""
import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Literal, Optional, get_args, get_type_hints

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

# ----------------------------------------------------------------------------------------
# Config. Defaults are the authors' values (FACTS.md §2); presets override some of them.


def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    model: str = arg("tiny", "preset (tiny, gpt2, mistral-7b, llama-3-8b) or a Hugging Face path / hub id of π_1")
    prompts: str = arg("UCLA-AGI/data-mistral-7b-instruct-sppo-iter{t}",
                       "prompt set: 'builtin', a hub id or a local .json/.jsonl/.parquet/.csv; "
                       "'{t}' is replaced by the iteration (authors: one disjoint set of ~20k per iteration)")
    prompt_field: str = arg("prompt", "column holding the prompt text")
    prompt_split: str = arg("train", "dataset split to read")
    num_prompts: Optional[int] = arg(None, "use only the first N prompts of each set")
    eval_prompts: int = arg(32, "held-out prompts (the last ones of iteration 1's set) for the win rates; 0 = no eval")
    judge: str = arg("llm-blender/PairRM", "preference model: 'toy' or a PairRM path / hub id")
    out: Optional[str] = arg(None, "output folder (default runs/<timestamp>)")
    iterations: int = arg(3, "T, number of SPPO iterations (authors: 3)")
    k: int = arg(5, "K, responses sampled per prompt (authors: 5)")
    max_new_tokens: int = arg(2048, "sampling budget per response (authors: 2048)")
    temperature: float = arg(0.7, "sampling temperature; 0 = greedy (authors: 0.7)")
    top_p: float = arg(0.9, "nucleus sampling mass (authors: 0.9)")
    max_length: int = arg(1024, "max prompt+response tokens in training (authors: 1024)")
    max_prompt_length: int = arg(512, "if too long keep the prompt's last N tokens, then cut the response (authors: 512)")
    pair_prob: Literal["official", "paper"] = arg(
        "official", "P(y_i ≻ y_j): 'official' σ(s_i − s_j) from aggregated scores (authors' code), "
                    "'paper' σ(½(M_ij − M_ji)) the judge's own probability")
    pairs: Literal["winner-loser", "all"] = arg(
        "winner-loser", "train on argmax/argmin P̂ only (authors' code) or on all K responses (Algorithm 1)")
    loss: Literal["sppo", "sppo_hard", "dpo", "ipo"] = arg(
        "sppo", "the SPPO loss, or for comparison sppo_hard (P̂ ∈ {0, 1}), dpo or ipo with β = 1/η (pairs only)")
    eta: float = arg(1000.0, "η, step size of the multiplicative-weights update (authors: 1000, their β = 1/η)")
    optimizer: Literal["rmsprop", "adamw"] = arg("rmsprop", "optimiser (authors: RMSprop, torch defaults)")
    lr: float = arg(5e-7, "peak learning rate (authors: 5e-7)")
    lr_schedule: Literal["linear", "constant"] = arg("linear", "after warm-up: linear decay to 0 (authors) or constant")
    warmup_ratio: float = arg(0.1, "fraction of steps with linear warm-up from 0 (authors: 0.1)")
    epochs: int = arg(1, "passes over each iteration's data (authors: 1)")
    batch_size: int = arg(64, "prompts per optimiser step, all processes together (authors: 8 per GPU × 8)")
    grad_accum: int = arg(1, "micro-batches per optimiser step; batch-size must be divisible by it")
    grad_checkpointing: bool = arg(True, "recompute activations in backward to save memory (authors: on)")
    sample_batch_size: int = arg(16, "prompts per sampling call (each gives K rows)")
    seed: int = arg(42, "seed for the tiny model, sampling and shuffling (authors: 42)")
    trust_remote_code: bool = arg(False, "allow model code from the hub (only if you trust it)")
    # CUDA fast paths, each on by default and ignored without CUDA (no Triton, no torch.compile)
    bf16: bool = arg(True, "CUDA: bf16 compute over fp32 master weights (authors' precision), PairRM in bf16")
    tf32: bool = arg(True, "CUDA: TF32 tensor cores for the remaining fp32 matmuls")
    sdpa: bool = arg(True, "CUDA: PyTorch's scaled_dot_product_attention (flash / memory-efficient kernels)")
    fused_optim: bool = arg(True, "CUDA: fused optimiser kernels (one launch for all parameters)")
    cuda_graph: bool = arg(True, "CUDA: static KV cache, each decode step replayed from a captured CUDA graph")
    pin_memory: bool = arg(True, "CUDA: page-locked host buffers, asynchronous copies to the GPU")
    dry_run: bool = arg(False, "print the resolved recipe and the memory plan, then exit (downloads nothing)")
    resume: Optional[str] = arg(None, "continue the run in this folder from its last finished stage (same config)")
    overwrite: bool = arg(False, "replace the outputs of an earlier run in --out (other files are kept)")
    debug: bool = arg(False, "show a traceback for input errors")
    demo: Optional[str] = arg(None, "'nash': SPPO's exact update on a 3-response cyclic game vs Bradley-Terry "
                                    "(η 0.2 and 1000 iterations unless --eta / --iterations are given)")


PRESETS = {  # overrides of the authors' defaults; an explicit flag overrides a preset
    # Measured (FACTS.md §6): η must be large for P̂ − ½ (spread ~0.1) to move a tiny model.
    "tiny": dict(prompts="builtin", judge="toy", k=8, max_new_tokens=24, temperature=1.0, top_p=1.0,
                 eta=100.0, optimizer="adamw", lr=3e-3, epochs=3, batch_size=8, pairs="all",
                 grad_checkpointing=False, sample_batch_size=32, max_length=96, max_prompt_length=64),
    # The paper's two main runs: the authors' recipe as it stands, planned for 8 × 80 GB.
    "mistral-7b": dict(model="mistralai/Mistral-7B-Instruct-v0.2"),
    "llama-3-8b": dict(model="meta-llama/Meta-Llama-3-8B-Instruct"),
    # A class on one consumer GPU: 2,000 prompts a round, K=4, 128 new tokens (GPT-2's context is
    # 1024), lengths halved. lr is a starting point (10× the authors' for ~1/5 of the steps), not tuned.
    "gpt2": dict(model="openai-community/gpt2", num_prompts=2000, eval_prompts=64, k=4, max_new_tokens=128,
                 max_length=512, max_prompt_length=256, lr=5e-6, batch_size=32, grad_accum=4,
                 grad_checkpointing=False, sample_batch_size=32),
}

# ----------------------------------------------------------------------------------------
# Distributed setup. torchrun sets RANK and WORLD_SIZE; plain `python sppo.py` is one process and
# never touches torch.distributed. Ranks split the no-grad work (sampling, judging, reference
# log-probs) by chunks of the global prompt list and gather the results, so every rank trains on
# the same global batches, and nothing depends on the number of processes.


@dataclass
class Env:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    distributed: bool = False
    bf16: bool = False        # the CUDA fast paths in force (all False on the CPU)
    cuda_graph: bool = False
    pin: bool = False

    def amp(self):
        """bf16 compute on CUDA (the authors' precision), fp32 on the CPU."""
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def to(self, t):
        return t.pin_memory().to(self.device, non_blocking=True) if self.pin else t.to(self.device)


def setup(cfg: Config) -> Env:
    cuda = torch.cuda.is_available()
    env = Env(device=torch.device("cuda" if cuda else "cpu"), bf16=cuda and cfg.bf16,
              cuda_graph=cuda and cfg.cuda_graph, pin=cuda and cfg.pin_memory)
    if cuda and cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if "RANK" in os.environ:
        if cuda:
            env.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(env.device)
        dist.init_process_group("nccl" if cuda else "gloo")
        env.rank, env.world, env.distributed = dist.get_rank(), dist.get_world_size(), True
    return env


def shard(model, env: Env):
    """FSDP2: each decoder layer (the classes in _no_split_modules), then the root, which holds the
    embeddings and the head, tied or not. fp32 master weights; on CUDA bf16 compute, fp32 reductions."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(env.device.type, (env.world,))  # the default mesh would pick CUDA on a CPU run
    mp = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if env.bf16 else MixedPrecisionPolicy()
    layers = set(model._no_split_modules or ())
    for m in model.modules():
        if type(m).__name__ in layers:
            fully_shard(m, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)


@contextmanager
def full_weights(model):
    """Gather the full parameters once for no-grad work, then reshard. Measured 2-4× faster than an
    all-gather per layer and per decoded token, and free of collectives, so ranks may decode
    different lengths (FACTS.md §5). A no-op without FSDP."""
    from torch.distributed.fsdp import FSDPModule
    fsdp = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if fsdp:
        model.set_reshard_after_forward(False)
        for m in fsdp:  # unshard() is not recursive
            m.unshard()
    try:
        yield
    finally:
        for m in fsdp:
            m.reshard()
        if fsdp:
            model.set_reshard_after_forward(True)


def map_chunks(fn, items: list, size: int, env: Env, desc: str) -> list:
    """fn(start, chunk) over consecutive chunks of items; chunk c runs on rank c % world and every
    rank gets all results, in order. The chunks do not depend on the number of ranks."""
    starts = range(0, len(items), size)
    mine = {s: fn(s, items[s: s + size]) for s in tqdm(starts[env.rank:: env.world], desc=desc, leave=False,
                                                       disable=env.rank != 0)}
    if env.world > 1:
        parts = [None] * env.world
        dist.all_gather_object(parts, mine)
        mine = {s: r for part in parts for s, r in part.items()}
    return [r for s in starts for r in mine[s]]


def all_sum(values: list[float], env: Env) -> list[float]:
    """Sum over ranks (gloo has no AVG)."""
    if env.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.tolist()


# ----------------------------------------------------------------------------------------
# Models: the policy (a transformers causal LM) and prompts rendered with its chat template.


def seed_for(*keys: int) -> int:
    """A seed that depends only on its keys, e.g. (seed, iteration, prompt index, sample index),
    so a response's random stream does not depend on batch size or process count."""
    return int.from_bytes(hashlib.blake2b(repr(keys).encode(), digest_size=8).digest(), "little") >> 1


def disable_dropout(model):
    """The authors train with dropout off: the loss compares π_θ with π_t at the same weights."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


def render_prompt(tokenizer, prompt: str) -> tuple[str, list[int]]:
    """The prompt as text (the judge's 'source') and as token ids. With a chat template: one user
    turn plus the generation prompt, tokenised without adding special tokens again (the template
    already holds BOS). Without one (GPT-2): 'User: …\\nAssistant:' with the tokenizer's defaults."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return text, tokenizer(text, add_special_tokens=False).input_ids
    text = f"User: {prompt}\nAssistant:"
    return text, tokenizer(text).input_ids


def truncate(prompt_ids: list[int], responses: list[list[int]], max_length: int, max_prompt_length: int):
    """The authors' (TRL DPO) rule: if prompt + longest response > max_length, keep the prompt's
    last max_prompt_length tokens; responses still too long are cut to max_length − max_prompt_length."""
    if len(prompt_ids) + max(map(len, responses)) > max_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
    cut = max_length - max_prompt_length
    return prompt_ids, [r[:cut] if len(prompt_ids) + len(r) > max_length else r for r in responses]


def pad(seqs: list[list[int]], pad_id: int, left: bool):
    """Pad to a rectangle: left for sampling (new tokens line up on the right), right for training."""
    n = max(map(len, seqs))
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(n - len(s), n) if left else slice(0, len(s))
        ids[i, sl], mask[i, sl] = torch.tensor(s, dtype=torch.long), 1
    return ids, mask  # [B, n], [B, n]


# ----------------------------------------------------------------------------------------
# Algorithm 1, step 1: sample K responses y_1..y_K ~ π_t(·|x) per prompt.


def nucleus(sorted_probs, top_p: float):
    """Top-p on probabilities sorted in descending order: keep the most likely tokens until their
    mass reaches top_p (the first always). Returns the mask of kept tokens."""
    return (sorted_probs.cumsum(-1) - sorted_probs) < top_p            # mass strictly before < p


def next_token(logits, temperature: float, top_p: float, u):
    """One token per row by inverse-CDF sampling: the first token whose cumulative probability
    exceeds u · (kept mass), u ~ U[0, 1) drawn per row. One uniform per row and step (not one per
    vocabulary entry) keeps per-row random streams cheap: 12% of a decode step with exponential
    noise on a 32k vocabulary, ~0 now. Without top-p no sort is needed."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)         # [B, V]
    idx = None
    if top_p < 1:
        probs, idx = probs.sort(-1, descending=True)
        probs = probs * nucleus(probs, top_p)
    cdf = probs.cumsum(-1)                                              # [B, V]
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_max(cdf.shape[-1] - 1)
    return (pick if idx is None else idx.gather(-1, pick)).squeeze(-1)  # [B]


@torch.no_grad()
def sample(model, input_ids, attention_mask, *, max_new_tokens: int, temperature: float, top_p: float,
           eos_token_id, pad_token_id: int, generator=None, static: bool = False, cuda_graph: bool = False):
    """Decode with a KV cache: prefill the left-padded prompts, then one token per step.
    Returns LongTensor[B, max_new_tokens]; positions after a row's first EOS hold pad_token_id.
    generator: one torch.Generator for the batch, or a list of B, one per row, so that a row's
    sample does not depend on its batch-mates. static: a fixed-size KV cache (same tokens),
    whose decode step cuda_graph captures once and replays (CUDA only)."""
    B, device = input_ids.shape[0], input_ids.device
    if isinstance(generator, (list, tuple)):                            # the uniforms of every step, up front
        u = torch.stack([torch.rand(max_new_tokens, generator=g, device=device) for g in generator])
    else:
        u = torch.rand(B, max_new_tokens, generator=generator, device=device)  # [B, max_new_tokens]
    eos = torch.tensor(eos_token_id, device=device).view(-1)            # Llama 3 has two EOS ids
    out = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)         # left pads: first real token at 0
    decoder = (StaticDecoder if static else DynamicDecoder)(model, attention_mask, max_new_tokens, cuda_graph)
    logits = decoder.prefill(input_ids, position_ids)                   # [B, V]
    for step in range(max_new_tokens):
        token = next_token(logits, temperature, top_p, u[:, step])
        token = torch.where(done, pad_token_id, token)                 # finished rows emit padding
        out[:, step] = token
        done |= torch.isin(token, eos)
        # done.all() is a host sync, which stalls the GPU's queue of kernels (and a replayed
        # graph): look every 8 steps; rows that finished meanwhile only emit padding
        if step == max_new_tokens - 1 or (step % 8 == 7 and done.all()):
            break
        position_ids = position_ids[:, -1:] + 1
        logits = decoder(token[:, None], position_ids)                  # [B, V]
    return out


class DynamicDecoder:
    """transformers' growing KV cache; the attention mask grows by one column per step."""

    def __init__(self, model, attention_mask, max_new_tokens: int, cuda_graph: bool = False):  # StaticDecoder's
        from transformers import DynamicCache
        self.model, self.mask, self.cache = model, attention_mask, DynamicCache(config=model.config)

    def prefill(self, input_ids, position_ids):
        return self.model(input_ids, attention_mask=self.mask, position_ids=position_ids, cache=self.cache,
                          use_cache=True, logits_to_keep=1).logits[:, -1]

    def __call__(self, token, position_ids):
        self.mask = F.pad(self.mask, (0, 1), value=1)
        return self.model(token, attention_mask=self.mask, position_ids=position_ids, cache=self.cache,
                          use_cache=True).logits[:, -1]


class StaticDecoder:
    """A KV cache and a mask sized for the whole sequence up front, so every decode step has the
    same shapes and no host sync: on CUDA it is captured once in a CUDA graph and replayed, which
    removes the per-kernel launch cost that dominates decoding at small batch (no torch.compile,
    no Triton). Inputs go through fixed buffers that the graph reads."""

    def __init__(self, model, attention_mask, max_new_tokens: int, cuda_graph: bool = False):
        from transformers import StaticCache
        B, T = attention_mask.shape
        self.model, self.T, self.pos, self.graph = model, T, T, None  # pos: where the next token goes
        self.cache = StaticCache(config=model.config, max_cache_len=T + max_new_tokens)
        self.mask = F.pad(attention_mask, (0, max_new_tokens), value=0)  # [B, T + max_new_tokens]
        self.token = torch.zeros(B, 1, dtype=torch.long, device=attention_mask.device)
        self.position_ids = torch.zeros_like(self.token)
        self.cache_position = torch.zeros(1, dtype=torch.long, device=attention_mask.device)
        self.cuda_graph = cuda_graph and attention_mask.device.type == "cuda"

    def prefill(self, input_ids, position_ids):
        return self.model(input_ids, attention_mask=self.mask[:, : self.T], position_ids=position_ids,
                          cache=self.cache, cache_position=torch.arange(self.T, device=input_ids.device),
                          use_cache=True, logits_to_keep=1).logits[:, -1]

    def forward(self):
        return self.model(self.token, attention_mask=self.mask, position_ids=self.position_ids, cache=self.cache,
                          cache_position=self.cache_position, use_cache=True).logits[:, -1]

    def __call__(self, token, position_ids):
        self.mask[:, self.pos] = 1                                      # the new token is visible
        self.cache_position.fill_(self.pos)
        self.token.copy_(token)
        self.position_ids.copy_(position_ids)
        if not self.cuda_graph:
            logits = self.forward()
        else:
            if self.graph is None:  # warm up on a side stream, then capture one step
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    self.forward()
                torch.cuda.current_stream().wait_stream(stream)
                try:
                    self.graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(self.graph):
                        self.logits = self.forward()
                except RuntimeError as e:  # a model whose step cannot be captured still decodes, eagerly
                    print(f"sppo: warning: CUDA graph capture failed ({e}); decoding without it", file=sys.stderr)
                    self.cuda_graph = False
                    return self(token, position_ids)
            self.graph.replay()
            logits = self.logits.clone()
        self.pos += 1
        return logits


def strip_response(tokens: list[int], eos_ids: list[int]) -> list[int]:
    """The response up to and including its first EOS (padding only ever follows an EOS)."""
    for i, tok in enumerate(tokens):
        if tok in eos_ids:
            return tokens[: i + 1]
    return tokens


# ----------------------------------------------------------------------------------------
# Algorithm 1, step 2: judge every ordered pair. A judge maps prompts and K candidates each to
# M[n, i, j] = logit that candidate i beats candidate j. For real runs the judge is PairRM.


class ToyJudge:
    """A transparent, intransitive preference for the tiny mode; it ignores the prompt:
        M[a, b] = 8 · (vowels(a) − vowels(b)) + rps(a, b)
    vowels = fraction of the text's characters in 'aeiouAEIOU'; rps = +1 / −1 / 0 when the class
    (ord % 3: rock, paper, scissors) of a's first character beats / loses to / ties b's.
    The cycle makes it a non-Bradley-Terry preference, the case SPPO is built for."""

    def __init__(self, vowel_weight: float = 8.0, cycle_weight: float = 1.0):
        self.vowel_weight, self.cycle_weight = vowel_weight, cycle_weight

    def logit_matrices(self, prompts: list[str], candidates: list[list[str]]):
        v = torch.tensor([[sum(c in "aeiouAEIOU" for c in s) / max(len(s), 1) for s in cands]
                          for cands in candidates])                       # [N, K]
        cls = torch.tensor([[ord(s[0]) % 3 if s else -1 for s in cands] for cands in candidates])
        d = (cls[:, :, None] - cls[:, None, :]) % 3                      # [N, K, K]
        rps = (d == 1).float() - (d == 2).float()                        # +1: i's class beats j's
        rps[(cls[:, :, None] < 0) | (cls[:, None, :] < 0)] = 0           # empty texts have no class
        return self.vowel_weight * (v[:, :, None] - v[:, None, :]) + self.cycle_weight * rps


def load_judge(name: str, env):
    """'toy', or PairRM (pairrm_lite) from a folder or hub id; bf16 on CUDA, fp32 on the CPU."""
    if name == "toy":
        return ToyJudge()
    from pairrm_lite import PairRM
    try:
        return PairRM.from_pretrained(name, device=env.device, dtype=torch.bfloat16 if env.bf16 else None)
    except (OSError, ValueError) as e:
        fail(f"cannot load --judge {name}: {first_line(e)}; pass 'toy' or a PairRM folder or hub id")


# ----------------------------------------------------------------------------------------
# Algorithm 1, step 3: win rates P̂(y_i ≻ π_t | x) = (1/K) Σ_j P(y_i ≻ y_j | x).


def pairwise_probs(logits, method: str):
    """P[..., i, j] = P(y_i ≻ y_j) from the judge's logits M[..., i, j] (diagonal ignored).
    official (authors' code): scores s_i = (1/K) Σ_j (M_ij − M_ji), P_ij = σ(s_i − s_j).
    paper: the judge's own probability with both orders, P_ij = σ(½(M_ij − M_ji)).
    Both give P + Pᵀ = 1 and P_ii = ½."""
    anti = logits - logits.transpose(-1, -2)                             # M_ij − M_ji, [..., K, K]
    if method == "official":
        s = anti.mean(-1)                                                # [..., K]
        return torch.sigmoid(s[..., :, None] - s[..., None, :])
    if method == "paper":
        return torch.sigmoid(anti / 2)
    raise ValueError(f"unknown pairwise probability method {method!r}")


def win_rates(P):
    """P̂_i = mean_j P_ij, the self term P_ii = ½ included (as the authors do), so P̂ ∈ [1/(2K), 1 − 1/(2K)]."""
    return P.mean(-1)                                                    # [..., K]


# ----------------------------------------------------------------------------------------
# Algorithm 1, step 4: the SPPO loss and the update θ_t -> θ_{t+1}.


def sequence_logps(model, input_ids, attention_mask, response_mask):
    """log π(y|x) = Σ over response tokens of log π(y_n | x, y_<n), in fp32. Only tokens where
    response_mask is 1 count: the prompt is given, not chosen, and padding is not text."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    logits = model(input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits
    logits = logits[:, :-1].float()                                      # predicts token n+1: [B, T-1, V]
    target = input_ids[:, 1:, None]                                      # [B, T-1, 1]
    logps = logits.gather(-1, target).squeeze(-1) - logits.logsumexp(-1)  # [B, T-1]
    return (logps * response_mask[:, 1:]).sum(-1)                        # [B]


def sppo_loss(policy_logps, ref_logps, win_rates, eta: float):
    """Per response: (log π_θ(y|x) − log π_t(y|x) − η (P̂ − ½))². The ½ is log Z / η: π_t wins
    against itself half the time. η is large (1000) because P̂ − ½ spans only ~±0.4 while the
    log-ratio of a whole response moves by tens of nats. The batch mean over a winner and a
    loser equals the authors' ½ (l_w + l_l) per pair."""
    log_ratio = policy_logps - ref_logps
    target = eta * (win_rates - 0.5)
    return (log_ratio - target) ** 2                                     # [N]


# For the classroom (--loss), on winner/loser pairs, with β = 1/η. SPPO regresses each response's
# log-ratio to its own target, so the winner goes up and the loser down; DPO and IPO only see the
# gap Δ_w − Δ_l, which they can widen while both likelihoods fall.

def sppo_hard_loss(policy_logps, ref_logps, is_winner, eta: float):
    """TRL's sppo_hard: P̂ = 1 for the winner, 0 for the loser: (Δ_w − η/2)² and (Δ_l + η/2)²."""
    return sppo_loss(policy_logps, ref_logps, is_winner.float(), eta)   # [N]


def dpo_loss(winner_logratio, loser_logratio, eta: float):
    """DPO: −log σ(β (Δ_w − Δ_l)), per pair."""
    return -F.logsigmoid((winner_logratio - loser_logratio) / eta)     # [N/2]


def ipo_loss(winner_logratio, loser_logratio, eta: float):
    """IPO: (Δ_w − Δ_l − 1/(2β))², per pair: the gap is pulled to η/2, each side left free."""
    return (winner_logratio - loser_logratio - eta / 2) ** 2           # [N/2]


def batch_loss(name: str, policy_logps, ref_logps, win_rates, roles: list[str], eta: float):
    """Summed loss of a micro-batch: over responses, or over pairs laid out winner, loser, winner,
    loser, … as --pairs winner-loser makes them."""
    if name == "sppo":
        return sppo_loss(policy_logps, ref_logps, win_rates, eta).sum()
    is_winner = torch.tensor([r == "winner" for r in roles], device=policy_logps.device)
    if name == "sppo_hard":
        return sppo_hard_loss(policy_logps, ref_logps, is_winner, eta).sum()
    pairs = (policy_logps - ref_logps).view(-1, 2)                      # [N/2, (winner, loser)]
    return (dpo_loss if name == "dpo" else ipo_loss)(pairs[:, 0], pairs[:, 1], eta).sum()


def lr_at(step: int, total: int, warmup_ratio: float, schedule: str) -> float:
    """Multiplier of the peak lr: linear warm-up from 0, then linear decay to 0 or constant
    (transformers' get_linear_schedule_with_warmup, which the authors' Trainer used)."""
    warmup = math.ceil(total * warmup_ratio)
    if step < warmup:
        return step / warmup
    return 1.0 if schedule == "constant" else max(0.0, (total - step) / max(1, total - warmup))


def collate(items, pad_id: int):
    """Right-padded prompt+response rows and their response masks (on the CPU)."""
    ids, mask = pad([it["prompt"] + it["response"] for it in items], pad_id, left=False)
    resp = torch.zeros_like(mask)
    for i, it in enumerate(items):
        resp[i, len(it["prompt"]): len(it["prompt"]) + len(it["response"])] = 1
    return ids, mask, resp


def train_step(model, opt, batch, cfg: Config, pad_id: int, env: Env) -> list[float]:
    """One optimiser step on a global batch of prompts (each a list of items with ref_logp). Returns
    the step's sums over all ranks: loss; winner Σ log-ratio, Σ P̂, count; the same for losers; tokens."""
    n_units = sum(map(len, batch)) // (2 if cfg.loss in ("dpo", "ipo") else 1)  # responses, or pairs
    sums = [0.0] * 8
    for m in range(cfg.grad_accum):
        mine = batch[m:: cfg.grad_accum][env.rank:: env.world]
        # Every rank runs every micro-step (FSDP's collectives must match); a rank with no prompts
        # left in a short last batch runs one with weight 0.
        weight = 1.0 if mine else 0.0
        chunk = [it for g in (mine or batch[:1]) for it in g]
        ids, mask, resp = map(env.to, collate(chunk, pad_id))
        with env.amp():
            logps = sequence_logps(model, ids, mask, resp)                       # [n]
        ref = torch.tensor([it["ref_logp"] for it in chunk], device=env.device)
        wr = torch.tensor([it["win_rate"] for it in chunk], device=env.device)
        # the step's mean over all ranks' responses (pairs for DPO/IPO); × world: FSDP averages gradients
        loss = batch_loss(cfg.loss, logps, ref, wr, [it["role"] for it in chunk], cfg.eta)
        loss = loss * (weight * env.world / n_units)
        loss.backward()
        sums[0] += loss.item() / env.world
        sums[7] += weight * int(mask.sum())
        for it, r in zip(chunk, (logps - ref).tolist()):
            if weight and it["role"] in ("winner", "loser"):
                k = 1 if it["role"] == "winner" else 4                  # sums[k: k + 3]: Σ log-ratio, Σ P̂, count
                sums[k: k + 3] = [sums[k] + r, sums[k + 1] + it["win_rate"], sums[k + 2] + 1]
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))  # measured, not clipped
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)  # FSDP: DTensor
    sums = all_sum(sums, env)
    if not (math.isfinite(sums[0]) and math.isfinite(grad_norm)):  # never let a NaN into the weights
        raise FloatingPointError(f"non-finite loss ({sums[0]}) or gradient norm ({grad_norm})")
    opt.step()
    opt.zero_grad(set_to_none=True)
    return sums + [grad_norm]


def train_iteration(model, groups, cfg: Config, t: int, pad_id: int, env: Env, log):
    """One pass of Algorithm 1's minimisation. groups: one list of items per prompt, each item a
    dict(prompt, response, win_rate, role); a step takes batch_size prompts, all their items."""
    # Built before any forward: after one, FSDP leaves the root unsharded until the next backward,
    # and an optimiser built then would update throw-away tensors (FACTS.md §5).
    opt = make_optimizer(model, cfg, env)
    # π_t's log-probs, once, before any update: π_t is these very weights, so no second model.
    items = [it for g in groups for it in g]
    with torch.no_grad(), full_weights(model), env.amp():
        ref = map_chunks(lambda s, chunk: sequence_logps(model, *map(env.to, collate(chunk, pad_id))).tolist(),
                         items, cfg.sample_batch_size, env, f"iter {t} reference")
    for it, lp in zip(items, ref):
        it["ref_logp"] = lp
    model.train()  # dropout is off; train mode only enables gradient checkpointing
    total = cfg.epochs * math.ceil(len(groups) / cfg.batch_size)
    step, tokens, t0 = 0, 0, time.time()
    bar = tqdm(total=total, desc=f"iter {t} train", leave=False, disable=env.rank != 0)
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed_for(cfg.seed, t, epoch)))
        for b in range(0, len(groups), cfg.batch_size):
            lr = cfg.lr * lr_at(step, total, cfg.warmup_ratio, cfg.lr_schedule)
            for g in opt.param_groups:
                g["lr"] = lr
            batch = [groups[i] for i in order[b: b + cfg.batch_size].tolist()]
            loss, w_lr, w_wr, w_n, l_lr, l_wr, l_n, n_tok, grad_norm = train_step(model, opt, batch, cfg, pad_id, env)
            step, tokens = step + 1, tokens + n_tok
            log(iteration=t, step=step, loss=loss, lr=lr, grad_norm=grad_norm,
                winner_logratio=w_lr / max(w_n, 1), loser_logratio=l_lr / max(l_n, 1),
                winner_winrate=w_wr / max(w_n, 1), loser_winrate=l_wr / max(l_n, 1))
            bar.set_postfix(loss=f"{loss:.3g}")
            bar.update()
    bar.close()
    model.eval()
    return tokens / max(time.time() - t0, 1e-9)


def make_optimizer(model, cfg: Config, env: Env):
    """RMSprop (the authors') or AdamW with torch's defaults; fused kernels on CUDA with --fused-optim."""
    fused = dict(fused=True) if cfg.fused_optim and env.device.type == "cuda" else {}  # CPU: never
    return (torch.optim.RMSprop if cfg.optimizer == "rmsprop" else torch.optim.AdamW)(model.parameters(), lr=cfg.lr, **fused)


# ----------------------------------------------------------------------------------------
# The loop over iterations: sample, judge, estimate, train, evaluate, save.


def sample_responses(model, tokenizer, prompt_ids, cfg: Config, tag: int, env: Env, desc: str):
    """K responses per prompt (token ids, EOS kept). Row (prompt i, sample j) draws from its own
    stream seeded by (seed, tag, i, j); tag is the iteration, or -1 for the held-out set so that
    every policy is evaluated on the same random numbers."""
    eos_ids = eos_token_ids(model, tokenizer)

    def chunk(start, prompts):
        rows = [(start + i, j) for i in range(len(prompts)) for j in range(cfg.k)]
        ids, mask = pad([prompt_ids[i] for i, _ in rows], tokenizer.pad_token_id, left=True)
        gens = [torch.Generator(env.device).manual_seed(seed_for(cfg.seed, tag, i, j)) for i, j in rows]
        with env.amp():
            out = sample(model, env.to(ids), env.to(mask), max_new_tokens=cfg.max_new_tokens,
                         temperature=cfg.temperature, top_p=cfg.top_p, eos_token_id=eos_ids,
                         pad_token_id=tokenizer.pad_token_id, generator=gens,
                         static=env.cuda_graph, cuda_graph=env.cuda_graph)
        out = [strip_response(r, eos_ids) for r in out.tolist()]
        return [out[i: i + cfg.k] for i in range(0, len(out), cfg.k)]

    with full_weights(model):
        return map_chunks(chunk, list(prompt_ids), cfg.sample_batch_size, env, desc)


def judge_all(judge, prompts: list[str], candidates: list[list[str]], env: Env, desc: str):
    """The judge's logit matrices M[n, i, j] for every prompt, split across ranks: [N, K, K]."""
    rows = map_chunks(lambda s, chunk: list(judge.logit_matrices(prompts[s: s + len(chunk)], chunk)),
                      candidates, 16, env, desc)
    return torch.stack(rows)


def eos_token_ids(model, tokenizer) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
    return eos if isinstance(eos, list) else [eos]


def win_rate(judge, prompts: list[str], a: list[list[str]], b: list[list[str]], env: Env) -> float:
    """Mean P(a ≻ b) over matched pairs, with the judge's own probability (σ(½(M_ab − M_ba)))."""
    src = [p for p, row in zip(prompts, a) for _ in row]
    pairs = [[x, y] for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return pairwise_probs(judge_all(judge, src, pairs, env, "eval judge"), "paper")[:, 0, 1].mean().item()


def run(cfg: Config):
    env = setup(cfg)
    say = print if env.rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(cfg.seed)
    out, start = prepare_out(cfg, env)  # start: the first iteration that an earlier run did not finish
    try:
        # π_1 is the base model, or on --resume the policy that the last finished iteration saved
        model, tokenizer = load_policy(cfg.model if start == 1 else os.path.join(out, f"iter{start - 1}"), cfg, env)
        judge = load_judge(cfg.judge, env)
        first = load_prompts(cfg, 1)
        if env.world > len(first):
            fail(f"{env.world} processes but only {len(first)} prompts: use fewer processes or more prompts")
        held_out = first[len(first) - cfg.eval_prompts:] if cfg.eval_prompts else []
        held_out_set = set(held_out)
        context = getattr(model.config, "max_position_embeddings", None) or 10**9
        render = lambda ps: render_all(tokenizer, ps, context - cfg.max_new_tokens)
        eval_text, eval_ids = render(held_out) if held_out else ((), ())
        decode = lambda rs: [[tokenizer.decode(r, skip_special_tokens=True) for r in row] for row in rs]
        evaluate = lambda desc: decode(sample_responses(model, tokenizer, eval_ids, cfg, -1, env, desc))
        base = stage(os.path.join(out, "eval0.json"), env, lambda: evaluate("eval iter 0"))
        prev = base if start == 1 else read_json(os.path.join(out, f"iter{start - 1}", "eval.json"))
        metrics = open(os.path.join(out, "metrics.jsonl"), "a") if env.rank == 0 else None

        def log(**m):  # one JSON line, flushed at once: a crash keeps every line written before it
            if metrics:
                metrics.write(json.dumps(m) + "\n")
                metrics.flush()

        for t in range(start, cfg.iterations + 1):
            t_start = time.time()
            prompts = [p for p in (first if t == 1 else load_prompts(cfg, t)) if p not in held_out_set]
            if not prompts:
                fail(f"no training prompts left in iteration {t} after holding out {len(held_out)}: "
                     "lower --eval-prompts")
            texts, ids = render(prompts)
            work = os.path.join(out, "work", f"iter{t}")
            # step 1: sample K responses per prompt from π_t
            clock, seconds = time.time(), {}

            def lap(stage):  # the seconds since the previous stage ended
                seconds[stage] = time.time() - clock - sum(seconds.values())

            responses = stage(work + ".samples.json", env,
                              lambda: sample_responses(model, tokenizer, ids, cfg, t, env, f"iter {t} sample"))
            lap("sample")
            # step 2: judge every ordered pair
            M = torch.tensor(stage(work + ".judged.json", env, lambda: judge_all(
                judge, list(texts), decode(responses), env, f"iter {t} judge").tolist()))  # [N, K, K]
            lap("judge")
            # step 3: win rates against π_t
            wr = win_rates(pairwise_probs(M, cfg.pair_prob))                  # [N, K]
            winners, losers = wr.argmax(-1).tolist(), wr.argmin(-1).tolist()  # first index on ties
            groups, rows = [], []
            for i, (p_ids, resp) in enumerate(zip(ids, responses)):
                w, l = winners[i], losers[i]
                rows.append(dict(prompt=prompts[i], responses=decode([resp])[0], logits=M[i].tolist(),
                                 win_rates=wr[i].tolist(), winner=w, loser=l))
                if w == l:  # every response judged equal: nothing to learn from this prompt
                    continue
                chosen = [w, l] if cfg.pairs == "winner-loser" else list(range(cfg.k))
                p_cut, r_cut = truncate(list(p_ids), [resp[j] for j in chosen], cfg.max_length, cfg.max_prompt_length)
                roles = {w: "winner", l: "loser"}
                groups.append([dict(prompt=p_cut, response=r, win_rate=wr[i, j].item(), role=roles.get(j, "other"))
                               for j, r in zip(chosen, r_cut)])
            # step 4: minimise the SPPO loss; the model becomes π_{t+1}
            if isinstance(judge, torch.nn.Module):
                judge.to("cpu")  # its GPU memory goes to training
            try:
                train_tps = train_iteration(model, groups, cfg, t, tokenizer.pad_token_id, env, log)
            except FloatingPointError as e:
                last = os.path.join(out, f"iter{t - 1}") if t > 1 else "the base model"
                fail(f"{e} in iteration {t}: training stopped before the update and iteration {t} was not saved; "
                     f"the last good policy is {last}. Lower --lr or --eta")
            if isinstance(judge, torch.nn.Module):
                judge.to(env.device)
            lap("train")
            # evaluate on held-out prompts against the start and against the previous policy
            new = evaluate(f"eval iter {t}")
            vs_base, vs_prev = (win_rate(judge, eval_text, new, base, env), win_rate(judge, eval_text, new, prev, env)) \
                if held_out else (None, None)
            prev = new
            lap("eval")
            m = dict(iteration=t, win_rate_vs_base=vs_base, win_rate_vs_prev=vs_prev,
                     sample_tokens_per_s=sum(len(r) for row in responses for r in row) / max(seconds["sample"], 1e-9),
                     judge_pairs_per_s=M.shape[0] * cfg.k * (cfg.k - 1) / max(seconds["judge"], 1e-9),
                     train_tokens_per_s=train_tps, seconds=time.time() - t_start,
                     skipped_prompts=len(prompts) - len(groups), **{f"{k}_seconds": v for k, v in seconds.items()})
            log(**m)
            save(model, tokenizer, os.path.join(out, f"iter{t}"), dict(samples=rows, eval=new), env)
            if env.rank == 0:  # the iteration is saved: its work files are no longer needed
                for suffix in (".samples.json", ".judged.json"):
                    os.remove(work + suffix)
            wr_text = f"win rate vs base {vs_base:.3f}, vs previous {vs_prev:.3f}" if held_out else "no eval"
            say(f"iter {t}: {wr_text}, {len(groups)} prompts trained, {m['seconds']:.1f}s", flush=True)
        if metrics:
            metrics.close()
            plot_curves(out)
    except KeyboardInterrupt:
        say(f"sppo: interrupted; every finished stage is saved. Resume with: python sppo.py --resume {out}",
            file=sys.stderr)
        raise SystemExit(130)
    if env.distributed:
        dist.barrier()  # without it some ranks aborted at exit (FACTS.md §5)
        dist.destroy_process_group()
    return out


def save(model, tokenizer, path: str, files: dict, env: Env):
    """π_{t+1} in Hugging Face format (safetensors) with its tokenizer, the iteration's samples
    (samples.jsonl) and held-out responses (eval.json), written to a temporary folder first and
    renamed, so a crash never leaves a half-written checkpoint. Under FSDP every rank takes part in
    assembling the full state dict; rank 0 writes it."""
    state = None
    if env.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        for key in getattr(model, "all_tied_weights_keys", {}):  # e.g. GPT-2's lm_head = wte: store it once
            state.pop(key, None)
    if env.rank == 0:
        with uninterrupted():  # Ctrl-C waits for the save: it holds a whole iteration
            tmp = path + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp, state_dict=state)
            tokenizer.save_pretrained(tmp)
            with open(os.path.join(tmp, "samples.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in files["samples"])
            write_json(os.path.join(tmp, "eval.json"), files["eval"])
            os.replace(tmp, path)
    if env.distributed:
        dist.barrier()  # nobody reads or moves on before the checkpoint exists


# ----------------------------------------------------------------------------------------
# Demo (--demo nash): why self-play, not Bradley-Terry. The exact SPPO update on a game of three
# responses whose preferences form a rock-paper-scissors cycle, so no score explains them.

GAME = torch.tensor([[0.5, 0.9, 0.3],   # P[i, j] = P(y_i ≻ y_j): y_0 ≻ y_1 ≻ y_2 ≻ y_0,
                     [0.1, 0.5, 0.8],   # with P + Pᵀ = 1
                     [0.7, 0.2, 0.5]], dtype=torch.float64)


def nash_equilibrium(P):
    """π* of the symmetric constant-sum game: no response beats it, P π* = ½ (a fully mixed
    equilibrium, as a cycle has), with Σ π* = 1: a small linear system."""
    n = len(P)
    A = torch.cat([P - 0.5, torch.ones(1, n, dtype=P.dtype)])           # [n + 1, n]
    b = torch.cat([torch.zeros(n, dtype=P.dtype), torch.ones(1, dtype=P.dtype)])
    return torch.linalg.lstsq(A, b[:, None]).solution[:, 0]


def exploitability(P, pi):
    """How much the best single response beats π: max_y P(y ≻ π) − ½; 0 exactly at π*."""
    return ((P @ pi).max() - 0.5).item()


def sppo_game(P, eta: float, T: int):
    """The iterates π_1..π_T of π_{t+1}(y) ∝ π_t(y) exp(η P(y ≻ π_t)), from the uniform policy."""
    pi, iterates = torch.full((len(P),), 1 / len(P), dtype=P.dtype), []
    for _ in range(T):
        iterates.append(pi)
        pi = pi * torch.exp(eta * (P @ pi))
        pi = pi / pi.sum()
    return torch.stack(iterates)                                         # [T, n]


def bradley_terry_fit(P, steps: int = 500):
    """The scores r that best explain P as σ(r_i − r_j) (maximum likelihood on soft labels)."""
    r = torch.zeros(len(P), dtype=P.dtype, requires_grad=True)
    opt = torch.optim.Adam([r], lr=0.05)
    for _ in range(steps):
        loss = -(P * F.logsigmoid(r[:, None] - r[None, :])).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return r.detach()


def nash_demo(eta: float, T: int) -> list[dict]:
    P, star = GAME, nash_equilibrium(GAME)
    iterates = sppo_game(P, eta, T)
    average = iterates.cumsum(0) / torch.arange(1, T + 1, dtype=P.dtype)[:, None]
    print(f"a game of 3 responses with a cycle; its Nash equilibrium π* = {[round(x, 3) for x in star.tolist()]}")
    print(f"SPPO's exact update, η = {eta}: the average policy converges to π*, the last iterate keeps cycling")
    print("      t   |avg − π*|₁   exploitability(avg)   |last − π*|₁")
    rows = []
    for t in sorted({1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, T} & set(range(1, T + 1))):
        rows.append(dict(t=t, distance=(average[t - 1] - star).abs().sum().item(),
                         exploitability=exploitability(P, average[t - 1]),
                         last_distance=(iterates[t - 1] - star).abs().sum().item()))
        print(f"  {t:5}   {rows[-1]['distance']:10.4f}   {rows[-1]['exploitability']:19.4f}   {rows[-1]['last_distance']:12.4f}")
    r = bradley_terry_fit(P)
    best = torch.nn.functional.one_hot(r.argmax(), len(P)).to(P.dtype)
    print(f"Bradley-Terry's best fit: scores {[round(x, 3) for x in r.tolist()]}; its best response is the single "
          f"response {r.argmax().item()}, which response {(P @ best).argmax().item()} beats with probability "
          f"{(P @ best).max().item():.2f} (exploitability {exploitability(P, best):.3f}); "
          f"SPPO's average after {T} iterations: {rows[-1]['exploitability']:.4f}")
    return rows


# ----------------------------------------------------------------------------------------
# Plumbing: the tiny model, prompt loading, command line.

def load_policy(path: str, cfg: Config, env: Env):
    """The policy and its tokenizer (the built-in tiny model, or a Hugging Face folder or hub id),
    dropout off, sharded under torchrun."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging
    logging.disable_progress_bar()  # keep our own bars only
    if path == "tiny":
        model, tokenizer = tiny_model(cfg.seed)
    else:
        cuda_only = dict(attn_implementation="sdpa" if cfg.sdpa else "eager") if env.device.type == "cuda" else {}
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                         trust_remote_code=cfg.trust_remote_code, **cuda_only)
        except (OSError, ValueError) as e:
            fail(f"cannot load --model {path}: it is not a preset ({', '.join(PRESETS)}), a model folder, "
                 f"or a hub id that can be downloaded ({first_line(e)})")
    if tokenizer.eos_token_id is None:
        fail(f"the tokenizer of {path} has no EOS token, so responses could never end: set eos_token in its "
             "tokenizer_config.json")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    disable_dropout(model)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    shard(model, env) if env.distributed else model.to(env.device)
    return model.eval(), tokenizer


def render_all(tokenizer, prompts: list[str], limit: int):
    """Rendered texts and ids; a prompt longer than limit (the context minus the sampling budget)
    keeps its last limit tokens."""
    texts, ids = zip(*[render_prompt(tokenizer, p) for p in prompts])
    if cut := sum(len(x) > limit for x in ids):
        warn(f"{cut} prompt(s) longer than {limit} tokens keep their last {limit}")
    return texts, [x[-limit:] for x in ids]


TINY_CHAT_TEMPLATE = "{{ bos_token }}{% for m in messages %}Q: {{ m['content'] }}{% endfor %}" \
                     "{% if add_generation_prompt %} A:{% endif %}"


def tiny_tokenizer():
    """One token per printable ASCII character (plus newline), built in code: no download."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast
    vocab = ["<pad>", "<s>", "</s>", "<unk>"] + [chr(i) for i in range(32, 127)] + ["\n"]
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(vocab)}, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", chat_template=TINY_CHAT_TEMPLATE)


def tiny_model(seed: int):
    """A random 2-layer Llama (~0.1M parameters) that learns the toy judge in seconds on a CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config), tok


def builtin_prompts() -> list[str]:
    """128 short prompts, shuffled with a fixed seed: the first 96 train, the last 32 are held out."""
    topics = ["the sea", "a cat", "rain", "the moon", "bread", "a river", "old trees", "winter",
              "a city", "music", "the wind", "a garden", "fire", "snow", "a bridge", "stars"]
    asks = ["Tell me about {}.", "Describe {}.", "Write a line on {}.", "What is {}?",
            "Say something about {}.", "Give a word for {}.", "Sing of {}.", "Name {}."]
    prompts = [a.format(t) for t in topics for a in asks]
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(0)).tolist()
    return [prompts[i] for i in order]


def load_prompts(cfg: Config, t: int) -> list[str]:
    """The prompt set of iteration t, from the built-in list, a local file or the hub."""
    if cfg.prompts == "builtin":
        prompts = builtin_prompts()
    else:
        import datasets
        source = cfg.prompts.replace("{t}", str(t))
        kinds = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
        ext = os.path.splitext(source)[1].lower()
        if ext in kinds and not os.path.isfile(source):
            fail(f"prompt file '{source}' not found: check --prompts")
        try:
            ds = (datasets.load_dataset(kinds[ext], data_files=source, split="train") if ext in kinds
                  else datasets.load_dataset(source, split=cfg.prompt_split))
        except Exception as e:  # unreadable, malformed, or not on the hub: the message names it
            fail(f"cannot read prompts '{source}': {first_line(e)}")
        if cfg.prompt_field not in ds.column_names:
            fail(f"no field '{cfg.prompt_field}' in {source}; it has {ds.column_names}: pass --prompt-field")
        prompts = list(ds[cfg.prompt_field])
    prompts = prompts[: cfg.num_prompts] if cfg.num_prompts else prompts
    kept = [p for p in prompts if isinstance(p, str) and p.strip()]
    if len(kept) < len(prompts):
        warn(f"skipped {len(prompts) - len(kept)} empty prompt(s) in '{cfg.prompts}'")
    if not kept:
        fail(f"no prompts in '{cfg.prompts}'")
    return kept


# Architecture facts of the presets, so that --dry-run needs no download.
ARCH = {"mistralai/Mistral-7B-Instruct-v0.2": dict(params=7.24e9, layers=32, hidden=4096, kv_dim=1024, vocab=32000),
        "meta-llama/Meta-Llama-3-8B-Instruct": dict(params=8.03e9, layers=32, hidden=4096, kv_dim=1024, vocab=128256),
        "openai-community/gpt2": dict(params=124e6, layers=12, hidden=768, kv_dim=768, vocab=50257)}
PAIRRM_PARAMS = 436e6


def memory_plan(cfg: Config, a: dict, gpus: int) -> dict:
    """GiB per GPU in each phase, from first principles (bf16 = 2 bytes, fp32 = 4)."""
    G, P = 2**30, a["params"]
    shards = 4 * P / gpus                                          # fp32 master weights, sharded
    rows = cfg.sample_batch_size * cfg.k                           # sequences decoded at once per GPU
    kv = 2 * a["layers"] * a["kv_dim"] * 2 * rows * (cfg.max_prompt_length + cfg.max_new_tokens)
    per_prompt = 2 if cfg.pairs == "winner-loser" else cfg.k
    tokens = max(1, cfg.batch_size // (cfg.grad_accum * gpus)) * per_prompt * cfg.max_length  # micro-batch
    saved = a["layers"] if cfg.grad_checkpointing else 34 * a["layers"]   # ~34·h bytes/token/layer w/o (Korthikanti)
    act = tokens * a["hidden"] * 2 * (saved + 34) + tokens * a["vocab"] * 10  # + one layer's recompute, logits
    opt = (4 if cfg.optimizer == "rmsprop" else 8) * P / gpus
    return dict(sampling=(shards + 2 * P + kv) / G,                # + the gathered bf16 copy + KV cache
                judging=(shards + 2 * PAIRRM_PARAMS) / G + 8,      # + PairRM in bf16 + ~8 GiB of its activations
                training=(shards + 4 * P / gpus + opt + 2 * 2 * P / a["layers"] + act) / G)  # + grads, state, 2 layers


def dry_run(cfg: Config):
    print("resolved recipe (the authors' value where it differs):")
    for f in dataclasses.fields(Config):
        value, own = getattr(cfg, f.name), f.name in ("model", "out", "dry_run")
        print(f"  --{f.name.replace('_', '-'):22} {value!s:50}" + ("" if own or value == f.default else f" (authors: {f.default})"))
    a = ARCH.get(cfg.model)
    if a is None and os.path.isfile(os.path.join(cfg.model, "config.json")):
        from transformers import AutoConfig, AutoModelForCausalLM
        c = AutoConfig.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
        with torch.device("meta"):
            n = sum(p.numel() for p in AutoModelForCausalLM.from_config(c).parameters())
        heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        a = dict(params=n, layers=c.num_hidden_layers, hidden=c.hidden_size, vocab=c.vocab_size,
                 kv_dim=heads * getattr(c, "head_dim", c.hidden_size // c.num_attention_heads))
    if a is None:
        print(f"memory plan: unknown for {cfg.model} without its config.json (pass a local folder)")
        return
    print(f"memory plan for {a['params'] / 1e9:.2f}B parameters, GiB per GPU "
          f"(fp32 master weights, {cfg.optimizer} state and gradients sharded by FSDP; bf16 compute):")
    print("  GPUs  prompts/GPU/micro-step  sampling  judging  training  fits 80 GB")
    for gpus in (8, 4, 2, 1):
        m = memory_plan(cfg, a, gpus)
        micro = max(1, cfg.batch_size // (cfg.grad_accum * gpus))
        print(f"  {gpus:4}  {micro:22}  {m['sampling']:8.1f}  {m['judging']:7.1f}  {m['training']:8.1f}  "
              f"{'yes' if max(m.values()) < 80 else 'no'}")
    print("  fewer GPUs: raise --grad-accum to keep prompts/GPU/micro-step; lower --sample-batch-size for the "
          "KV cache.\n  The fp32 weights, gradients and optimiser state need 12 bytes per parameter in all: "
          f"{12 * a['params'] / 2**30:.0f} GiB, to be divided among the GPUs.\n"
          f"  host RAM: each process loads the fp32 checkpoint ({4 * a['params'] / 2**30:.1f} GiB) before sharding")


def plot_curves(out: str):
    """DIR/curves.png: held-out win rates per iteration, and the winner's and loser's log-ratios
    per step, when matplotlib is installed (it is optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say0(f"pip install matplotlib to get {out}/curves.png (win rates and log-ratios)")
        return None
    ms = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    iters = [m for m in ms if m.get("win_rate_vs_base") is not None]
    steps = [m for m in ms if "step" in m]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("win_rate_vs_base", "against the start"), ("win_rate_vs_prev", "against the previous")):
        left.plot([m["iteration"] for m in iters], [m[key] for m in iters], "o-", label=label)
    left.axhline(0.5, color="grey", lw=0.5)
    left.set_xticks([m["iteration"] for m in iters])
    left.set(xlabel="iteration", ylabel="held-out win rate", title="SPPO iterates")
    for key, label in (("winner_logratio", "winner"), ("loser_logratio", "loser")):
        right.plot(range(1, len(steps) + 1), [m[key] for m in steps], label=label)
    right.axhline(0, color="grey", lw=0.5)
    right.set(xlabel="optimiser step (all iterations)", ylabel="log π_θ(y|x) − log π_t(y|x)", title="log-ratios")
    for ax in (left, right):
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"))
    plt.close(fig)
    return os.path.join(out, "curves.png")


RUN_ONLY = {"out", "resume", "overwrite", "debug", "dry_run", "iterations"}  # may differ on --resume


def prepare_out(cfg: Config, env: Env):
    """The output folder: a new one; or an earlier run's, replaced (--overwrite, our files only) or
    continued (--resume, from the first iteration without a saved iter{t}/). Returns (folder, start)."""
    out = cfg.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    ours = lambda name: (name in ("config.json", "metrics.jsonl", "eval0.json", "work", "curves.png")
                         or re.fullmatch(r"iter\d+(\.tmp)?", name))
    start = 1
    if cfg.resume:
        start = next((t for t in range(1, cfg.iterations + 1) if not os.path.isdir(os.path.join(out, f"iter{t}"))),
                     cfg.iterations + 1)
    elif os.path.isdir(out) and os.listdir(out) and not cfg.overwrite:
        fail(f"--out {out} exists and is not empty: pass --resume {out} to continue it, --overwrite to replace "
             "its outputs, or another --out")
    if env.distributed:
        dist.barrier()  # every rank has looked before rank 0 writes
    if env.rank == 0:
        if cfg.overwrite and not cfg.resume and os.path.isdir(out):
            for name in filter(ours, os.listdir(out)):
                path = os.path.join(out, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        os.makedirs(os.path.join(out, "work"), exist_ok=True)
        write_json(os.path.join(out, "config.json"), dataclasses.asdict(cfg), indent=2)
        metrics = os.path.join(out, "metrics.jsonl")
        if os.path.isfile(metrics):  # keep the whole lines of finished iterations only
            lines = [x for x in open(metrics) if x.endswith("}\n") and json.loads(x)["iteration"] < start]
            with uninterrupted():
                with open(metrics + ".tmp", "w") as f:
                    f.writelines(lines)
                os.replace(metrics + ".tmp", metrics)
    if env.distributed:
        dist.barrier()
    if start > 1:
        say0(f"resuming {out} at iteration {start}")
    return out, start


def stage(path: str, env: Env, compute):
    """A stage's result: read back if an earlier run finished it, else computed and written
    atomically by rank 0. The file's existence is the record that the stage is done."""
    if os.path.exists(path):
        return read_json(path)
    result = compute()
    if env.rank == 0:
        write_json(path, result)
    return result


@contextmanager
def uninterrupted():
    """Defer Ctrl-C until the block (an atomic write) is done, so an interrupt never costs a file."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *args: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


def write_json(path: str, obj, indent=None):
    with uninterrupted():
        with open(path + ".tmp", "w") as f:
            json.dump(obj, f, indent=indent)
        os.replace(path + ".tmp", path)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


class UserError(Exception):
    """Bad input: main prints it as one line and exits with code 2 (with a traceback under --debug)."""


def fail(message: str):
    raise UserError(message)


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def say0(message: str):
    """A note on standard error, from rank 0 only."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"sppo: {message}", file=sys.stderr)


warn = lambda message: say0(f"warning: {message}")


def parse_config(argv=None) -> Config:
    """Flags come from Config's fields. Precedence: the authors' default < preset < explicit flag."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    hints = get_type_hints(Config)
    for f in dataclasses.fields(Config):
        kind, flag = hints[f.name], "--" + f.name.replace("_", "-")
        kw = dict(default=None, help=f"{f.metadata['help']} (default: {f.default})")
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif getattr(kind, "__origin__", None) is Literal:
            p.add_argument(flag, choices=get_args(kind), **kw)
        else:
            base = next((a for a in get_args(kind) if a is not type(None)), kind)  # Optional[int] -> int
            p.add_argument(flag, type=base, **kw)
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    preset = lambda name: {"model": name, **PRESETS.get(name, {})}  # a preset name fills in the id and recipe
    if "resume" in given:  # the saved config, and every flag given must agree with it
        path = os.path.join(given["resume"], "config.json")
        if not os.path.isfile(path):
            fail(f"--resume {given['resume']}: no config.json there, so it is not an sppo run folder")
        saved = {k: v for k, v in read_json(path).items() if k in {f.name for f in dataclasses.fields(Config)}}
        asked = {**(preset(given["model"]) if "model" in given else {}),
                 **{k: v for k, v in given.items() if k != "model"}}
        diff = [f"--{k.replace('_', '-')} {v} (saved: {saved.get(k)})" for k, v in asked.items()
                if k not in RUN_ONLY and saved.get(k) != v]
        if diff:
            fail(f"--resume {given['resume']} was started with another config: {'; '.join(diff)}; "
                 "drop those flags, or start a new run")
        cfg = Config(**{**saved, **{k: v for k, v in given.items() if k in RUN_ONLY}, "out": given["resume"]})
    elif "demo" in given:
        cfg = Config(**{"eta": 0.2, "iterations": 1000, **given})
    else:
        name = given.pop("model", Config.model)
        cfg = Config(**{**preset(name), **given})
    if cfg.k < 2:
        fail(f"--k {cfg.k}: SPPO compares responses, so K must be at least 2")
    if cfg.eta <= 0:
        fail(f"--eta {cfg.eta}: η must be positive")
    if cfg.loss != "sppo" and cfg.pairs != "winner-loser":
        fail(f"--loss {cfg.loss} trains on winner/loser pairs: add --pairs winner-loser")
    if cfg.batch_size % cfg.grad_accum:
        fail(f"--batch-size {cfg.batch_size} is not divisible by --grad-accum {cfg.grad_accum}")
    return cfg


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse_config(argv)
        if cfg.demo not in (None, "nash"):
            fail(f"--demo {cfg.demo}: the only demo is 'nash'")
        nash_demo(cfg.eta, cfg.iterations) if cfg.demo else dry_run(cfg) if cfg.dry_run else run(cfg)
    except UserError as e:
        if "--debug" in argv:
            raise
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"sppo: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
