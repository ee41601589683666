"""
PairRM (llm-blender/PairRM, 0.4B), the preference model of the SPPO paper, from scratch.

A DeBERTa-v3-large encoder reads a prompt and two candidates at once,
    [CLS] <|source|> prompt [SEP] [CLS] <|candidate1|> a [SEP] [CLS] <|candidate2|> b [SEP]
and a small head scores the pair from the last hidden states h at the three prefix tokens:
    M[a, b] = head([h_src; h_a]) − head([h_src; h_b]),   head = Linear(2H→H) → Tanh → Linear(H→1)
M[a, b] > 0: a is preferred. M is not antisymmetric: ½(M[a, b] − M[b, a]), both orders, is a
logit whose sigmoid gives P(a ≻ b) + P(b ≻ a) = 1.

Loads both published layouts (told apart by config.json) strictly, from safetensors (or a
pytorch_model.bin by torch.load(weights_only=True)), with the checkpoint's own tokenizer.json;
needs neither llm-blender nor its tokenizer class.

    python pairrm_lite.py llm-blender/PairRM --prompt "2+2?" --a "4" --b "5"
"""

import argparse, json, os, sys

import torch
from torch import nn

# microsoft/deberta-v3-large's encoder: the original layout does not ship it
DEBERTA_V3_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                        intermediate_size=4096, hidden_act="gelu", hidden_dropout_prob=0.1,
                        attention_probs_dropout_prob=0.1, max_position_embeddings=512,
                        type_vocab_size=0, initializer_range=0.02, layer_norm_eps=1e-7,
                        relative_attention=True, max_relative_positions=-1,
                        position_buckets=256, norm_rel_ebd="layer_norm", share_att_key=True,
                        pos_att_type="p2c|c2p", position_biased_input=False, pad_token_id=0,
                        vocab_size=128100)
PREFIXES = {"source_prefix_id": "<|source|>", "cand1_prefix_id": "<|candidate1|>",
            "cand2_prefix_id": "<|candidate2|>", "cand_prefix_id": "<|candidate|>"}
FILES = ["config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json"]  # no pickle


