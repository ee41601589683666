"""
PairRM (llm-blender/PairRM, 0.4B), the preference model of the SPPO paper, from scratch.

A DeBERTa-v3-large encoder reads one prompt and two candidates at once,
    [CLS] <|source|> prompt [SEP] [CLS] <|candidate1|> a [SEP] [CLS] <|candidate2|> b [SEP]
and a small head scores the pair: with h the last hidden states at the three prefix tokens,
    M[a, b] = head([h_src; h_a]) − head([h_src; h_b]),   head = Linear(2H→H) → Tanh → Linear(H→1).
M[a, b] > 0 means a is preferred. The model is not antisymmetric: running both orders and taking
½(M[a, b] − M[b, a]) gives a logit whose sigmoid is a probability with P(a≻b) + P(b≻a) = 1.

Loads both published layouts (detected from config.json) strictly, from safetensors (or a
pytorch_model.bin with torch.load(weights_only=True)); needs neither llm-blender nor its tokenizer
class: the checkpoint's own tokenizer.json is read with the `tokenizers` library.

    python pairrm_lite.py llm-blender/PairRM --prompt "2+2?" --a "4" --b "5"
"""

import argparse
import json
import os
import sys
from contextlib import nullcontext

import torch
from torch import nn

# The encoder config of microsoft/deberta-v3-large: the "original" layout does not ship one.
DEBERTA_V3_LARGE = dict(
    model_type="deberta-v2",
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    intermediate_size=4096,
    hidden_act="gelu",
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    max_position_embeddings=512,
    type_vocab_size=0,
    initializer_range=0.02,
    layer_norm_eps=1e-7,
    relative_attention=True,
    max_relative_positions=-1,
    position_buckets=256,
    norm_rel_ebd="layer_norm",
    share_att_key=True,
    pos_att_type="p2c|c2p",
    position_biased_input=False,
    pad_token_id=0,
    vocab_size=128100,
)
PREFIXES = {
    "source_prefix_id": "<|source|>",
    "cand1_prefix_id": "<|candidate1|>",
    "cand2_prefix_id": "<|candidate2|>",
    "cand_prefix_id": "<|candidate|>",
}
FILES = [
    "config.json",
    "model.safetensors",
    "pytorch_model.bin",
    "tokenizer.json",
]  # never training_args.bin


