"""Check the `jaxgrm serve` page in a real browser (Debian's headless Chromium).

Trains a tokenizer and a tiny model to write one fixed three-step trace (a minute on a CPU at
most), serves it on 127.0.0.1 (an OS-chosen port), opens the page with the pair in its URL
(the page fills the form and submits it), dumps the DOM after the page's JavaScript has run and
checks that every step is rendered in its own block with its conclusion, with the grade and the
distribution bars. Saves a screenshot to experiments/results/serve/page.png.

    python experiments/serve_page_check.py [--chromium /usr/bin/chromium] [--out DIR]

Needs `chromium` (`apt-get install -y chromium`). Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import argparse
import html.parser
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from jaxgrm.bundle import load_bundle, save_bundle  # noqa: E402
from jaxgrm.data.schema import RelevanceExample  # noqa: E402
from jaxgrm.model import ModelConfig, create_model  # noqa: E402
from jaxgrm.prompts import (  # noqa: E402
    PromptConfig,
    format_answer,
    format_trace,
    render_prompt,
    render_prompt_text,
)
from jaxgrm.sampling import gather_logprobs  # noqa: E402
from jaxgrm.score import GradeScorer  # noqa: E402
from jaxgrm.serve import make_server  # noqa: E402
from jaxgrm.tokenizer import SentencePieceTokenizer  # noqa: E402

PROMPT = PromptConfig(instructions=False, criteria=False, doc_budget=24)
STEPS = {
    "step1": {"subject": "hiking boots", "constraints": ["waterproof"], "intent": "buy"},
    "step2": {"subject": "hiking boots", "covers": ["waterproof"], "format": "product page"},
    "step3": {"rule": "all_met", "bound": "= 3"},
}
PROSE = {"step1": "the user wants boots", "step2": "the page sells boots", "step3": "it fits"}
TARGET = format_trace(STEPS, 3, PROSE)
QUERY, DOC, TITLE = "waterproof hiking boots", "leather boots for the trail, waterproof", "Boots"
WORDS = ["cheap", "hiking", "boots", "trail", "shoes", "waterproof", "leather", "tent", "stove"]


def example(query: str, doc: str) -> RelevanceExample:
    return RelevanceExample(
        qid="q", query=query, doc=doc, doc_title=TITLE, label=0, scale="xhs5", source="check"
    )


def train_bundle(path: Path) -> None:
    """A tiny bundle whose model answers TARGET after any prompt."""
    rng = np.random.default_rng(0)
    rows = [(" ".join(rng.choice(WORDS, 3)), " ".join(rng.choice(WORDS, 8))) for _ in range(8)]
    rows.append((QUERY, DOC))
    texts = [render_prompt_text(example(q, d), f"{TITLE}\n{d}", PROMPT) for q, d in rows]
    tok = SentencePieceTokenizer.train(
        [*texts, *[TARGET] * 8, *[format_answer(g) for g in range(-1, 5)]], vocab_size=400
    )
    cfg = ModelConfig.tiny(
        vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1,
        head_dim=32, mlp_dim=128, max_seq_len=384,
    )  # fmt: skip
    model = create_model(cfg, seed=0)
    target = tok.encode(TARGET) + [tok.eos_id]
    prompts = [render_prompt(example(q, d), tok, PROMPT).ids for q, d in rows]
    seqs = [p + target for p in prompts]
    width = max(map(len, seqs))
    tokens = np.array([s + [0] * (width - len(s)) for s in seqs], np.int32)
    lengths = np.array([len(s) for s in seqs])
    valid = (np.arange(width)[None] < lengths[:, None]).astype(np.int32)
    loss_mask = np.zeros((len(seqs), width), np.float32)
    for i, p in enumerate(prompts):
        loss_mask[i, len(p) : lengths[i]] = 1
    graphdef, params = nnx.split(model)
    opt = optax.adam(3e-3)

    @jax.jit
    def step(params, opt_state):
        def loss(p):
            logits = nnx.merge(graphdef, p).forward(tokens[:, :-1], valid[:, :-1])
            lp = gather_logprobs(logits, tokens[:, 1:])
            return -(lp * loss_mask[:, 1:]).sum() / loss_mask.sum()

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    opt_state = opt.init(params)
    for _ in range(200):
        params, opt_state, value = step(params, opt_state)
    nnx.update(model, params)
    print(f"trained the tiny model: loss {float(value):.4f}")
    save_bundle(model, tok, PROMPT, path, scale="xhs5", provenance={"stage": "page-check"})


class _Dom(html.parser.HTMLParser):
    """The text of each element carrying data-step / data-grade, and of #grade."""

    def __init__(self):
        super().__init__()
        self.steps: dict[str, str] = {}
        self.bars: dict[str, str] = {}
        self.grade = ""
        self.state = None
        self._open: list[tuple[str, str | None, list[str]]] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.state = a.get("data-state")
        key = (
            ("step", a["data-step"]) if "data-step" in a
            else ("bar", a["data-grade"]) if "data-grade" in a
            else ("grade", "") if a.get("id") == "grade"
            else None
        )  # fmt: skip
        self._open.append((tag, key, []))

    def handle_endtag(self, tag):
        while self._open:
            t, key, parts = self._open.pop()
            text = " ".join(parts)
            if self._open:
                self._open[-1][2].append(text)
            if key is not None:
                kind, name = key
                target = {"step": self.steps, "bar": self.bars}.get(kind)
                if target is None:
                    self.grade = text
                else:
                    target[name] = text
            if t == tag:
                break

    def handle_data(self, data):
        if self._open and data.strip():
            self._open[-1][2].append(data.strip())


