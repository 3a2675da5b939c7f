"""A one-minute tour of the foundation: tokenizer, tiny decoder, KV-cache sampler.

Generates query-note pairs with a known grading rule and step-tagged traces, trains a
SentencePiece tokenizer on them, fits a `tiny` decoder for a few hundred steps with plain
next-token cross-entropy, and samples traces for held-out pairs. Later stages (SFT, RL with SAM,
distillation) replace this with the full pipeline; this only shows the pieces fit together.
"""

from __future__ import annotations

import random
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from jaxgrm.model import ModelConfig, create_model
from jaxgrm.sampling import Sampler, SamplingConfig, gather_logprobs
from jaxgrm.tokenizer import SentencePieceTokenizer

_DOMAINS = {
    "food": ["ramen", "dumplings", "matcha latte", "hotpot", "sourdough"],
    "travel": ["kyoto trip", "beach resort", "night train", "hostel", "ski lodge"],
    "beauty": ["lip balm", "sunscreen", "face mask", "eyeliner", "hair oil"],
    "home": ["sofa", "desk lamp", "rice cooker", "bookshelf", "rug"],
}
_ATTRS = ["cheap", "for kids", "in winter", "near shanghai", "for beginners"]
_FILLER = ["honestly", "lol", "must try", "so good", "not sponsored", "saving this"]


def make_pair(rng: random.Random) -> tuple[str, str, int]:
    """(prompt, trace, grade) under a fixed rule: subject, then attribute, then domain."""
    domain = rng.choice(list(_DOMAINS))
    subject, attr = rng.choice(_DOMAINS[domain]), rng.choice(_ATTRS)
    grade = rng.choice([-1, 0, 1, 2, 3])
    n_attr = attr if grade == 3 else rng.choice([a for a in _ATTRS if a != attr])
    if grade >= 2:
        n_subject, n_domain = subject, domain
    elif grade == 1:
        n_domain = domain
        n_subject = rng.choice([s for s in _DOMAINS[domain] if s != subject])
    else:
        n_domain = rng.choice([d for d in _DOMAINS if d != domain])
        n_subject = rng.choice(_DOMAINS[n_domain])
    ad = " buy now link in bio" if grade == -1 else ""
    note = f"{n_subject} {n_attr} {rng.choice(_FILLER)}{ad}"
    prompt = f"query: {subject} {attr}\nnote: {note}\n"
    if grade == -1:
        rule = "spam ad"
    elif grade == 0:
        rule = "other domain"
    elif grade == 1:
        rule = "same domain other subject"
    else:
        rule = "subject match, attribute " + ("match" if grade == 3 else "mismatch")
    trace = (
        f"<step1> {subject} | {attr} </step1><step2> {n_subject} | {n_attr} | {n_domain} </step2>"
        f"<step3> {rule} </step3><answer> {grade} </answer>"
    )
    return prompt, trace, grade


def run_demo(steps: int = 200, seed: int = 0, num_samples: int = 4, batch: int = 32) -> float:
    """Run the demo, print samples, and return grade accuracy on 64 held-out pairs."""
    rng = random.Random(seed)
    train = [make_pair(rng) for _ in range(4000)]
    held_out = [make_pair(rng) for _ in range(64)]

    t0 = time.time()
    tok = SentencePieceTokenizer.train((p + t for p, t, _ in train), vocab_size=400)
    print(f"tokenizer: {tok.vocab_size} pieces, trained in {time.time() - t0:.1f}s")

    seqs = [tok.encode(p + t, add_bos=True, add_eos=True) for p, t, _ in train]
    length = max(map(len, seqs))
    data = np.full((len(seqs), length), tok.pad_id, np.int32)
    for i, s in enumerate(seqs):
        data[i, : len(s)] = s
    cfg = ModelConfig.tiny(vocab_size=tok.vocab_size)
    model = create_model(cfg, seed=seed)
    print(f"model: {cfg.name}, {cfg.num_params() / 1e6:.2f}M params; sequences of {length} tokens")

    optimizer = nnx.Optimizer(model, optax.adamw(3e-3, weight_decay=0.01), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, tokens_BT):
        valid = tokens_BT != tok.pad_id

        def loss_fn(model):
            logits = model.forward(tokens_BT, valid.astype(jnp.int32))
            logp = gather_logprobs(logits[:, :-1], tokens_BT[:, 1:])
            weight = valid[:, 1:]
            return -(logp * weight).sum() / weight.sum()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    order = np.random.default_rng(seed)
    bar = tqdm(range(steps), desc="train", unit="step", mininterval=2.0)
    for _ in bar:
        loss = train_step(model, optimizer, jnp.asarray(data[order.integers(0, len(data), batch)]))
        bar.set_postfix(loss=f"{float(loss):.3f}")

    stop = (tok.token_id("</answer>"), tok.eos_id)
    sampler = Sampler(
        model,
        SamplingConfig(
            max_new_tokens=64, temperature=0.0, stop_ids=stop, pad_id=tok.pad_id,
            prompt_buckets=(32, 64),
        ),
    )  # fmt: skip
    prompts = [tok.encode(p, add_bos=True) for p, _, _ in held_out]
    t0 = time.time()
    out = sampler(nnx.state(model), prompts, jax.random.key(seed))
    tokens, mask = np.asarray(out.tokens_BM), np.asarray(out.mask_BM)
    print(f"sampled {int(mask.sum())} tokens for {len(prompts)} prompts in {time.time() - t0:.1f}s")
    correct = 0
    for i, (prompt, _, grade) in enumerate(held_out):
        text = tok.decode(tokens[i][mask[i]])
        answer = text.split("<answer>")[-1].split("</answer>")[0].strip()
        correct += answer == str(grade)
        if i < num_samples:
            print(f"\n--- pair {i} (true grade {grade})\n{prompt}{text}")
    accuracy = correct / len(held_out)
    print(f"\ngrade accuracy on {len(held_out)} held-out pairs: {accuracy:.0%}")
    return accuracy
