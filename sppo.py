"""
Self-Play Preference Optimization (SPPO; Wu et al. 2024, arXiv 2405.00675) in one file.

A preference model P(y ≻ y' | x), transitive or not, makes alignment a constant-sum game. SPPO
approaches its Nash equilibrium by multiplicative weights, π_{t+1}(y|x) ∝ π_t(y|x) exp(η P(y ≻
π_t | x)). Taking logs, with log Z at its value under π_t (η/2), gives a regression:

    θ_{t+1} = argmin_θ E_{x, y~π_t} (log π_θ(y|x) − log π_t(y|x) − η (P̂(y ≻ π_t|x) − ½))²

Algorithm 1, one iteration t, in this file's order:
    1. sample K responses per prompt from π_t               -> sample_responses(), sample()
    2. judge every ordered pair                             -> judge_all()
    3. each response's win rate P̂ against π_t               -> pairwise_probs(), win_rates()
    4. minimise the squared loss: the result is π_{t+1}     -> train_iteration(), sppo_loss()

Defaults are the authors' recipe (K 5, T 0.7, top-p 0.9, η 1000, RMSprop lr 5e-7, winner and
loser by aggregated PairRM scores); `--pairs all --pair-prob paper` is Algorithm 1 as printed.
Left out: vLLM, DeepSpeed, LoRA, a Trainer class.

    python sppo.py                                          # tiny model, toy judge, CPU
    python sppo.py --model smollm2-135m                     # a real chat model, the panel
    torchrun --nproc_per_node 8 sppo.py --model mistral-7b  # the paper's run, FSDP2
    python sppo.py --model mistral-7b --dry-run             # the recipe, the memory plan
    python sppo.py --demo nash                              # exact SPPO on a cyclic game
"""

import argparse, copy, dataclasses, datetime, fcntl, functools, hashlib, itertools, json, math
import os, re, shutil, signal, sys, time, traceback
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

# --- Config: the authors' values; a preset overrides some; a flag given beats both.


def arg(default, help, authors=True):  # --help shows the authors' value
    said = authors and default is not None and not isinstance(default, bool)
    return field(default=default, metadata={"help": help + said * f" (authors: {default})"})


@dataclass
class Config:
    model: str = arg("tiny", "preset, model folder, hub id or FILE.gguf: π_1", authors=False)
    prompts: str = arg("UCLA-AGI/data-mistral-7b-instruct-sppo-iter{t}",
                       "builtin, a hub dataset or a .json/.jsonl/.parquet/.csv/.txt file")
    prompt_field: str = arg("prompt", "the prompts' column")
    prompt_split: str = arg("train", "the hub dataset's split")
    num_prompts: Optional[int] = arg(None, "the first N prompts of each set")
    eval_prompts: int = arg(32, "held out: the end of set 1, at most a quarter", authors=False)
    eval_set: Optional[str] = arg(None, "AlpacaEval's instructions, to answer")
    judge: str = arg("llm-blender/PairRM", "toy, panel, FILE.py, or PairRM's folder or hub id")
    out: Optional[str] = arg(None, "the run's folder (runs/<date-time>)")
    iterations: int = arg(3, "T")
    k: int = arg(5, "K, responses per prompt")
    max_new_tokens: int = arg(2048, "new tokens per response")
    temperature: float = arg(0.7, "sampling temperature")
    top_p: float = arg(0.9, "nucleus mass")
    max_length: int = arg(1024, "prompt + response in training")
    max_prompt_length: int = arg(512, "prompt tokens kept if too long")
    pair_prob: Literal["official", "paper"] = arg("official", "authors' code, or the paper's")
    pairs: Literal["winner-loser", "all"] = arg("winner-loser", "authors' code, or the paper's")
    loss: Literal["sppo", "sppo_hard", "dpo", "ipo"] = arg("sppo", "others to compare")
    eta: float = arg(1000.0, "η, the authors' 1/β")
    optimizer: Literal["rmsprop", "adamw"] = arg("rmsprop", "the optimiser")
    lr: float = arg(5e-7, "peak learning rate")
    lr_schedule: Literal["linear", "constant"] = arg("linear", "after warm-up")
    warmup_ratio: float = arg(0.1, "share of steps warming up")
    epochs: int = arg(1, "passes over an iteration's data")
    batch_size: int = arg(64, "prompts per optimiser step, all ranks")
    grad_accum: int = arg(1, "micro-batches per step", authors=False)
    grad_checkpointing: bool = arg(True, "recompute activations (authors: on)")
    sample_batch_size: int = arg(16, "prompts per sampling call", authors=False)
    judge_batch_size: int = arg(32, "PairRM pairs per forward", authors=False)
    seed: int = arg(42, "every random stream's")
    kl: bool = arg(True, "report the held-out KL(π_t ‖ π_1); keeps π_1 in memory")
    bf16: bool = arg(True, "bf16 compute on fp32 weights (authors); by default on CUDA only")
    cuda_graph: bool = arg(True, "CUDA: decode by replaying a CUDA graph")
    trust_remote_code: bool = arg(False, "run the model's own code from the hub")
    dry_run: bool = arg(False, "print the recipe and the memory plan")
    resume: Optional[str] = arg(None, "continue the run in this folder")
    debug: bool = arg(False, "a traceback for input errors")
    demo: Optional[Literal["nash"]] = arg(None, "exact SPPO on a cyclic game")


# --- Distributed setup. torchrun sets RANK; a plain `python sppo.py` never makes a process group.
# Ranks share the no-grad work by chunks of prompts, and each global batch in training.


@dataclass
class Env:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    distributed: bool = False
    bf16: bool = False
    cuda_graph: bool = False

    def amp(self):  # bf16 compute on fp32 master weights, the authors' precision
        if not self.bf16:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def to(self, t):  # on CUDA through page-locked memory, without waiting
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)


def setup(cfg: Config) -> Env:
    cuda = torch.cuda.is_available()
    env = Env(device=torch.device("cuda" if cuda else "cpu"), cuda_graph=cuda and cfg.cuda_graph)
    env.bf16 = cfg.bf16 and (not cuda or torch.cuda.get_device_capability() >= (8, 0))
    torch.backends.cuda.matmul.allow_tf32 = True  # for the fp32 matmuls left
    if "RANK" in os.environ:
        if cuda:
            env.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(env.device)
        # rank 0 alone reads, or first downloads, the checkpoint while the others wait
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=1))
        env.rank, env.world, env.distributed = dist.get_rank(), dist.get_world_size(), True
    hint = ""
    if not (cuda or env.bf16) and os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:  # AMX, AVX512-BF16, or Arm's BF16
            if {"amx_bf16", "avx512_bf16", "bf16"} & set(f.read().split()):
                hint = ", though this CPU has bf16 units: --bf16 may be faster (other figures)"
    say0(f"{'bf16' if env.bf16 else 'fp32'} on {env.device.type}{hint}")
    return env


# --- Models and prompts: the policy is a transformers causal LM; prompts go through its template.


def seed_for(*keys: int) -> int:  # e.g. (seed, t, prompt, sample): batch sizes change no draw
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def render_prompt(tokenizer, prompt: str) -> tuple[str, list[int]]:
    """Text (the judge's source) and ids of a user turn and the generation prompt; without a
    chat template (GPT-2): 'User: …\\nAssistant:'."""
    if not tokenizer.chat_template:
        text = f"User: {prompt}\nAssistant:"
        return text, tokenizer(text).input_ids
    turn = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    return text, tokenizer(text, add_special_tokens=False).input_ids


def truncate(prompt_ids, responses, max_length: int, max_prompt_length: int):
    """The authors' (TRL's) rule: if prompt + longest response > max_length, the prompt keeps
    its last max_prompt_length tokens, and a response still too long max_length − that many."""
    if len(prompt_ids) + max(map(len, responses)) > max_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
    cut = max_length - max_prompt_length
    fits = [r if len(prompt_ids) + len(r) <= max_length else r[:cut] for r in responses]
    return prompt_ids, fits


def pad(seqs: list[list[int]], pad_id: int, left: bool):  # left for sampling, right for training
    side = "left" if left else "right"
    ids = [torch.tensor(s, dtype=torch.long) for s in seqs]
    mask = [torch.ones_like(s) for s in ids]
    return pad_sequence(ids, True, pad_id, side), pad_sequence(mask, True, 0, side)  # [B, n] each


# --- Algorithm 1, step 1: sample K responses y_1..y_K ~ π_t(·|x) for each prompt.

ROUNDS = 3  # draws from the full distribution before the sorted fallback


def inverse_cdf(probs, u):  # per row, the first token whose CDF exceeds u · the total
    cdf = probs.cumsum(-1)  # [B, V]
    token = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)  # [B, 1]
    return token.clamp_max(cdf.shape[-1] - 1)[:, 0]


def nucleus(probs, top_p: float):  # top-p by its definition: a sort
    s = probs.sort(-1, descending=True).values  # [B, V]
    kept = (s.cumsum(-1) - s) < top_p  # the tokens whose more probable ones hold < top_p
    least = s.gather(-1, kept.sum(-1, keepdim=True) - 1)  # [B, 1]
    return probs >= least


