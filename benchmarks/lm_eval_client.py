"""lm-evaluation-harness's own `local-completions` client against the server, the way it scores multiple-choice
tasks: its remote tokenizer (found through GET /tokenizer_info and POST /tokenize), loglikelihood requests (token-id
prompts, batched, `echo: true, logprobs: 1, max_tokens: 1`, read by its parse_logprobs), generate_until. Each
loglikelihood (and its is-greedy flag) is compared with the log-softmax of the model's own prompt logits; exits 1 on
a mismatch. No task data is read (the requests are built here), so it runs offline.

lm_eval is not a dependency of this package; into a separate folder, without a second torch:
    pip install --dry-run "lm_eval[api]"      # lists what it would add to this environment
    pip install --target /tmp/lmeval --no-deps lm_eval==0.4.13 <the rest of that list>
    PYTHONPATH=/tmp/lmeval python benchmarks/lm_eval_client.py [--model random:tiny]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

PAIRS = [("The capital of France is", " Paris"), ("Two plus two equals", " four"), ("The sky is", " blue today"),
         ("Question: what colour is grass? Answer:", " green")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="random:tiny")
    ap.add_argument("--tolerance", type=float, default=1e-3, help="largest |loglikelihood - offline| accepted")
    args = ap.parse_args()
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from test_server import ThreadServer  # uvicorn on a thread, as the server tests run it

    from internvl_engine import LLM
    from internvl_engine.engine.async_llm import AsyncLLM
    from internvl_engine.server import ServerSettings

    settings = ServerSettings(model_name=args.model)
    engine = dict(device="cpu", kv_cache_tokens=8192, max_num_seqs=8)
    llm = AsyncLLM(args.model, **engine, media_policy=settings.media_policy())
    srv = ThreadServer(llm, settings)
    try:
        lm = LocalCompletionsAPI(base_url=srv.url + "/v1/completions", model=args.model, tokenizer_backend="auto",
                                 num_concurrent=2, max_retries=1, batch_size=4)
        print("tokenizer backend:", lm.tokenizer_backend)
        got = lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i)
                                for i, p in enumerate(PAIRS)])
        offline = LLM(args.model, **engine)
        tok = offline.processor.tokenizer
        worst, ok = 0.0, lm.tokenizer_backend == "remote"
        for (ctx, cont), (ll, greedy) in zip(PAIRS, got):
            ids, n_ctx = tok.encode(ctx + cont), len(tok.encode(ctx))
            lp = torch.log_softmax(offline.prompt_logits({"prompt_token_ids": ids}).double(), -1)
            want = sum(lp[i - 1, ids[i]].item() for i in range(n_ctx, len(ids)))
            want_greedy = all(int(lp[i - 1].argmax()) == ids[i] for i in range(n_ctx, len(ids)))
            worst = max(worst, abs(want - ll))
            ok &= greedy == want_greedy
            print(f"{ctx!r} + {cont!r}: {ll:.6f} (offline {want:.6f}), greedy {greedy}")
        ok &= worst <= args.tolerance
        print(f"max |loglikelihood - offline| = {worst:.2e}")
        print("generate_until:", lm.generate_until([Instance(
            request_type="generate_until", doc={}, idx=0,
            arguments=("Once upon a time", {"until": ["\n\n"], "max_gen_toks": 8}))]))
    finally:
        srv.stop()
        llm.shutdown()
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