def chromium(binary: str, url: str, profile: str, *extra: str) -> subprocess.CompletedProcess:
    args = [
        binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=10000", *extra, url,
    ]  # fmt: skip
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve")
    args = parser.parse_args()
    if not Path(args.chromium).exists():
        sys.exit(f"{args.chromium} is missing: apt-get update && apt-get install -y chromium")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        train_bundle(Path(tmp) / "bundle")
        scorer = GradeScorer(load_bundle(Path(tmp) / "bundle"), batch_size=1, max_new_tokens=96)
        server = make_server(scorer, "127.0.0.1", 0)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        base = f"http://127.0.0.1:{server.port}/"
        try:
            start = time.perf_counter()  # warm up: compile before the browser's timed visit
            req = urllib.request.Request(
                base + "score",
                json.dumps(
                    {"pairs": [{"query": QUERY, "doc": DOC, "doc_title": TITLE}], "trace": True}
                ).encode(),  # fmt: skip
                {"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=300) as res:
                api = json.loads(res.read())["results"][0]
            print(f"API: grade {api['grade']} in {time.perf_counter() - start:.1f} s (compile)")
            query = urllib.parse.urlencode({"q": QUERY, "doc": DOC, "title": TITLE})
            url = f"{base}?{query}"
            dom = chromium(args.chromium, url, f"{tmp}/profile", "--dump-dom").stdout
            shot = args.out / "page.png"
            chromium(
                args.chromium, url, f"{tmp}/profile2", f"--screenshot={shot}",
                "--window-size=1000,900", "--hide-scrollbars",
            )  # fmt: skip
        finally:
            server.shutdown()
            server.server_close()
    (args.out / "page_dom.html").write_text(dom, encoding="utf-8")
    parsed = _Dom()
    parsed.feed(dom)
    print(f"page state: {parsed.state}")
    for name, text in parsed.steps.items():
        print(f"  {name}: {text}")
    print(f"  {parsed.grade}")
    for grade, text in parsed.bars.items():
        print(f"  bar {grade}: {text}")
    problems = []
    if parsed.state != "scored":
        problems.append(f"the page did not finish scoring (state {parsed.state!r})")
    if list(parsed.steps) != list(STEPS):
        problems.append(f"expected step blocks {list(STEPS)}, got {list(parsed.steps)}")
    for name, values in STEPS.items():
        text = parsed.steps.get(name, "")
        wanted = [PROSE[name], *(f"{k}: {v if isinstance(v, str) else ', '.join(v)}"
                                 for k, v in values.items())]  # fmt: skip
        problems += [f"{name}: {w!r} not rendered" for w in wanted if w not in text]
    if "Grade: 3" not in parsed.grade or api["grade"] != 3:
        problems.append(f"expected grade 3, page says {parsed.grade!r}, API {api['grade']}")
    if sorted(parsed.bars, key=int) != ["-1", "0", "1", "2", "3"]:
        problems.append(f"expected a bar per xhs5 grade, got {list(parsed.bars)}")
    if not shot.exists() or shot.stat().st_size == 0:
        problems.append(f"no screenshot at {shot}")
    summary = {"ok": not problems, "problems": problems, "steps": parsed.steps,
               "grade": parsed.grade, "bars": parsed.bars, "screenshot": str(shot)}  # fmt: skip
    (args.out / "page_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("PAGE CHECK " + ("PASSED" if not problems else "FAILED:\n  " + "\n  ".join(problems)))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