def next_token(logits, temperature: float, top_p: float, u):
    """A token per row from softmax(logits / T) in the top-p nucleus, without the sort that
    costs a CPU most of a 135M model's step: a draw outside the nucleus is redrawn (kept draws
    follow the nucleus exactly), ROUNDS times, then the sort."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [B, V]
    token = inverse_cdf(probs, u[:, 0])  # [B]
    if top_p == 1:
        return token
    rows, p = torch.arange(len(probs), device=probs.device), probs  # rows still drawing
    for r in range(1, ROUNDS + 1):
        drawn = p.gather(-1, token[rows, None])  # [b, 1]
        outside = (p * (p > drawn)).sum(-1) >= top_p  # [b]
        rows, p = rows[outside], p[outside]
        if len(rows) == 0:
            break
        if r == ROUNDS:
            p = p * nucleus(p, top_p)
        token[rows] = inverse_cdf(p, u[rows, r])
    return token


@torch.no_grad()
def sample(model, input_ids, attention_mask, *, max_new_tokens: int, temperature: float,
           top_p: float, eos_token_id, pad_token_id: int, k: int = 1, generator=None,
           static: bool = False, cuda_graph: bool = False):
    """k responses to each left-padded prompt, one prefill per prompt: [B·k, max_new_tokens],
    row i·k + j prompt i's j-th response. generator: one, or one per row (batch-mates then
    change nothing)."""
    from transformers import DynamicCache

    B, device = input_ids.shape[0] * k, input_ids.device
    shape = (ROUNDS + 1, max_new_tokens)  # every step's uniforms, drawn up front
    gens = generator if isinstance(generator, (list, tuple)) else [generator] * B
    u = torch.stack([torch.rand(shape, generator=g, device=device) for g in gens])  # [B, R, N]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)  # [B/k, T]
    cache = DynamicCache(config=model.config)
    logits = next_logits(model, input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, cache=cache)
    logits = logits.repeat_interleave(k, 0)  # [B, V]
    mask = attention_mask.repeat_interleave(k, 0)  # [B, T]
    position_ids = position_ids[:, -1:].repeat_interleave(k, 0)  # [B, 1]
    # a sliding window's static cache decides "full" by a Python int, which a graph freezes
    window = getattr(model.config, "sliding_window", None) or math.inf
    static = static and window >= mask.shape[1] + max_new_tokens
    Decoder = StaticDecoder if static else DynamicDecoder
    decoder = Decoder(model, cache, k, mask, max_new_tokens, cuda_graph)
    eos = torch.tensor(eos_token_id, device=device).view(-1)  # Llama 3 has two
    out = torch.full((B, max_new_tokens), pad_token_id, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        token = next_token(logits, temperature, top_p, u[:, :, step])  # [B]
        token = torch.where(done, pad_token_id, token)
        out[:, step] = token
        done |= torch.isin(token, eos)
        # done.all() waits for the GPU: look every 8 steps
        if step == max_new_tokens - 1 or (step % 8 == 7 and done.all()):
            break
        position_ids = position_ids + 1
        logits = decoder(token[:, None], position_ids)  # [B, V]
    return out


def strip_response(tokens: list[int], eos_ids: list[int]) -> list[int]:  # up to its first EOS
    end = next((i for i, t in enumerate(tokens) if t in eos_ids), len(tokens) - 1)
    return tokens[: end + 1]


def sample_responses(model, tokenizer, prompt_ids, cfg: Config, tag: int, env: Env, desc: str):
    """K responses per prompt (ids, EOS kept); (i, j) draws from the stream (seed, tag, i, j):
    tag t, or −1 held out, −2 --eval-set, so every policy is evaluated on the same numbers."""
    eos = eos_token_ids(model, tokenizer)

    def chunk(start, prompts):
        ids, mask = pad(prompts, tokenizer.pad_token_id, left=True)
        gens = [torch.Generator(env.device).manual_seed(seed_for(cfg.seed, tag, start + i, j))
                for i in range(len(prompts)) for j in range(cfg.k)]
        with env.amp():
            out = sample(model, env.to(ids), env.to(mask), max_new_tokens=cfg.max_new_tokens,
                         temperature=cfg.temperature, top_p=cfg.top_p, eos_token_id=eos,
                         pad_token_id=tokenizer.pad_token_id, k=cfg.k, generator=gens,
                         static=env.cuda_graph, cuda_graph=env.cuda_graph)
        out = [strip_response(r, eos) for r in out.tolist()]
        return [out[i : i + cfg.k] for i in range(0, len(out), cfg.k)]

    with full_weights(model):
        return map_chunks(chunk, list(prompt_ids), cfg.sample_batch_size, env, desc)


# --- Algorithm 1, step 2: judge every ordered pair: M[i, j], the logit that y_i beats y_j.


def judge_all(judge, prompts: list[str], candidates: list[list[str]], env: Env, desc: str):
    """M for every prompt, [N, K, K], split across ranks (the judges follow run())."""

    def chunk(start, cands):
        return list(judge.logit_matrices(prompts[start : start + len(cands)], cands))

    return torch.stack(map_chunks(chunk, candidates, 16, env, desc))


def preference_cycles(logits):
    """[N]: whether a prompt's responses hold a cycle y_a ≻ y_b ≻ … ≻ y_a, which no score
    orders. Warshall: paths through m join paths into m."""
    reach = (logits - logits.transpose(-1, -2)) > 0  # i ≻ j, [N, K, K]
    for m in range(logits.shape[-1]):
        reach = reach | (reach[:, :, m, None] & reach[:, None, m, :])
    return reach.diagonal(dim1=-2, dim2=-1).any(-1)  # i ≻ … ≻ i


# --- Algorithm 1, step 3: win rates P̂(y_i ≻ π_t | x) = (1/K) Σ_j P(y_i ≻ y_j | x).


def pairwise_probs(logits, method: str):
    """P[..., i, j] = P(y_i ≻ y_j) from M (its diagonal ignored); both give P + Pᵀ = 1.
    official (authors' code): s_i = (1/K) Σ_j (M_ij − M_ji), P_ij = σ(s_i − s_j).
    paper: the judge's own probability over both orders, σ(½(M_ij − M_ji))."""
    anti = logits - logits.transpose(-1, -2)  # M_ij − M_ji, [..., K, K]
    if method == "official":
        s = anti.mean(-1)  # [..., K]
        return torch.sigmoid(s[..., :, None] - s[..., None, :])
    if method == "paper":
        return torch.sigmoid(anti / 2)
    raise ValueError(f"unknown pairwise probability method {method!r}")


def win_rates(P):  # P̂_i = mean_j P_ij, the self term P_ii = ½ included, as the authors do
    return P.mean(-1)  # [..., K]


def training_set(prompt_ids, responses, P_hat, cfg: Config):
    """Step 4's (x, y, P̂) per prompt: all K responses, or the winner argmax P̂ and the loser
    argmin P̂ (authors' code). A prompt whose responses all tie gives no signal."""
    winners = P_hat.argmax(-1).tolist()
    losers = P_hat.argmin(-1).tolist()
    groups = []
    for i, resp in enumerate(responses):
        w, l = winners[i], losers[i]
        if w == l:
            continue
        chosen = [w, l] if cfg.pairs == "winner-loser" else range(len(resp))
        role = {w: "winner", l: "loser"}
        prompt, kept = truncate(list(prompt_ids[i]), [resp[j] for j in chosen],
                                cfg.max_length, cfg.max_prompt_length)
        groups.append([dict(prompt=prompt, response=r, win_rate=P_hat[i, j].item(),
                            role=role.get(j, "other")) for j, r in zip(chosen, kept)])
    return groups, winners, losers


# --- Algorithm 1, step 4: the SPPO loss and the update θ_t -> θ_{t+1}.


def sequence_logps(model, input_ids, segment, position_ids, chunk_logits: int = 2**24):
    """log π(y|x) = Σ_n log π(y_n | x, y_<n) per response (segment: 0 prompt, i + 1 response
    i, −1 padding). The LM head runs at response tokens only, ~chunk_logits at a time,
    recomputed in backward: the [tokens × vocabulary] logits never exist."""
    hidden = last_hidden(model, input_ids, attention_mask=(segment >= 0).long(),
                         position_ids=position_ids, use_cache=False)  # [B, T, H]
    rows, cols = (segment > 0).nonzero(as_tuple=True)  # response tokens, [N] each
    hidden = hidden[rows, cols - 1]  # each token is predicted by the one before, [N, H]
    target = input_ids[rows, cols]  # [N]
    head = model.get_output_embeddings()
    n = max(1, chunk_logits // head.weight.shape[0])  # tokens per chunk
    logps = torch.cat([checkpoint(token_logps, head, hidden[i : i + n], target[i : i + n],
                                  model.config, use_reentrant=False)
                       for i in range(0, len(target), n)])  # [N]
    per_response = torch.zeros(int(segment.max()), device=logps.device)
    return per_response.index_add(0, segment[rows, cols] - 1, logps)  # [responses]


def token_logps(head, hidden, target, config):
    logits = lm_logits(head(hidden), config)  # [n, V]
    return logits.log_softmax(-1).gather(-1, target[:, None]).squeeze(-1)  # [n]


def sppo_loss(policy_logps, ref_logps, win_rates, eta: float):
    """Per response (log π_θ(y|x) − log π_t(y|x) − η (P̂ − ½))². The ½ is log Z / η: π_t beats
    itself half the time. η is large: P̂ − ½ spans ~±0.4, a log-ratio tens of nats. A winner's
    and a loser's mean is the authors' ½(l_w + l_l)."""
    log_ratio = policy_logps - ref_logps
    target = eta * (win_rates - 0.5)
    return (log_ratio - target) ** 2  # [N]


# For the classroom (--loss), on winner/loser pairs, β = 1/η. SPPO pulls each log-ratio to its
# own target; DPO and IPO see only the gap Δ_w − Δ_l, which can widen while both fall.
def sppo_hard_loss(policy_logps, ref_logps, is_winner, eta: float):  # TRL's: P̂ ∈ {0, 1}
    return sppo_loss(policy_logps, ref_logps, is_winner.float(), eta)  # [N]


def dpo_loss(winner_logratio, loser_logratio, eta: float):  # −log σ(β (Δ_w − Δ_l))
    return -F.logsigmoid((winner_logratio - loser_logratio) / eta)  # [N/2]


def ipo_loss(winner_logratio, loser_logratio, eta: float):  # (Δ_w − Δ_l − 1/(2β))²
    return (winner_logratio - loser_logratio - eta / 2) ** 2  # [N/2]


def batch_loss(name: str, policy_logps, ref_logps, win_rates, roles: list[str], eta: float):
    """A micro-batch's summed loss, over responses or pairs (winner, loser, winner, …)."""
    if name == "sppo":
        return sppo_loss(policy_logps, ref_logps, win_rates, eta).sum()
    if name == "sppo_hard":
        is_winner = torch.tensor([r == "winner" for r in roles], device=policy_logps.device)
        return sppo_hard_loss(policy_logps, ref_logps, is_winner, eta).sum()
    pairs = (policy_logps - ref_logps).view(-1, 2)  # [N/2, (winner, loser)]
    loss = dpo_loss if name == "dpo" else ipo_loss
    return loss(pairs[:, 0], pairs[:, 1], eta).sum()


def lr_at(step: int, total: int, warmup_ratio: float, schedule: str) -> float:
    """The peak lr's share: linear warm-up, then linear decay or constant. The first step
    trains (transformers' schedule runs it at lr 0)."""
    warmup = math.ceil(total * warmup_ratio)
    if step < warmup:
        return (step + 1) / warmup
    return 1.0 if schedule == "constant" else (total - step) / max(1, total - warmup)


def collate(items, pad_id: int):  # sequence_logps' rows: ids, segment, position ids
    rows = [it["prompt"] + it["response"] for it in items]
    segments = [[0] * len(it["prompt"]) + [i + 1] * len(it["response"])
                for i, it in enumerate(items)]
    ids, mask = pad(rows, pad_id, left=False)
    segment = pad(segments, -1, left=False)[0]
    return ids, segment, (mask.cumsum(-1) - 1).clamp_min(0)


def items_logps(model, items, pad_id: int, env: Env):  # of dicts with prompt and response ids
    return sequence_logps(model, *map(env.to, collate(items, pad_id)))  # [len(items)]


def train_iteration(model, groups, cfg: Config, t: int, pad_id: int, env: Env, log):
    """Step 4 over groups (a list of items per prompt), batch_size prompts an optimiser step."""
    # made before any forward: after one, FSDP2's root stays unsharded until a backward
    if cfg.optimizer == "rmsprop":
        opt = torch.optim.RMSprop(model.parameters(), lr=cfg.lr)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, fused=env.device.type == "cuda")
    # π_t's log-probs, once, before any update: π_t is these weights, no second model
    items = [it for g in groups for it in g]
    ref = frozen_logps(model, items, cfg, pad_id, env, f"iter {t} reference")
    for it, lp in zip(items, ref):
        it["ref_logp"] = lp
    model.train()  # dropout is off: train mode turns on gradient checkpointing only
    steps = cfg.epochs * math.ceil(len(groups) / cfg.batch_size)
    bar = tqdm(total=steps, desc=f"iter {t} train", leave=False, disable=env.rank != 0)
    step = 0
    for epoch in range(cfg.epochs):
        shuffle = torch.Generator().manual_seed(seed_for(cfg.seed, t, epoch))
        order = torch.randperm(len(groups), generator=shuffle).tolist()
        for b in range(0, len(groups), cfg.batch_size):
            lr = cfg.lr * lr_at(step, steps, cfg.warmup_ratio, cfg.lr_schedule)
            for g in opt.param_groups:
                g["lr"] = lr
            batch = [groups[i] for i in order[b : b + cfg.batch_size]]
            m = train_step(model, opt, batch, cfg, pad_id, env)
            step += 1
            log(iteration=t, step=step, lr=lr, **m)
            bar.set_postfix(loss=f"{m['loss']:.3g}")
            bar.update()
    bar.close()
    model.eval()


def train_step(model, opt, batch, cfg: Config, pad_id: int, env: Env) -> dict:
    """An optimiser step on a batch of prompts; returns what it logs."""
    units = sum(map(len, batch)) // (2 if cfg.loss in ("dpo", "ipo") else 1)  # loss: their mean
    sums = torch.zeros(5, dtype=torch.float64, device=env.device)  # loss; per role Σ and n
    for m in range(cfg.grad_accum):
        # every rank runs every micro-step (FSDP's collectives must match), at weight 0 if a
        # short last batch leaves it none
        mine = batch[m :: cfg.grad_accum][env.rank :: env.world]
        weight = 1.0 if mine else 0.0
        chunk = [it for g in (mine or batch[:1]) for it in g]
        ref = torch.tensor([it["ref_logp"] for it in chunk], device=env.device)  # [n]
        win_rate = torch.tensor([it["win_rate"] for it in chunk], device=env.device)  # [n]
        roles = [it["role"] for it in chunk]
        with env.amp():
            logps = items_logps(model, chunk, pad_id, env)  # [n]
        loss = batch_loss(cfg.loss, logps, ref, win_rate, roles, cfg.eta) * weight / units
        (loss * env.world).backward()  # × world: FSDP averages the ranks' gradients
        sums[0] += loss.item()
        for i, role in enumerate(("winner", "loser")):
            ratios = [r for r, x in zip((logps - ref).tolist(), roles) if x == role]
            sums[1 + 2 * i] += weight * sum(ratios)
            sums[2 + 2 * i] += weight * len(ratios)
    # measured for the log, not clipped: the authors' recipe clips nothing in effect
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: DTensor
    if env.world > 1:
        dist.all_reduce(sums)  # a sum: gloo has no AVG
    loss, winners, n_winners, losers, n_losers = sums.tolist()
    if not (math.isfinite(loss) and math.isfinite(norm)):  # no NaN gets into the weights
        raise FloatingPointError(f"non-finite loss ({loss}) or gradient norm ({norm})")
    opt.step()
    opt.zero_grad(set_to_none=True)
    return dict(loss=loss, grad_norm=norm, winner_logratio=winners / max(n_winners, 1),
                loser_logratio=losers / max(n_losers, 1))


# --- The loop over iterations: Algorithm 1's four steps, then evaluate and save.


def run(cfg: Config):
    """Algorithm 1, T times. Each stage is saved as it ends; --resume goes on from there."""
    env, out = setup(cfg), None
    for sig in (signal.SIGTERM, signal.SIGALRM):  # SIGALRM: on_sigterm's repeat
        signal.signal(sig, on_sigterm)
    try:  # every input is checked before anything is written or loaded
        config = model_config(cfg)  # π_1's: the sharded models' and the iterates' dtype
        dtype = config.dtype or torch.float32
        held_out, prompt_sets = load_prompt_sets(cfg, env)
        eval_set = cfg.eval_set and load_prompts(cfg, 0, "--eval-set")
        judge = load_judge(cfg, env)
        out, start = prepare_out(cfg, env)
        say0(f"the run's folder: {out}")
        last = os.path.join(out, f"iter{start - 1}") if start > 1 else cfg.model
        model, tokenizer = load_policy(last, cfg, env, config)
        # π_1 takes no gradients and no optimiser state: its FSDP2 shards can be bf16
        compute = torch.bfloat16 if env.bf16 and env.distributed else torch.float32
        base = load_policy(cfg.model, cfg, env, config, compute)[0] if cfg.kl and held_out else None
        limit = context_length(model.config) - cfg.max_new_tokens
        held = dict(zip(("text", "ids"), render_all(tokenizer, held_out, limit)))
        held["text"] = judge_sources(judge, held_out, held["text"])
        held["base"] = read_answers(os.path.join(out, "eval0.json"))
        if held["base"] is None:
            held["base"] = evaluate(model, None, judge, tokenizer, held, cfg, env, 0)[0]
            write_json(os.path.join(out, "eval0.json"), with_prompts(held_out, held["base"]), env)
        held["prev"] = read_answers(os.path.join(last, "eval.json")) if start > 1 else held["base"]
        if eval_set and start == 1:
            outputs = alpaca_outputs(model, tokenizer, eval_set, cfg, env, out, "base")
            save(None, None, os.path.join(out, "base"), outputs, env)
        log = functools.partial(log_line, os.path.join(out, "metrics.jsonl"), env)
        for t in range(start, cfg.iterations + 1):
            t0 = time.time()
            work = os.path.join(out, "work", f"iter{t}")
            texts, ids = render_all(tokenizer, prompt_sets[t], limit)
            # Algorithm 1, step 1: K responses per prompt from π_t
            responses = read_json(work + ".samples.json")
            if responses is None:
                responses = sample_responses(model, tokenizer, ids, cfg, t, env, f"iter {t}")
                write_json(work + ".samples.json", responses, env)
            answers = decode_all(tokenizer, responses)
            # step 2: the judge's logit for every ordered pair
            M = read_json(work + ".judged.json")
            if M is None:
                sources = judge_sources(judge, prompt_sets[t], texts)
                M = judge_all(judge, sources, answers, env, f"iter {t} judge").tolist()
                write_json(work + ".judged.json", M, env)
            M = torch.tensor(M)  # [N, K, K]
            # step 3: each response's win rate P̂(y ≻ π_t | x), and the training set
            P_hat = win_rates(pairwise_probs(M, cfg.pair_prob))  # [N, K]
            groups, winners, losers = training_set(ids, responses, P_hat, cfg)
            # step 4: minimise the SPPO loss: π_t becomes π_{t+1}
            train_iteration(model, groups, cfg, t, tokenizer.pad_token_id, env, log)
            # π_{t+1} is the saved iterate, in its base's dtype: the authors' next iteration and a
            # resumed run start from it
            for p in model.parameters():
                p.data.copy_(p.data.to(dtype))
            # evaluate π_{t+1} on the held-out prompts, then save it
            held_answers, m = evaluate(model, base, judge, tokenizer, held, cfg, env, t)
            cycles = int(preference_cycles(M).sum()) if cfg.k >= 3 else None
            m.update(cyclic_prompts=cycles, trained_prompts=len(groups), seconds=time.time() - t0)
            log(**m)
            samples = [dict(prompt=p, responses=a, logits=M[i].tolist(),
                            win_rates=P_hat[i].tolist(), winner=winners[i], loser=losers[i])
                       for i, (p, a) in enumerate(zip(prompt_sets[t], answers))]
            files = {"samples.jsonl": "".join(json.dumps(s) + "\n" for s in samples),
                     "eval.json": with_prompts(held_out, held_answers),
                     "README.md": model_card(cfg, m, t)}
            if eval_set:
                files.update(alpaca_outputs(model, tokenizer, eval_set, cfg, env, out, f"iter{t}"))
            save(model, tokenizer, os.path.join(out, f"iter{t}"), files, env, dtype)
            held["prev"] = held_answers
            say0(iteration_line(m))
        if env.rank == 0:
            plot_curves(out)
            shutil.rmtree(os.path.join(out, "work"), ignore_errors=True)
        if env.distributed:
            dist.barrier()  # no rank leaves the group while another still uses it
    except KeyboardInterrupt as e:  # Ctrl-C, or a scheduler's SIGTERM
        signal.setitimer(signal.ITIMER_REAL, 0)  # caught: on_sigterm's repeats stop
        where = f"every finished stage is saved. Resume with: python sppo.py --resume {out}"
        say0(f"interrupted, {where if out else 'before anything was written'}")
        raise SystemExit(128 + (e.args[0] if e.args else signal.SIGINT))
    except UserError:  # a new run that failed to start leaves nothing to block the next
        if out and env.rank == 0 and not (cfg.resume or os.path.exists(f"{out}/eval0.json")):
            unclaim(out, cfg)
        raise
    except FloatingPointError as e:
        fail(f"{e}: the iterate is not saved; a new run with a lower --lr or --eta")
    except RuntimeError as e:  # out of memory: torch.OutOfMemoryError, or the CPU's allocator
        fail(out_of_memory(e, out))
    finally:  # a gloo group alive at exit frees its threads too late (SIGABRT)
        if env.distributed:
            dist.destroy_process_group()
    return out


# --- Demo (--demo nash): why self-play and not Bradley-Terry. Exact SPPO on three responses whose
# preferences form a rock-paper-scissors cycle, which no score explains.

GAME = torch.tensor([[0.5, 0.9, 0.3],  # P[i, j] = P(y_i ≻ y_j): y_0 ≻ y_1 ≻ y_2 ≻ y_0
                     [0.1, 0.5, 0.8],
                     [0.7, 0.2, 0.5]], dtype=torch.float64)


def nash_equilibrium(P):
    """π* with P π* = ½ (nothing beats it) and Σ π* = 1."""
    A = torch.cat([P - 0.5, torch.ones(1, len(P), dtype=P.dtype)])  # [n + 1, n]
    b = torch.zeros(len(P) + 1, 1, dtype=P.dtype)
    b[-1] = 1
    return torch.linalg.lstsq(A, b).solution[:, 0]


def exploitability(P, pi):  # max_y P(y ≻ π) − ½: the best response's gain, 0 at π*
    return ((P @ pi).max() - 0.5).item()


def sppo_game(P, eta: float, T: int):
    """π_1..π_T of π_{t+1}(y) ∝ π_t(y) exp(η P(y ≻ π_t)), from uniform: [T, n]."""
    pi = torch.full((len(P),), 1 / len(P), dtype=P.dtype)
    iterates = []
    for _ in range(T):
        iterates.append(pi)
        pi = torch.softmax(pi.log() + eta * (P @ pi), 0)  # in logs: exp(η ·) overflows at η 1000
    return torch.stack(iterates)


def bradley_terry_fit(P, steps: int = 500):
    """The scores r that best explain P as σ(r_i − r_j) (maximum likelihood)."""
    r = torch.zeros(len(P), dtype=P.dtype, requires_grad=True)
    opt = torch.optim.Adam([r], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        (-(P * F.logsigmoid(r[:, None] - r[None, :])).sum()).backward()
        opt.step()
    return r.detach()


def nash_demo(eta: float, T: int) -> list[dict]:
    P, star = GAME, nash_equilibrium(GAME)
    iterates = sppo_game(P, eta, T)
    average = iterates.cumsum(0) / torch.arange(1, T + 1, dtype=P.dtype)[:, None]
    print(f"a cycle of 3 responses; its Nash equilibrium π* = {star.numpy().round(3)}")
    print(f"exact SPPO, η = {eta}: the average converges to π*, the last iterate cycles")
    print("      t   |avg − π*|₁   exploitability(avg)   |last − π*|₁")
    rows = []
    for t in sorted({1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, T} & set(range(1, T + 1))):
        rows.append(dict(t=t, distance=(average[t - 1] - star).abs().sum().item(),
                         exploitability=exploitability(P, average[t - 1]),
                         last_distance=(iterates[t - 1] - star).abs().sum().item()))
        print("  {t:5}   {distance:10.4f}   {exploitability:19.4f}   {last_distance:12.4f}"
              .format(**rows[-1]))
    r = bradley_terry_fit(P)
    best = F.one_hot(r.argmax(), len(P)).to(P.dtype)
    beaten = P @ best
    print(f"Bradley-Terry's scores {r.numpy().round(3)} pick response {r.argmax().item()}, "
          f"which response {beaten.argmax().item()} beats with probability "
          f"{beaten.max().item():.2f} (exploitability {exploitability(P, best):.3f}; "
          f"SPPO's average after {T} iterations: {rows[-1]['exploitability']:.4f})")
    return rows


# --- The judges of step 2: the toy, the classroom's panel, your own prefer(), PairRM.


class ToyJudge:
    """The tiny mode's intransitive judge, blind to the prompt:
        M[a, b] = 8 (vowels(a) − vowels(b)) + rps(a, b)
    vowels: the share of a text's characters in 'aeiouAEIOU'; rps: +1 / −1 / 0 when the class
    (ord % 3: rock, paper, scissors) of a's first character beats / loses to / ties b's."""

    vowel_weight, cycle_weight = 8.0, 1.0

    def logit_matrices(self, prompts: list[str], candidates: list[list[str]]):
        v = torch.tensor([[sum(c in "aeiouAEIOU" for c in s) / max(len(s), 1) for s in cands]
                          for cands in candidates])  # [N, K]
        cls = torch.tensor([[ord(s[0]) % 3 if s else -1 for s in c] for c in candidates])
        d = (cls[:, :, None] - cls[:, None, :]) % 3  # [N, K, K]
        rps = (d == 1).float() - (d == 2).float()  # +1: i's class beats j's
        rps[(cls[:, :, None] < 0) | (cls[:, None, :] < 0)] = 0  # an empty text has no class
        return self.vowel_weight * (v[:, :, None] - v[:, None, :]) + self.cycle_weight * rps


class PreferenceJudge:
    """prefer(prompt, a, b) -> the logit that a beats b: the panel, or your --judge FILE.py."""

    def __init__(self, prefer, name: str):
        self.prefer, self.name = prefer, name

    def logit_matrices(self, prompts: list[str], candidates: list[list[str]]):
        K = len(candidates[0])
        M = torch.zeros(len(prompts), K, K)  # [N, K, K]
        for n, (prompt, cands) in enumerate(zip(prompts, candidates)):
            for i, j in itertools.permutations(range(K), 2):
                M[n, i, j] = self.logit(prompt, cands[i], cands[j])
        return M

    def logit(self, prompt: str, a: str, b: str) -> float:
        try:
            value = float(self.prefer(prompt, a, b))
        except Exception as e:
            fail(f"--judge {self.name}: prefer() raised {type(e).__name__}: {first_line(e)}")
        if not math.isfinite(value):
            fail(f"--judge {self.name}: prefer() returned {value}, not a finite number")
        return value


# The classroom's judge: four graders a student can check by reading, each voting for the higher
# score. They pull apart: the prompt's words want longer answers, a finished sentence within
# budget shorter ones, 20 words sits between, and repeats lose at any length.


def on_topic(prompt: str, answer: str) -> int:
    """How many of the prompt's words of 3 letters or more the answer uses."""
    asked = set(re.findall(r"[a-z]{3,}", prompt.lower()))
    return len(asked & set(re.findall(r"[a-z]{3,}", answer.lower())))


def finished(prompt: str, answer: str) -> int:  # 1 if the answer ends a sentence
    return int(answer.rstrip().endswith((".", "!", "?")))


def to_the_point(prompt: str, answer: str) -> int:  # minus the distance from 20 words
    return -abs(len(answer.split()) - 20)


def fresh(prompt: str, answer: str) -> int:  # minus the word pairs said again
    words = answer.lower().split()
    pairs = list(zip(words, words[1:]))
    return len(set(pairs)) - len(pairs)


GRADERS = (on_topic, finished, to_the_point, fresh)
PANEL_LOGIT = 1.0  # per vote: a unanimous panel prefers with probability σ(4) = 0.98


def panel_prefer(prompt: str, a: str, b: str) -> float:
    """Votes for a minus votes for b. A majority can prefer a to b, b to c and c to a
    (Condorcet's paradox): no score explains the panel, SPPO's case."""
    votes = 0
    for grade in GRADERS:
        margin = grade(prompt, a) - grade(prompt, b)
        votes += (margin > 0) - (margin < 0)
    return PANEL_LOGIT * votes


def judge_sources(judge, prompts: list[str], texts: list[str]) -> list[str]:
    """PairRM reads the templated prompt (the authors' source); prefer() the prompt alone: the
    panel would reward a template's system prompt words."""
    return texts if isinstance(judge, torch.nn.Module) else prompts


def load_judge(cfg: Config, env: Env):
    """toy, panel, prefer() from a local FILE.py you name, or PairRM (bf16 if the policy)."""
    if cfg.judge == "toy":
        return ToyJudge()
    if cfg.judge == "panel":
        return PreferenceJudge(panel_prefer, "panel")
    if cfg.judge.endswith(".py"):
        import importlib.util

        spec = importlib.util.spec_from_file_location("sppo_judge", cfg.judge)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            fail(f"--judge {cfg.judge}: running it raised {type(e).__name__}: {first_line(e)}")
        if not callable(getattr(module, "prefer", None)):
            fail(f"--judge {cfg.judge} defines no prefer(prompt, a, b)")
        judge = PreferenceJudge(module.prefer, cfg.judge)
        judge.logit("Say hi.", "Hi!", "Hello there.")  # a broken prefer() fails now
        return judge
    from pairrm_lite import PairRM

    try:
        judge = PairRM.from_pretrained(cfg.judge, device=env.device,
                                       dtype=torch.bfloat16 if env.bf16 else None)
    except Exception as e:  # no such folder or hub id, not PairRM, offline without it
        fail(f"cannot load --judge {cfg.judge}: {first_line(e)} (toy, panel, FILE.py or a "
             "PairRM folder or hub id)")
    judge.batch_size = cfg.judge_batch_size
    return judge


# --- Evaluation and saving: held-out win rates and KL, AlpacaEval's answers, the checkpoint.


def evaluate(model, base, judge, tokenizer, held: dict, cfg: Config, env: Env, t: int):
    """π_t's held-out answers; from t = 1 their win rates against π_1's and the last
    iterate's, and the KL to π_1 (base)."""
    responses = sample_responses(model, tokenizer, held["ids"], cfg, -1, env, f"eval {t}")
    answers = decode_all(tokenizer, responses)
    m = dict(iteration=t, win_rate_vs_base=None, win_rate_vs_prev=None, kl_vs_base=None)
    if t and held["ids"]:
        m["win_rate_vs_base"] = win_rate(judge, held["text"], answers, held["base"], env)
        m["win_rate_vs_prev"] = win_rate(judge, held["text"], answers, held["prev"], env)
    if t and base is not None:  # a gamed judge shows here: the policy drifts far from π_1
        m["kl_vs_base"] = kl_to_base(model, base, held["ids"], responses, cfg,
                                     tokenizer.pad_token_id, env)
    return answers, m


def decode_all(tokenizer, responses) -> list[list[str]]:
    return [[tokenizer.decode(r, skip_special_tokens=True) for r in row] for row in responses]


def win_rate(judge, prompts: list[str], a, b, env: Env) -> float:
    """Mean P(a ≻ b) over matched answers, by the judge's own σ(½(M_ab − M_ba))."""
    src = [p for p, row in zip(prompts, a) for _ in row]
    pairs = [[x, y] for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    M = judge_all(judge, src, pairs, env, "eval judge")  # [pairs, 2, 2]
    return pairwise_probs(M, "paper")[:, 0, 1].mean().item()


def kl_to_base(model, base, prompt_ids, responses, cfg: Config, pad_id: int, env: Env) -> float:
    """KL(π_t ‖ π_1) ≈ mean of log π_t(y|x) − log π_1(y|x), y ~ π_t (as TRL), nats/response."""
    items = [dict(prompt=p, response=r) for p, rs in zip(prompt_ids, responses) for r in rs]
    now = frozen_logps(model, items, cfg, pad_id, env, "eval KL π_t")
    then = frozen_logps(base, items, cfg, pad_id, env, "eval KL π_1")
    return sum(a - b for a, b in zip(now, then)) / len(items)


def with_prompts(prompts: list[str], answers: list[list[str]]) -> list[dict]:
    return [dict(prompt=p, answers=a) for p, a in zip(prompts, answers)]


def read_answers(path: str):  # a with_prompts file's answers, None if there is none
    rows = read_json(path)
    return rows and [row["answers"] for row in rows]


def alpaca_outputs(model, tokenizer, instructions, cfg: Config, env: Env, out: str, name: str):
    """model_outputs.json for AlpacaEval: an answer per --eval-set instruction (tag −2)."""
    limit = context_length(model.config) - cfg.max_new_tokens
    _, ids = render_all(tokenizer, instructions, limit)
    one = dataclasses.replace(cfg, k=1)
    answers = decode_all(tokenizer, sample_responses(model, tokenizer, ids, one, -2, env,
                                                     f"{name} --eval-set"))
    generator = f"sppo-{os.path.basename(os.path.abspath(out))}-{name}"
    rows = [dict(instruction=x, output=a[0], generator=generator, dataset=cfg.eval_set)
            for x, a in zip(instructions, answers)]
    return {"model_outputs.json": rows}


def model_card(cfg: Config, m: dict, t: int) -> str:
    """The iterate's README.md as the hub reads it: YAML metadata, then what it is."""
    from huggingface_hub import ModelCardData

    on_hub = "/" in cfg.model and not os.path.exists(cfg.model)
    data = ModelCardData(base_model=cfg.model if on_hub else None, library_name="transformers",
                         tags=["sppo", "self-play-preference-optimization"])
    recipe = ", ".join(f"{k} {getattr(cfg, k)}" for k in ("k", "eta", "loss", "pairs", "lr"))
    shown = ("win_rate_vs_base", "win_rate_vs_prev", "kl_vs_base")
    figures = "".join(f"| {k} | {m[k]:.3f} |\n" for k in shown if m[k] is not None)
    return (f"---\n{data.to_yaml()}\n---\n\n# SPPO iteration {t} of {cfg.model}\n\n"
            f"Self-Play Preference Optimization (arXiv 2405.00675) by sppo.py: {recipe}, judge "
            f"{cfg.judge}, prompts {cfg.prompts}.\n\n| held out | |\n|---|---|\n{figures}")


def save(model, tokenizer, path: str, files: dict, env: Env, dtype=torch.float32):
    """The iterate as the hub ships models (safetensors in its base's dtype, its tokenizer) and
    files, by a temporary folder renamed: a crash never leaves half of one."""
    state = None
    if model is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions as Options
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        # under FSDP2 every rank helps gather the full state dict; rank 0 writes it
        options = Options(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
        tied = getattr(model, "all_tied_weights_keys", {})  # GPT-2's lm_head is wte: once
        state = {k: v.to(dtype) for k, v in state.items() if k not in tied}
    if env.rank == 0:
        shutil.rmtree(path + ".tmp", ignore_errors=True)
        os.makedirs(path + ".tmp")
        if model is not None:
            model.save_pretrained(path + ".tmp", state_dict=state)
            tokenizer.save_pretrained(path + ".tmp")
            config = read_json(os.path.join(path + ".tmp", "config.json"))
            saved_as = str(dtype).removeprefix("torch.")  # not the fp32 it was trained in
            files = {**files, "config.json": dict(config, dtype=saved_as)}
        for name, content in files.items():
            with open(os.path.join(path + ".tmp", name), "w") as f:
                f.write(content if isinstance(content, str) else json.dumps(content, indent=1))
        for name in os.listdir(path + ".tmp"):  # safetensors writes 0600: readable by all
            os.chmod(os.path.join(path + ".tmp", name), 0o644)
        os.replace(path + ".tmp", path)
    if env.distributed:
        dist.barrier()  # no rank goes on before the checkpoint exists


def iteration_line(m: dict) -> str:  # the iteration's metrics, as logged
    shown = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items()
             if v is not None and k != "iteration"]
    return f"iter {m['iteration']}: " + ", ".join(shown)


def plot_curves(out: str):
    """DIR/curves.png: held-out win rates, winners' and losers' log-ratios (with matplotlib)."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no display backend
    except ImportError:
        return say0(f"pip install matplotlib for {out}/curves.png")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    iters = [m for m in lines if m.get("win_rate_vs_base") is not None]
    steps = [m for m in lines if "step" in m]
    fig = Figure(figsize=(10, 4))
    left, right = fig.subplots(1, 2)
    for key in ("win_rate_vs_base", "win_rate_vs_prev"):
        left.plot([m["iteration"] for m in iters], [m[key] for m in iters], "o-", label=key)
    for key in ("winner_logratio", "loser_logratio"):
        right.plot([m[key] for m in steps], label=key)
    left.set(xlabel="iteration", ylabel="held-out win rate")
    right.set(xlabel="optimiser step", ylabel="log π_θ(y|x) − log π_t(y|x)")
    left.legend()
    right.legend()
    fig.savefig(os.path.join(out, "curves.png"))


# --- Fast paths: FSDP2, one gather of the weights for no-grad work, a static KV cache replayed as
# a CUDA graph. Each is tested equal to the plain path it speeds up.


def shard(model, full, env: Env):
    """FSDP2 on each decoder layer (_no_split_modules), then the root; bf16 compute and fp32
    reductions if bf16. model is on the meta device: each rank allocates its shard, and rank 0
    broadcasts full's weights into them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy()
    if env.bf16:
        mp = MixedPrecisionPolicy(torch.bfloat16, torch.float32)
    kw = dict(mesh=init_device_mesh(env.device.type, (env.world,)), mp_policy=mp)  # not CUDA's
    for m in model.modules():
        if type(m).__name__ in set(model._no_split_modules or ()):
            fully_shard(m, **kw)
    fully_shard(model, **kw)
    buffers = dict(model.named_buffers())  # to_empty empties them too
    model.to_empty(device=env.device)
    for name, buffer in model.named_buffers():
        buffer.copy_(buffers[name])
    state = full.state_dict() if env.rank == 0 else {}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, state, options=options)
    generation = [full.generation_config if env.rank == 0 else None]  # its EOS tokens
    dist.broadcast_object_list(generation)
    model.generation_config = generation[0]


@contextmanager
def parameters_on_meta():
    """Parameters on the meta device, buffers as the model's __init__ computes them (rotary
    inv_freq): no checkpoint holds them. Accelerate's init_empty_weights."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and not param.is_meta:  # a tied one is on it already
            param = torch.nn.Parameter(param.to("meta"), param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


@contextmanager
def full_weights(model):
    """The full weights gathered once for no-grad work: one all-gather, not one per layer and
    token, and no collective inside: ranks may stop decoding at different lengths."""
    from torch.distributed.fsdp import FSDPModule

    fsdp = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in fsdp:  # unshard() is not recursive
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:  # FSDP2's defaults: the root keeps its weights from forward to backward
        for m in fsdp:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)


def map_chunks(fn, items: list, size: int, env: Env, desc: str) -> list:
    """fn(start, chunk) over chunks of items, chunk c on rank c % world; every rank gets all
    results in order. The chunks do not depend on the number of ranks."""
    starts = range(0, len(items), size)
    mine = {}
    for s in tqdm(starts[env.rank :: env.world], desc, leave=False, disable=env.rank != 0):
        mine[s] = fn(s, items[s : s + size])
    if env.world > 1:
        parts = [None] * env.world
        dist.all_gather_object(parts, mine)
        mine = {s: r for part in parts for s, r in part.items()}
    return [r for s in starts for r in mine[s]]


def frozen_logps(model, items, cfg: Config, pad_id: int, env: Env, desc: str) -> list[float]:
    def chunk(start, part):
        return items_logps(model, part, pad_id, env).tolist()

    with torch.no_grad(), full_weights(model), env.amp():
        return map_chunks(chunk, items, cfg.sample_batch_size, env, desc)


def last_hidden(model, input_ids, **kwargs):
    """The final norm's output, [B, T, H], from a forward of the whole model (FSDP2 needs the
    root's) with the LM head on no position."""
    seen = []

    def keep(module, args, out):
        seen.append(out[0])

    hook = model.base_model.register_forward_hook(keep)
    no_position = torch.zeros(0, dtype=torch.long, device=input_ids.device)
    try:
        model(input_ids, logits_to_keep=no_position, **kwargs)
    finally:
        hook.remove()
    return seen[0]


def lm_logits(logits, config):
    """The head's output in fp32, soft-capped or scaled as the model's own forward does."""
    logits = logits.float()
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = cap * torch.tanh(logits / cap)
    if getattr(config, "logits_scaling", 1) != 1:  # Granite
        logits = logits / config.logits_scaling
    if getattr(config, "logit_scale", 1) != 1:  # Cohere
        logits = logits * config.logit_scale
    return logits


class DynamicDecoder:  # transformers' growing KV cache; the mask grows a column per step
    def __init__(self, model, cache, k: int, mask, max_new_tokens: int, cuda_graph=False):
        cache.batch_repeat_interleave(k)  # each prompt's cache, for its k samples
        self.model, self.cache, self.mask = model, cache, mask

    def __call__(self, token, position_ids):
        self.mask = F.pad(self.mask, (0, 1), value=1)
        return next_logits(self.model, token, attention_mask=self.mask,
                           position_ids=position_ids, cache=self.cache)


def next_logits(model, input_ids, **kwargs):  # the next token's, [B, V] in fp32
    return model(input_ids, logits_to_keep=1, use_cache=True, **kwargs).logits[:, -1].float()


class StaticDecoder:
    """A KV cache and mask sized for the whole sequence: every step has the same shapes, so CUDA
    captures it once as a graph and replays it, without the launch costs that dominate decoding
    at small batch (no torch.compile, no Triton)."""

    def __init__(self, model, cache, k: int, mask, max_new_tokens: int, cuda_graph=False):
        from transformers import StaticCache

        (B, T), device = mask.shape, mask.device
        self.cache = StaticCache(config=model.config, max_cache_len=T + max_new_tokens)
        for i, layer in enumerate(cache.layers):  # the prefilled prompts, k times each
            keys = layer.keys.repeat_interleave(k, 0)
            values = layer.values.repeat_interleave(k, 0)
            self.cache.update(keys, values, i, {"cache_position": torch.arange(T, device=device)})
        self.model, self.pos = model, T  # pos: the next token's slot
        self.mask = F.pad(mask, (0, max_new_tokens), value=0)  # [B, T + max_new_tokens]
        self.token = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.position_ids = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.cache_position = torch.zeros(1, dtype=torch.long, device=device)
        self.cuda_graph = cuda_graph and device.type == "cuda"
        self.graph, self.warm = None, False

    def forward(self):
        return next_logits(self.model, self.token, attention_mask=self.mask,
                           position_ids=self.position_ids, cache_position=self.cache_position,
                           cache=self.cache)

    def __call__(self, token, position_ids):
        self.mask[:, self.pos] = 1
        self.cache_position.fill_(self.pos)
        self.token.copy_(token)
        self.position_ids.copy_(position_ids)
        self.pos += 1
        if not self.cuda_graph:
            return self.forward()
        if self.graph is None and self.warm:
            self.capture()
        if self.graph is not None:
            self.graph.replay()
            return self.logits.clone()
        self.warm = True  # the first step runs for real, on a side stream, as capture needs
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            logits = self.forward()
        torch.cuda.current_stream().wait_stream(stream)
        return logits

    def capture(self):  # the second step: replays run it (the cache counts its writes)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.logits = self.forward()
            self.graph = graph
        except RuntimeError as e:
            warn(f"no CUDA graph ({first_line(e)}): decoding without one")
            self.cuda_graph = False


# --- Plumbing: models, prompts, the memory plan, the run's folder, errors, the command line.


def eos_token_ids(model, tokenizer) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
    return eos if isinstance(eos, list) else [eos]


def disable_dropout(model):
    """The authors train without dropout: the loss compares π_θ and π_t at the same weights."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


def tiny_model(seed: int):
    """A random 2-layer Llama (0.14M parameters), a token per printable ASCII character."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = ["<pad>", "<s>", "</s>", "<unk>"] + [chr(i) for i in range(32, 127)] + ["\n"]
    bpe = Tokenizer(models.BPE({c: i for i, c in enumerate(vocab)}, [], unk_token="<unk>"))
    bpe.decoder = decoders.Fuse()
    template = ("{{ bos_token }}{% for m in messages %}Q: {{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %} A:{% endif %}")
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", unk_token="<unk>", chat_template=template)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config), tok


def model_config(cfg: Config):
    """π_1's config, read first: a wrong --model is the first error; --dry-run needs no more."""
    from transformers import AutoConfig

    if cfg.model == "tiny":
        return tiny_model(cfg.seed)[0].config
    folder, file = os.path.split(os.path.abspath(cfg.model))
    try:
        if cfg.model.endswith(".gguf"):
            return AutoConfig.from_pretrained(folder, gguf_file=file)
        return AutoConfig.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
    except Exception as e:  # OSError, ValueError, the hub's own errors
        fail(f"cannot load --model {cfg.model}: {first_line(e)} (presets: {', '.join(PRESETS)})")


def load_policy(path: str, cfg: Config, env: Env, config, dtype=torch.float32):
    """A model in dtype and its tokenizer, dropout off. Under torchrun rank 0 alone reads the
    checkpoint, and each rank keeps its shard of an empty model built from config (π_1's)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()  # our bars only
    kw = dict(trust_remote_code=cfg.trust_remote_code)
    full, error = None, None
    if path == "tiny":
        full, tokenizer = tiny_model(cfg.seed)
        full = full.to(dtype)
    else:
        if path.endswith(".gguf"):  # llama.cpp's file, dequantised (needs gguf, accelerate)
            path, kw["gguf_file"] = os.path.split(os.path.abspath(path))
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, **kw)
        except Exception as e:  # a folder without one, a broken one
            fail(f"cannot load the tokenizer of {path}: {first_line(e)}")
    if tokenizer.eos_token_id is None:
        fail(f"the tokenizer of {path} has no EOS token, so no response could end: set "
             "eos_token in its tokenizer_config.json")
    if cfg.max_new_tokens >= context_length(config):
        fail(f"--max-new-tokens {cfg.max_new_tokens} leaves no room for a prompt in the "
             f"model's {context_length(config)} positions")
    if full is None and env.rank == 0:  # under torchrun only the shards' source: as stored
        try:
            stored = "auto" if env.distributed else dtype
            full = AutoModelForCausalLM.from_pretrained(path, dtype=stored, **kw)
        except Exception as e:  # told to every rank
            error = UserError(f"cannot load the weights of --model {path}: {first_line(e)}")
    from_rank0(error, env)
    if "gguf_file" in kw and full is not None:  # a plain fp32 model from now on, saved as one
        del full.config.quantization_config
        full.hf_quantizer = None
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = full
    if env.distributed:  # an empty model on every rank; shard() fills it from rank 0's
        with parameters_on_meta():  # a copy: from_config keeps it and sets its dtype
            model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype,
                                                     trust_remote_code=cfg.trust_remote_code)
    disable_dropout(model)
    if cfg.grad_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    if env.distributed:
        shard(model, full, env)
    else:
        model.to(env.device)
    return model.eval(), tokenizer


def context_length(config) -> int:
    return getattr(config, "max_position_embeddings", None) or 10**9


def render_all(tokenizer, prompts: list[str], limit: int):
    """Texts and ids; a prompt longer than limit keeps its last limit tokens."""
    rendered = [render_prompt(tokenizer, p) for p in prompts]
    return [text for text, _ in rendered], [ids[-limit:] for _, ids in rendered]


def builtin_prompts() -> list[str]:
    """128 short prompts in a fixed shuffle, for the tiny mode and the classroom."""
    topics = ["the sea", "a cat", "rain", "the moon", "bread", "a river", "old trees", "winter",
              "a city", "music", "the wind", "a garden", "fire", "snow", "a bridge", "stars"]
    asks = ["Tell me about {}.", "Describe {}.", "Write a line on {}.", "What is {}?",
            "Say something about {}.", "Give a word for {}.", "Sing of {}.", "Name {}."]
    prompts = [a.format(t) for t in topics for a in asks]
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(0))
    return [prompts[i] for i in order.tolist()]


# prompt files by datasets' builders; besides, a .txt holds a prompt a line
FILES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_prompts(cfg: Config, t: int, flag: str = "--prompts") -> list[str]:
    """Iteration t's prompts, or --eval-set's: the built-in list, a local file or a dataset."""
    import datasets

    datasets.disable_progress_bars()  # our bars only
    source, column, split = cfg.prompts.replace("{t}", str(t)), cfg.prompt_field, cfg.prompt_split
    if flag == "--eval-set":  # AlpacaEval's own column and split
        source, column, split = cfg.eval_set, "instruction", "eval"
    ext = os.path.splitext(source)[1]
    try:
        if source == "builtin":
            rows = {column: builtin_prompts()}
        elif ext == ".txt":
            with open(source, encoding="utf-8") as f:
                rows = {column: f.read().splitlines()}
        elif ext in FILES:
            rows = datasets.load_dataset(FILES[ext], data_files=source, split="train")
        elif flag == "--eval-set":  # AlpacaEval's repo loads by a script, which datasets 4
            from huggingface_hub import hf_hub_download  # refuses: read its file instead

            file = hf_hub_download(source, source.split("/")[-1] + ".json", repo_type="dataset")
            rows = datasets.load_dataset("json", data_files=file, split="train")
        else:
            rows = datasets.load_dataset(source, split=split)
    except Exception as e:  # no such file or dataset, malformed, offline: in its own words
        way_out = ""
        if "script" in str(e) or "Offline" in str(e):
            way_out = f"; pass its data files ({flag} FILE; {{t}} in it is the iteration)"
        fail(f"cannot read {flag} {source}: {first_line(e)}{way_out}")
    columns = list(rows.keys() if isinstance(rows, dict) else rows.column_names)
    if column not in columns:
        fix = "pass --prompt-field" if flag == "--prompts" else "AlpacaEval's format has one"
        fail(f"{flag} {source} has no column '{column}' (it has {columns}): {fix}")
    prompts = list(rows[column])[: cfg.num_prompts if flag == "--prompts" else None]
    if not all(isinstance(p, (str, type(None))) for p in prompts):
        fail(f"{flag} {source}: the column '{column}' is not text")
    kept = [p for p in prompts if p and p.strip()]
    if len(kept) < len(prompts):
        warn(f"skipped {len(prompts) - len(kept)} empty prompt(s) in {source}")
    if not kept:
        fail(f"{flag} {source} holds no prompts")
    return kept


def load_prompt_sets(cfg: Config, env: Env):
    """The held-out prompts (the end of set 1, at most a quarter, never trained on) and each
    iteration's."""
    first = load_prompts(cfg, 1)
    if env.world > len(first):
        fail(f"{env.world} processes but {len(first)} prompts: use fewer processes")
    n_eval = min(cfg.eval_prompts, len(first) // 4)
    if n_eval < cfg.eval_prompts:
        warn(f"holding out {n_eval} of {len(first)} prompts, at most a quarter")
    held_out = first[len(first) - n_eval :]
    held, sets = set(held_out), {}
    for t in range(1, cfg.iterations + 1):
        rows = first[: len(first) - n_eval]
        if t > 1 and "{t}" in cfg.prompts:
            rows = load_prompts(cfg, t)
        sets[t] = [p for p in rows if p not in held]  # a held-out copy would leak it
        if len(sets[t]) < len(rows):
            warn(f"dropped {len(rows) - len(sets[t])} prompt(s) of iteration {t}: held out")
        if not sets[t]:
            fail(f"iteration {t} has no prompts left to train on: lower --eval-prompts")
    return held_out, sets


def memory_plan(cfg: Config, a: dict, gpus: int) -> dict:
    """GiB per GPU in each phase, from first principles (bf16: 2 bytes, fp32: 4)."""
    G, P = 2**30, a["params"]
    base = (2 if gpus > 1 else 4) * (cfg.kl and cfg.eval_prompts > 0)  # π_1: bf16 if sharded
    shards = (4 + base) * P / gpus  # + the fp32 policy
    rows = cfg.sample_batch_size * cfg.k
    kv = 2 * a["layers"] * a["kv_dim"] * 2 * rows * (cfg.max_prompt_length + cfg.max_new_tokens)
    per_prompt = 2 if cfg.pairs == "winner-loser" else cfg.k
    tokens = max(1, cfg.batch_size // (cfg.grad_accum * gpus)) * per_prompt * cfg.max_length
    # bf16 activations kept per token: each layer's input with checkpointing, ~34·h per layer
    # without (Korthikanti et al.); one layer's recompute; a chunk of logits
    saved = a["layers"] if cfg.grad_checkpointing else 34 * a["layers"]
    act = tokens * a["hidden"] * 2 * (saved + 34) + 10 * 2**24
    opt = (4 if cfg.optimizer == "rmsprop" else 8) * P / gpus
    gathered = 2 * 2 * P / a["layers"]  # two layers' bf16 weights
    pairrm = cfg.judge not in ("toy", "panel") and not cfg.judge.endswith(".py")
    return dict(sampling=(shards + 2 * P + kv) / G,  # + the gathered bf16 copy + KV cache
                judging=(shards + pairrm * (2 * 436e6 + 8 * G)) / G,  # PairRM, its activations
                training=(shards + 4 * P / gpus + opt + gathered + act) / G)


def dry_run(cfg: Config):
    """The recipe (the authors' value beside a change) and the memory plan."""
    from transformers import AutoModelForCausalLM

    c = model_config(cfg)  # first: a config that cannot be had is the one line printed
    for f in dataclasses.fields(Config):
        value, changed = getattr(cfg, f.name), getattr(cfg, f.name) != f.default
        changed = changed and "(authors:" in f.metadata["help"]  # a value of their recipe
        print(f"--{f.name.replace('_', '-'):20} {value}" + changed * f" (authors: {f.default})")
    with torch.device("meta"):
        params = AutoModelForCausalLM.from_config(c).num_parameters()
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    a = dict(params=params, layers=c.num_hidden_layers, hidden=c.hidden_size,
             kv_dim=heads * head_dim)
    print(f"\n{params:,} parameters; GiB per GPU (FSDP2 shards fp32 weights, gradients "
          f"and {cfg.optimizer}'s state; bf16 compute):")
    print("GPUs  prompts/GPU/micro-step  sampling  judging  training  fits 80 GB")
    for gpus in (8, 4, 2, 1):
        m = memory_plan(cfg, a, gpus)
        per_gpu = max(1, cfg.batch_size // (cfg.grad_accum * gpus))
        print(f"{gpus:4}  {per_gpu:22}  {m['sampling']:8.1f}  {m['judging']:7.1f}  "
              f"{m['training']:8.1f}  {'yes' if max(m.values()) < 80 else 'no'}")
    stored = (c.dtype or torch.float32).itemsize * params / 2**30
    print(f"fewer GPUs: raise --grad-accum, lower --sample-batch-size. Rank 0 alone reads the "
          f"checkpoint ({stored:.1f} GiB of host memory while it loads) and sends each its shard.")


def prepare_out(cfg: Config, env: Env):
    """The run's folder and its first unsaved iteration, from rank 0."""
    result = None
    if env.rank == 0:
        try:
            result = claim(cfg)
        except UserError as e:
            result = e
    return from_rank0(result, env)


def from_rank0(value, env: Env):  # on every rank; a UserError raised on all: none waits
    box = [value]
    if env.distributed:
        dist.broadcast_object_list(box)
    if isinstance(box[0], UserError):
        raise box[0]
    return box[0]


def claim(cfg: Config):
    """A run's folder is locked (flock) for its life: a second run on it is refused."""
    global lock  # open until the process ends, however it ends: no stale lock
    out = cfg.resume or cfg.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        fail(f"cannot make the run's folder {out}: {first_line(e)}; pick another --out")
    if not cfg.resume and os.listdir(out) and not os.path.exists(f"{out}/sppo.lock"):  # no run
        fail(f"--out {out} is not empty and holds no sppo run: pick a new folder")
    lock = open(os.path.join(out, "sppo.lock"), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        fail(f"{out} is in use by a running sppo (pid {lock.read().strip()}): wait for it, or "
             "pick another --out")
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    if not cfg.resume and set(os.listdir(out)) != {"sppo.lock"}:
        fail(f"--out {out} is not empty: --resume {out} continues a run there")
    start = 1
    while os.path.isdir(os.path.join(out, f"iter{start}")):
        start += 1
    if start > cfg.iterations:
        more = f"--iterations {start}"
        if "{t}" in cfg.prompts:
            more += f", which reads a prompt set {cfg.prompts.replace('{t}', str(start))}"
        fail(f"{out} is finished at iteration {start - 1}; to extend it: {more}")
    saved = dataclasses.replace(cfg, out=out, resume=None)  # --iterations too
    write_json(os.path.join(out, "config.json"), dataclasses.asdict(saved))
    os.makedirs(os.path.join(out, "work"), exist_ok=True)
    path = os.path.join(out, "metrics.jsonl")
    if cfg.resume and os.path.exists(path):  # an unfinished iteration's lines go
        with open(path) as f:
            kept = [x for x in f if x.endswith("}\n") and json.loads(x)["iteration"] < start]
        with open(path, "w") as f:
            f.writelines(kept)
    return out, start


def unclaim(out: str, cfg: Config):  # what claim() wrote; work/ is still empty
    lock.close()
    for name in ("config.json", "sppo.lock"):
        os.remove(os.path.join(out, name))
    os.rmdir(os.path.join(out, "work"))
    if not cfg.out:  # runs/<date-time>, made for this run
        os.rmdir(out)


def log_line(path: str, env: Env, **metrics):  # a JSON line, by rank 0
    if env.rank == 0:
        with open(path, "a") as f:
            f.write(json.dumps(metrics) + "\n")


def write_json(path: str, obj, env: Env = Env()):
    """Whole or not at all (a temporary file renamed), by rank 0."""
    if env.rank == 0:
        with open(path + ".tmp", "w") as f:
            json.dump(obj, f)
        os.replace(path + ".tmp", path)


def read_json(path: str):  # None if there is no such file
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)


class UserError(Exception):
    """Bad input: one line, exit code 2 (a traceback with --debug)."""


def fail(message: str):
    raise UserError(message)


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def say0(message: str):  # a line on stderr, from rank 0 only
    if int(os.environ.get("RANK", 0)) == 0:
        tqdm.write(f"sppo: {message}", sys.stderr)  # below a progress bar, not on its line


def warn(message: str):
    say0(f"warning: {message}")


def on_sigterm(signum, frame):  # a scheduler's SIGTERM (SLURM, Kubernetes) is a Ctrl-C
    signal.setitimer(signal.ITIMER_REAL, 0.1)  # again until run() catches it: a __del__ would not
    raise KeyboardInterrupt(signal.SIGTERM)


def out_of_memory(e: Exception, out) -> str:
    """One line: the stage (from the traceback) and the flag to change."""
    if "out of memory" not in str(e) and "allocate memory" not in str(e):
        raise e
    flags = {"sample": "lower --sample-batch-size", "judge_all": "lower --judge-batch-size",
             "train_iteration": "raise --grad-accum", "load_policy": "use more GPUs"}
    names = [frame.name for frame in traceback.extract_tb(e.__traceback__)]
    stage = next((n for n in reversed(names) if n in flags), "load_policy")
    return f"out of memory in {stage}(): {flags[stage]}; the finished stages are kept in {out}"


PRESETS = {  # overrides of the authors' recipe
    # η must be large for a 0.14M model: P̂ − ½ spreads ~0.2, so η 5 sets targets of a nat
    "tiny": dict(prompts="builtin", judge="toy", k=8, max_new_tokens=24, temperature=1.0,
                 top_p=1.0, eta=100.0, lr=3e-3, optimizer="adamw", epochs=3, batch_size=8,
                 pairs="all", grad_checkpointing=False, sample_batch_size=32, max_length=96,
                 max_prompt_length=64),
    # a class on laptops: a real 135M chat model judged by the panel, in minutes on 2 cores
    "smollm2-135m": dict(model="HuggingFaceTB/SmolLM2-135M-Instruct", prompts="builtin",
                         judge="panel", num_prompts=48, eval_prompts=12, k=3, max_new_tokens=48,
                         lr=1e-5, batch_size=4, grad_checkpointing=False),
    # a class on one consumer GPU; lr a starting point (10x the authors' for ~1/5 the steps)
    "gpt2": dict(model="openai-community/gpt2", num_prompts=2000, eval_prompts=64, k=4,
                 max_new_tokens=128, max_length=512, max_prompt_length=256, lr=5e-6,
                 batch_size=32, grad_accum=4, grad_checkpointing=False, sample_batch_size=32),
    # the paper's two main runs: the authors' recipe, for 8 × 80 GB
    "mistral-7b": dict(model="mistralai/Mistral-7B-Instruct-v0.2"),
    "llama-3-8b": dict(model="meta-llama/Meta-Llama-3-8B-Instruct"),
}
NAMES = ("tiny", "builtin", "toy", "panel")  # not paths, even where a folder has the name
# what --resume takes besides the run's config.json: flags that change no result but round-off
RESUME_FLAGS = {"resume", "out", "iterations", "sample_batch_size", "judge_batch_size",
                "grad_accum", "debug", "cuda_graph"}


def parse_config(argv=None) -> Config:
    """The authors' default < a preset < a flag given. Without CUDA, bf16 only if given."""
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def error(self, message):  # one line, as every input error
            fail(f"{message} (python sppo.py --help lists the flags)")

    about = ("SPPO (arXiv 2405.00675). A plain run is the tiny preset; --model takes another "
             "preset or a causal LM, the authors' recipe.")
    parser = Parser(Config, description=about, formatter_class=argparse.HelpFormatter)
    parser.set_defaults(**dict.fromkeys(f.name for f in dataclasses.fields(Config)))
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    if "resume" in given:
        try:
            saved = read_json(os.path.join(given["resume"], "config.json")) or {}
            cfg = Config(**{**saved, **given})
        except (TypeError, ValueError) as e:  # damaged, or another version's
            fail(f"--resume {given['resume']}: its config.json is not this sppo's: {first_line(e)}")
        if "eta" not in saved:
            fail(f"--resume {given['resume']}: no sppo run there (no config.json of one)")
        extra = sorted(set(given) - RESUME_FLAGS)
        if extra:
            fail(f"--resume takes the run's config.json: drop --{extra[0].replace('_', '-')}, "
                 "or start a new run")
        folder = os.path.abspath(given["resume"])
        if os.path.abspath(given.get("out", folder)) != folder:
            fail(f"--resume {given['resume']} goes on in that folder: drop --out")
    elif "demo" in given:
        cfg = Config(**{"eta": 0.2, "iterations": 1000, **given})
    else:
        name = given.pop("model", "tiny")
        preset = {"model": name, **PRESETS.get(name, {})}
        bf16 = torch.cuda.is_available()  # a CPU's bf16 changes a class's figures: if asked
        cfg = Config(**{"bf16": bf16, **preset, **given})
        for key in ("model", "prompts", "judge", "eval_set"):  # absolute: --resume from anywhere
            path = getattr(cfg, key) or ""
            if path not in NAMES and os.path.exists(path.replace("{t}", "1")):
                setattr(cfg, key, os.path.abspath(path))
    check(cfg)
    return cfg


def check(cfg: Config):
    """Values that cannot work end the run before anything is read or loaded."""
    for name in ("iterations", "max_new_tokens", "epochs", "batch_size", "sample_batch_size",
                 "judge_batch_size", "grad_accum", "max_prompt_length", "num_prompts"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            fail(f"--{name.replace('_', '-')} {getattr(cfg, name)}: it must be at least 1")
    problems = {
        "--k: SPPO compares responses, K must be at least 2": cfg.k < 2,
        "--temperature: above 0, or the K responses would be one": not 0 < cfg.temperature,
        "--top-p: in (0, 1]": not 0 < cfg.top_p <= 1,
        "--eta and --lr: positive, finite": not (0 < cfg.eta < math.inf and 0 < cfg.lr < math.inf),
        "--warmup-ratio: in [0, 1)": not 0 <= cfg.warmup_ratio < 1,
        "--eval-prompts: 0 or more": cfg.eval_prompts < 0,
        "--max-length: above --max-prompt-length": cfg.max_length <= cfg.max_prompt_length,
        "--grad-accum: it must divide --batch-size": cfg.batch_size % cfg.grad_accum,
        f"--loss {cfg.loss} needs --pairs winner-loser": cfg.loss != "sppo" and cfg.pairs == "all",
        f"--out {cfg.out}: a file, not a folder": os.path.isfile(cfg.out or ""),
    }
    for message, bad in problems.items():
        if bad:
            fail(message)
    for flag, path in (("prompts", cfg.prompts), ("eval-set", cfg.eval_set or "")):
        local = path.endswith((*FILES, ".txt"))
        if local and not os.path.exists(path.replace("{t}", "1")):
            fail(f"--{flag} {path}: no such file")
        if not local and os.path.isfile(path.replace("{t}", "1")):
            fail(f"--{flag} {path}: name a {', '.join(FILES)} or .txt file")
    for flag, path, kind in (("model", cfg.model, ".gguf"), ("judge", cfg.judge, ".py")):
        if (path.startswith((".", "/", "~")) or path.endswith(kind)) and not os.path.exists(path):
            fail(f"--{flag} {path}: no such file or folder")
        if os.path.isfile(path) and not path.endswith(kind):
            fail(f"--{flag} {path} is a file: pass a folder, or a {kind} file")


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