class PairRM(nn.Module):
    def __init__(self, encoder_config, tokenizer, drop_out: float = 0.05,
                 source_max_length: int = 1224, candidate_max_length: int = 412):
        super().__init__()
        from transformers import DebertaV2Model

        self.pretrained_model = DebertaV2Model(encoder_config)
        H = encoder_config.hidden_size
        self.head_layer = nn.Sequential(nn.Dropout(drop_out), nn.Linear(2 * H, H), nn.Tanh(),
                                        nn.Dropout(drop_out), nn.Linear(H, 1))  # keys .1, .4
        self.tokenizer = tokenizer  # a tokenizers.Tokenizer: we cut and pad ourselves
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.source_max_length = source_max_length
        self.candidate_max_length = candidate_max_length
        # padded tokens per batch: DeBERTa's attention is [B, heads, T, T]; on a CPU 1024 is
        # never slower than a pair at a time, 2048 is at ~500-token pairs
        self.max_batch_tokens = 1024
        self.batch_size = 32  # pairs per forward, at most
        ids = {name: tokenizer.token_to_id(tok) for name, tok in PREFIXES.items()}
        ids.update(cls=tokenizer.token_to_id("[CLS]"), sep=tokenizer.token_to_id("[SEP]"),
                   pad=tokenizer.token_to_id("[PAD]"))
        missing = [k for k, v in ids.items() if v is None]
        if missing:
            raise ValueError(f"the tokenizer lacks the PairRM tokens {missing}: is "
                             "tokenizer.json PairRM's?")
        self.ids = ids
        self.eval()

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str, *, backbone_config=None, device=None,
                        dtype=None) -> "PairRM":
        """Either layout: 'hf' (a DeBERTa-v2 config with the PairRM fields) or 'original' (a
        ranker config; the encoder is deberta-v3-large, or the DeBERTa config.json at
        backbone_config). Strict: every tensor must be there, and no other."""
        from tokenizers import Tokenizer
        from transformers import DebertaV2Config
        from transformers.initialization import no_init_weights

        folder = path_or_hub_id
        if os.path.exists(folder) or folder.startswith((".", "/", "~")):
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"{folder}: no such folder")
        else:  # a hub id: downloaded, or from the hub's cache (HF_HUB_OFFLINE=1)
            from huggingface_hub import snapshot_download

            folder = snapshot_download(path_or_hub_id, allow_patterns=FILES)
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise FileNotFoundError(f"no config.json in {folder}: not a PairRM checkpoint")
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
        if "ranker_type" not in config and config.get("model_type") not in ("deberta-v2",
                                                                            "deberta"):
            raise ValueError(f"{folder}/config.json is neither PairRM layout: expected "
                             "'ranker_type' (llm-blender/PairRM) or model_type 'deberta-v2' "
                             "(llm-blender/PairRM-hf)")
        state = load_weights(folder)
        enc, sizes = config, {}
        if "ranker_type" in config:  # the original layout (llm-blender/PairRM)
            enc = dict(DEBERTA_V3_LARGE)
            if backbone_config:
                with open(backbone_config) as f:
                    enc = json.load(f)
            embeddings = state["pretrained_model.embeddings.word_embeddings.weight"]
            enc["vocab_size"] = embeddings.shape[0]
            sizes = dict(source_max_length=config.get("source_maxlength", 1224),
                         candidate_max_length=config.get("candidate_maxlength", 412))
        enc = {k: v for k, v in enc.items() if k not in ("model_type", "architectures")}
        tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        with no_init_weights():  # skips the random init that loading overwrites (9 s on a CPU)
            model = cls(DebertaV2Config(**enc), tokenizer, config.get("drop_out", 0.05), **sizes)
        for key, tok in PREFIXES.items():  # the config's ids, must be the tokenizer's
            if key in config and config[key] != model.ids[key]:
                raise ValueError(f"config.json says {key}={config[key]} but the tokenizer maps "
                                 f"{tok} to {model.ids[key]}: tokenizer.json is another's")
        expected, got = set(model.state_dict()), set(state)
        if expected != got:
            raise ValueError(f"checkpoint {folder} does not match PairRM: missing "
                             f"{sorted(expected - got)[:5]}, unexpected "
                             f"{sorted(got - expected)[:5]}")
        model.load_state_dict(state, strict=True)
        if device is not None and torch.device(device).type == "cuda":
            model.max_batch_tokens = 16384  # keeps the [B, 16, T, T] tensors ~1 GiB each
        return model.to(device=device, dtype=dtype)

    def encode_pair(self, prompt: str, cand1: str, cand2: str) -> list[int]:
        """One comparison's ids. The source keeps at most source_max_length tokens; each
        candidate gets candidate_max_length + (source_max_length − len(source)) // 2, so at most
        2048 in all. Each part keeps its [CLS] … [SEP]; the budget is this example's own."""

        def part(prefix: str, text: str, limit: int) -> list[int]:
            ids = self.tokenizer.encode(prefix + text).ids  # [CLS] prefix text [SEP]
            return ids if len(ids) <= limit else ids[: limit - 1] + [self.ids["sep"]]

        source = part(PREFIXES["source_prefix_id"], prompt, self.source_max_length)
        budget = self.candidate_max_length + (self.source_max_length - len(source)) // 2
        return (source + part(PREFIXES["cand1_prefix_id"], cand1, budget)
                + part(PREFIXES["cand2_prefix_id"], cand2, budget))

    def forward(self, input_ids, attention_mask):
        """M[a, b] for a batch of encoded pairs: [B, T] -> [B]."""
        h = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask)
        h = h.last_hidden_state  # [B, T, H]
        src = self.at_prefix(h, input_ids, "source_prefix_id")  # [B, H]
        cand1 = self.at_prefix(h, input_ids, "cand1_prefix_id")
        cand2 = self.at_prefix(h, input_ids, "cand2_prefix_id")
        left = self.head_layer(torch.cat([src, cand1], -1))  # [B, 1]
        right = self.head_layer(torch.cat([src, cand2], -1))
        return (left - right).squeeze(-1).float()

    def at_prefix(self, h, input_ids, key: str):  # the hidden state at a prefix token, [B, H]
        rows = torch.arange(len(input_ids), device=input_ids.device)
        return h[rows, (input_ids == self.ids[key]).int().argmax(-1)]

    @torch.inference_mode()
    def _logits(self, encoded: list[list[int]], batch_size: int):
        """All encoded pairs in length-sorted batches (at most batch_size pairs and
        max_batch_tokens padded tokens), each padded to its longest pair, not to 2048."""
        out, batch_size = torch.empty(len(encoded)), batch_size or self.batch_size
        batches = [[]]
        for i in sorted(range(len(encoded)), key=lambda i: -len(encoded[i])):
            b = batches[-1]
            longest = len(encoded[b[0]]) if b else 0  # a batch's first pair is its longest
            if len(b) == batch_size or (len(b) + 1) * longest > self.max_batch_tokens:
                batches.append([])
            batches[-1].append(i)
        device = next(self.parameters()).device
        for idx in batches:
            ids = torch.full((len(idx), len(encoded[idx[0]])), self.ids["pad"])
            mask = torch.zeros_like(ids)
            for r, i in enumerate(idx):
                ids[r, : len(encoded[i])] = torch.tensor(encoded[i])
                mask[r, : len(encoded[i])] = 1
            out[idx] = self(ids.to(device), mask.to(device)).cpu()
        return out

    def compare(self, prompts, cands1, cands2, *, both_orders: bool = True,
                batch_size: int | None = None):
        """The logit that cands1[n] beats cands2[n]: M[a, b], or ½(M[a, b] − M[b, a])."""
        pairs = [self.encode_pair(p, a, b) for p, a, b in zip(prompts, cands1, cands2)]
        if not both_orders:
            return self._logits(pairs, batch_size)
        swapped = [self.encode_pair(p, b, a) for p, a, b in zip(prompts, cands1, cands2)]
        m = self._logits(pairs + swapped, batch_size)
        return (m[: len(pairs)] - m[len(pairs) :]) / 2

    def logit_matrices(self, prompts, candidates, batch_size: int | None = None):
        """M[n, i, j] for every ordered pair i ≠ j of each prompt's K candidates; diagonal 0.
        sppo.pairwise_probs turns it into probabilities."""
        K = len(candidates[0])
        index = [(n, i, j) for n in range(len(prompts)) for i in range(K) for j in range(K)
                 if i != j]
        encoded = [self.encode_pair(prompts[n], candidates[n][i], candidates[n][j])
                   for n, i, j in index]
        M = torch.zeros(len(prompts), K, K)
        M[tuple(torch.tensor(index).T)] = self._logits(encoded, batch_size)
        return M


def load_weights(folder: str) -> dict:
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        from safetensors.torch import load_file

        return load_file(os.path.join(folder, "model.safetensors"))
    path = os.path.join(folder, "pytorch_model.bin")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {folder}")
    try:  # tensors only: a pickle that would run code is refused
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"refusing {path}: not a plain tensor file ({e})") from None


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="The probability that response A beats B, by PairRM.")
    p.add_argument("model", help="PairRM's folder or hub id (llm-blender/PairRM or PairRM-hf)")
    p.add_argument("--prompt", required=True, help="the instruction both responses answer")
    p.add_argument("--a", required=True, help="response A")
    p.add_argument("--b", required=True, help="response B")
    args = p.parse_args()
    try:
        rm = PairRM.from_pretrained(args.model)
    except Exception as e:  # no such folder, no hub, not a PairRM checkpoint
        print(f"pairrm_lite: error: cannot load {args.model}: {str(e).splitlines()[0]}",
              file=sys.stderr)
        sys.exit(2)
    logit = rm.compare([args.prompt], [args.a], [args.b])[0]
    print(f"P(A beats B) = {torch.sigmoid(logit).item():.4f}  (logit {logit.item():+.4f}, "
          "both orders)")
