#!/usr/bin/env python3
"""Reference embeddings for shared/tests/embedder.rs, computed without torch.

Implements the all-MiniLM-L6-v2 BERT forward pass in numpy (float64) over the
same model.safetensors and tokenizer.json that the Rust embedder loads, then
mean-pools over the attention mask and L2-normalises, as sentence-transformers
does for this model. Each text is encoded on its own (no padding), with the
tokenizer's fixed 128 padding turned off and truncation at 256 tokens, like
elaaoms_shared::embedder.

How to run (from the repository root, after deploy/local/setup.sh has put the
model in data/models/all-MiniLM-L6-v2/):

    python3 -m venv /tmp/minilm-venv
    /tmp/minilm-venv/bin/pip install numpy safetensors tokenizers
    /tmp/minilm-venv/bin/python shared/tests/data/minilm_reference.py

It writes shared/tests/data/minilm_reference.json and prints the cosine
similarities next to the ones published for sentence-transformers; it exits
non-zero if they differ by more than 1e-3. Never install torch or
sentence-transformers for this.
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[3]
MODEL_DIR = ROOT / "data" / "models" / "all-MiniLM-L6-v2"
OUT = Path(__file__).resolve().with_name("minilm_reference.json")
MAX_TOKENS = 256

LONG_SENTENCE = (
    "Priya called again on Tuesday morning to ask whether her daughter's dental "
    "appointment could move from eight in the morning to five in the afternoon, "
    "reminded us that she is allergic to penicillin and prefers text messages to "
    "phone calls, and said that the last invoice was charged twice to her card "
    "ending in 4417, so she would like a refund before the end of the month."
)

# Longer than MAX_TOKENS, so truncation is exercised too.
OVERLONG_TEXT = " ".join(
    f"Call number {i} was about the delivery of order {1000 + i}, which arrived "
    f"late, and the caller asked for a new date next week."
    for i in range(1, 19)
)

SENTENCES = [
    "The weather is lovely today.",
    "It's so sunny outside!",
    "He drove to the stadium.",
    "A man is eating food.",
    "A man is eating a piece of bread.",
    LONG_SENTENCE,
    OVERLONG_TEXT,
]

# Published sentence-transformers similarities (see shared/INFRA-NOTES.md).
PUBLISHED = [
    (0, 1, 0.6660),
    (0, 2, 0.1046),
    (1, 2, 0.1411),
    (3, 4, 0.7553),
]

_erf = np.vectorize(math.erf)


def layer_norm(x, weight, bias, eps):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


class Bert:
    def __init__(self, model_dir):
        config = json.loads((model_dir / "config.json").read_text())
        raw = load_file(str(model_dir / "model.safetensors"))
        self.w = {
            (k[len("bert."):] if k.startswith("bert.") else k): v.astype(np.float64)
            for k, v in raw.items()
        }
        self.layers = config["num_hidden_layers"]
        self.heads = config["num_attention_heads"]
        self.eps = config["layer_norm_eps"]
        assert config["hidden_act"] == "gelu", config["hidden_act"]

    def linear(self, x, name):
        return x @ self.w[name + ".weight"].T + self.w[name + ".bias"]

    def ln(self, x, name):
        return layer_norm(x, self.w[name + ".weight"], self.w[name + ".bias"], self.eps)

    def forward(self, ids, type_ids):
        """Hidden states [seq, hidden] for one unpadded sequence."""
        n = len(ids)
        w = self.w
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][np.arange(n)]
            + w["embeddings.token_type_embeddings.weight"][type_ids]
        )
        x = self.ln(x, "embeddings.LayerNorm")
        hidden = x.shape[1]
        head_dim = hidden // self.heads
        for i in range(self.layers):
            p = f"encoder.layer.{i}"

            def heads(t):
                return t.reshape(n, self.heads, head_dim).transpose(1, 0, 2)

            q = heads(self.linear(x, f"{p}.attention.self.query"))
            k = heads(self.linear(x, f"{p}.attention.self.key"))
            v = heads(self.linear(x, f"{p}.attention.self.value"))
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(head_dim)
            scores -= scores.max(axis=-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(axis=-1, keepdims=True)
            ctx = (probs @ v).transpose(1, 0, 2).reshape(n, hidden)
            attn = self.linear(ctx, f"{p}.attention.output.dense")
            x = self.ln(attn + x, f"{p}.attention.output.LayerNorm")
            inter = gelu(self.linear(x, f"{p}.intermediate.dense"))
            out = self.linear(inter, f"{p}.output.dense")
            x = self.ln(out + x, f"{p}.output.LayerNorm")
        return x


def main():
    tokenizer = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(MAX_TOKENS)
    bert = Bert(MODEL_DIR)

    embeddings = []
    token_counts = []
    for text in SENTENCES:
        enc = tokenizer.encode(text)
        ids = np.array(enc.ids)
        mask = np.array(enc.attention_mask, dtype=np.float64)
        hidden = bert.forward(ids, np.array(enc.type_ids))
        pooled = (hidden * mask[:, None]).sum(axis=0) / mask.sum()
        embeddings.append(pooled / np.linalg.norm(pooled))
        token_counts.append(len(ids))

    ok = True
    for a, b, published in PUBLISHED:
        sim = float(embeddings[a] @ embeddings[b])
        good = abs(sim - published) <= 1e-3
        ok &= good
        print(
            f"{sim:.4f} (published {published:.4f}) {'ok' if good else 'MISMATCH'}: "
            f"{SENTENCES[a]!r} / {SENTENCES[b]!r}"
        )
    print("tokens per text:", token_counts)

    OUT.write_text(
        json.dumps(
            {
                "model": "all-MiniLM-L6-v2",
                "max_tokens": MAX_TOKENS,
                "sentences": SENTENCES,
                "token_counts": token_counts,
                "embeddings": [[round(float(v), 8) for v in e] for e in embeddings],
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {OUT.relative_to(ROOT)}")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