class PairRM(nn.Module):
    def __init__(
        self,
        encoder_config,
        tokenizer,
        drop_out: float = 0.05,
        source_max_length: int = 1224,
        candidate_max_length: int = 412,
    ):
        super().__init__()
        from transformers import DebertaV2Model

        self.pretrained_model = DebertaV2Model(encoder_config)
        H = encoder_config.hidden_size
        self.head_layer = nn.Sequential(  # its keys: head_layer.1 and .4
            nn.Dropout(drop_out),
            nn.Linear(2 * H, H),
            nn.Tanh(),
            nn.Dropout(drop_out),
            nn.Linear(H, 1),
        )
        self.tokenizer = tokenizer  # a tokenizers.Tokenizer; we truncate and pad ourselves
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.source_max_length, self.candidate_max_length = source_max_length, candidate_max_length
        # Padded tokens per batch. DeBERTa's attention tensors are [B, heads, T, T]: on a CPU,
        # 1024 is never slower than one pair at a time, 2048 is slower at ~500-token pairs
        # (README, Performance).
        self.max_batch_tokens = 1024
        self.batch_size = 32  # pairs per forward, at most
        ids = {name: tokenizer.token_to_id(tok) for name, tok in PREFIXES.items()}
        ids.update(
            cls=tokenizer.token_to_id("[CLS]"),
            sep=tokenizer.token_to_id("[SEP]"),
            pad=tokenizer.token_to_id("[PAD]"),
        )
        missing = [k for k, v in ids.items() if v is None]
        if missing:
            raise ValueError(
                f"the tokenizer lacks the PairRM tokens {missing}: is tokenizer.json PairRM's?"
            )
        self.ids = ids
        self.eval()

    # ------------------------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls, path_or_hub_id: str, *, backbone_config=None, device=None, dtype=None
    ) -> "PairRM":
        """Either layout: 'hf' (a DeBERTa-v2 config with the PairRM fields) or 'original' (a ranker
        config; the encoder is deberta-v3-large with the vocabulary size of the weights, or the
        DeBERTa config.json at `backbone_config`). Strict: every tensor must be there, and no
        other."""
        from tokenizers import Tokenizer
        from transformers import DebertaV2Config

        folder = _local_folder(path_or_hub_id)
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise FileNotFoundError(f"no config.json in {folder}: not a PairRM checkpoint")
        config = json.load(open(os.path.join(folder, "config.json")))
        if "ranker_type" not in config and config.get("model_type") not in (
            "deberta-v2",
            "deberta",
        ):
            raise ValueError(
                f"{folder}/config.json is neither PairRM layout: expected 'ranker_type' "
                f"(llm-blender/PairRM) or model_type 'deberta-v2' (llm-blender/PairRM-hf)"
            )
        state = _load_weights(folder)
        if "ranker_type" in config:  # original layout (llm-blender/PairRM)
            enc = json.load(open(backbone_config)) if backbone_config else dict(DEBERTA_V3_LARGE)
            enc["vocab_size"] = state["pretrained_model.embeddings.word_embeddings.weight"].shape[
                0
            ]
            sizes = dict(
                source_max_length=config.get("source_maxlength", 1224),
                candidate_max_length=config.get("candidate_maxlength", 412),
            )
        else:  # hf layout (llm-blender/PairRM-hf)
            enc, sizes = config, {}
        enc = {k: v for k, v in enc.items() if k not in ("model_type", "architectures")}
        try:  # skip the random init that loading overwrites (9 s for the real model on a CPU)
            from transformers.initialization import no_init_weights
        except ImportError:
            no_init_weights = nullcontext
        with no_init_weights():
            model = cls(
                DebertaV2Config(**enc),
                Tokenizer.from_file(os.path.join(folder, "tokenizer.json")),
                drop_out=config.get("drop_out", 0.05),
                **sizes,
            )
        # the config's ids, where it has them, must be the tokenizer's
        for key, tok in PREFIXES.items():
            if key in config and config[key] != model.ids[key]:
                raise ValueError(
                    f"config.json says {key}={config[key]} but the tokenizer maps {tok} to "
                    f"{model.ids[key]}: tokenizer.json does not belong to this checkpoint"
                )
        expected, got = set(model.state_dict()), set(state)
        if expected != got:
            raise ValueError(
                f"checkpoint {folder} does not match PairRM: missing {sorted(expected - got)[:5]}, "
                f"unexpected {sorted(got - expected)[:5]}"
            )
        model.load_state_dict(state, strict=True)
        if device is not None and torch.device(device).type == "cuda":
            model.max_batch_tokens = 16384  # bounds the [B, 16, T, T] tensors to ~1 GiB each
        return model.to(device=device, dtype=dtype)

    # ------------------------------------------------------------------------------------ inputs

    def encode_pair(self, prompt: str, cand1: str, cand2: str) -> list[int]:
        """Ids of one comparison. The source part keeps at most source_max_length tokens; each
        candidate part gets candidate_max_length + (source_max_length − len(source part)) // 2, so
        the total is at most source_max_length + 2 · candidate_max_length (2048). Every part keeps
        its own [CLS] … [SEP]; the budget depends on this example only."""

        def part(prefix: str, text: str, limit: int) -> list[int]:
            ids = self.tokenizer.encode(prefix + text).ids  # [CLS] prefix text [SEP]
            return ids if len(ids) <= limit else ids[: limit - 1] + [self.ids["sep"]]

        source = part(PREFIXES["source_prefix_id"], prompt, self.source_max_length)
        budget = self.candidate_max_length + (self.source_max_length - len(source)) // 2
        return (
            source
            + part(PREFIXES["cand1_prefix_id"], cand1, budget)
            + part(PREFIXES["cand2_prefix_id"], cand2, budget)
        )

    # ------------------------------------------------------------------------------------ forward

    def forward(self, input_ids, attention_mask):
        """M[a, b] for a batch of encoded pairs: [B, T] -> [B]."""
        h = self.pretrained_model(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state
        src = self.at_prefix(h, input_ids, "source_prefix_id")                      # [B, H]
        cand1 = self.at_prefix(h, input_ids, "cand1_prefix_id")
        cand2 = self.at_prefix(h, input_ids, "cand2_prefix_id")
        left = self.head_layer(torch.cat([src, cand1], -1))                         # [B, 1]
        right = self.head_layer(torch.cat([src, cand2], -1))
        return (left - right).squeeze(-1).float()

    def at_prefix(self, h, input_ids, key: str):
        """The hidden state at the first occurrence of a prefix token in each row: [B, H]."""
        rows = torch.arange(len(input_ids), device=input_ids.device)
        return h[rows, (input_ids == self.ids[key]).int().argmax(-1)]

    @torch.inference_mode()
    def _logits(self, encoded: list[list[int]], batch_size: int):
        """Forward all encoded pairs in length-sorted batches (at most batch_size pairs and
        max_batch_tokens padded tokens) padded to the batch's longest pair, not to 2048; results
        come back in the caller's order."""
        out, batch_size = torch.empty(len(encoded)), batch_size or self.batch_size
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        batches = [[]]
        for i in order:  # the first pair of a batch is its longest
            b = batches[-1]
            longest = len(encoded[b[0]]) if b else 0
            if len(b) == batch_size or (len(b) + 1) * longest > self.max_batch_tokens:
                batches.append([])
            batches[-1].append(i)
        device = next(self.parameters()).device
        for idx in batches:
            n = len(encoded[idx[0]])
            ids = torch.full((len(idx), n), self.ids["pad"], dtype=torch.long)
            mask = torch.zeros((len(idx), n), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, : len(encoded[i])], mask[r, : len(encoded[i])] = torch.tensor(encoded[i]), 1
            out[idx] = self(ids.to(device), mask.to(device)).cpu()
        return out

    def compare(
        self, prompts, cands1, cands2, *, both_orders: bool = True, batch_size: int | None = None
    ):
        """Logit that cands1[n] beats cands2[n]: M[a, b], or with both orders
        ½(M[a, b] − M[b, a])."""
        pairs = [self.encode_pair(p, a, b) for p, a, b in zip(prompts, cands1, cands2)]
        if not both_orders:
            return self._logits(pairs, batch_size)
        swapped = [self.encode_pair(p, b, a) for p, a, b in zip(prompts, cands1, cands2)]
        m = self._logits(pairs + swapped, batch_size)
        return (m[: len(pairs)] - m[len(pairs) :]) / 2

    def logit_matrices(self, prompts, candidates, batch_size: int | None = None):
        """M[n, i, j] for every ordered pair i ≠ j of each prompt's K candidates; diagonal 0.
        This is what sppo.pairwise_probs turns into probabilities."""
        K = len(candidates[0])
        index = [
            (n, i, j) for n in range(len(prompts)) for i in range(K) for j in range(K) if i != j
        ]
        m = self._logits(
            [
                self.encode_pair(prompts[n], candidates[n][i], candidates[n][j])
                for n, i, j in index
            ],
            batch_size,
        )
        M = torch.zeros(len(prompts), K, K)
        M[tuple(torch.tensor(index).T)] = m
        return M


def _local_folder(path_or_hub_id: str) -> str:
    """A folder as it is; a hub id downloaded (or, when the hub is unreachable, from its cache)."""
    if os.path.isdir(path_or_hub_id):
        return path_or_hub_id
    if os.path.exists(path_or_hub_id):
        raise NotADirectoryError("a file, not a folder: pass the folder that holds config.json")
    if path_or_hub_id.startswith((".", "/", "~")):
        raise FileNotFoundError("no such folder (a hub id is owner/name)")
    from huggingface_hub import snapshot_download

    offline = not hub_reachable(path_or_hub_id)
    try:
        return snapshot_download(path_or_hub_id, allow_patterns=FILES, local_files_only=offline)
    except Exception as e:
        if offline:
            message = (
                f"the hub cannot be reached and {path_or_hub_id} is not in its local cache: "
                "pass a local PairRM folder"
            )
            raise OSError(message) from e
        raise


def hub_reachable(repo_id: str) -> bool:
    """One quick request, no retries: offline, the hub client retries every file for about 50 s."""
    from huggingface_hub import model_info
    from huggingface_hub.errors import HfHubHTTPError

    try:
        model_info(repo_id, timeout=10)
    except HfHubHTTPError:  # the hub answered (not found, gated, …)
        return True
    except Exception:  # no answer: offline, DNS, firewall
        return False
    return True


def _load_weights(folder: str) -> dict:
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        from safetensors.torch import load_file

        return load_file(os.path.join(folder, "model.safetensors"))
    if os.path.isfile(os.path.join(folder, "pytorch_model.bin")):
        try:  # tensors only: a pickle that wants to run code is refused
            path = os.path.join(folder, "pytorch_model.bin")
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(
                f"refusing {folder}/pytorch_model.bin: it is not a plain tensor file ({e})"
            ) from None
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {folder}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(
        description="Probability that response A beats response B, by PairRM."
    )
    p.add_argument(
        "model", help="PairRM folder or hub id (llm-blender/PairRM or llm-blender/PairRM-hf)"
    )
    p.add_argument(
        "--prompt", required=True, help="the instruction both responses answer (PairRM's source)"
    )
    p.add_argument("--a", required=True, help="response A")
    p.add_argument("--b", required=True, help="response B")
    args = p.parse_args()
    try:
        rm = PairRM.from_pretrained(args.model)
    except (OSError, ValueError) as e:  # a missing folder, no hub, not a PairRM checkpoint
        reason = str(e).splitlines()[0]
        print(f"pairrm_lite: error: cannot load {args.model}: {reason}", file=sys.stderr)
        sys.exit(2)
    logit = rm.compare([args.prompt], [args.a], [args.b])[0]
    p = torch.sigmoid(logit).item()
    print(f"P(A beats B) = {p:.4f}  (logit {logit.item():+.4f}, both orders)")
