"""Does a `glmx pretrain` model look at a [MASK]'s neighbours when it predicts the span's first token?

In: a glmx checkpoint written by `glmx pretrain` and its corpus folder. Out: the mean KL divergence of the
first-token distribution (the prediction made from sop) when the Part A token right before or after the span's
[MASK] is replaced, and when a token 40 places away is replaced. A model that uses the blank's surroundings
moves far more for a neighbour than for a distant token; one that ignores them moves the same (tiny) amount.

Usage: python -m glmx_benchmarks.context_sensitivity glm_export/bundled/glmx-small data/corpus [--samples 8]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from glm_export.checkpoint import load_checkpoint
from glm_export.collator import BlockCollator
from glm_export.evaluate import pretraining_settings
from glm_export.pretrain import (
    batch_to_tensors,
    cut_samples,
    layout_special_ids,
    load_corpus_tokenizer,
    read_documents,
    split_documents,
    token_stream,
)

OFFSETS = {"neighbour": (-1, 1), "far": (-40, 40)}
SPANS_PER_SAMPLE = 4


@torch.no_grad()
def sensitivity(checkpoint: str, corpus: str, samples: int = 8, seed: int = 0) -> dict[str, float]:
    loaded = load_checkpoint(checkpoint)
    model, s = loaded.model.float().eval(), pretraining_settings(loaded.manifest)
    tok, sp = load_corpus_tokenizer(loaded.tokenizer_file), layout_special_ids()
    _, held_docs = split_documents(read_documents(corpus), s.heldout_fraction)
    held = cut_samples(token_stream(tok, held_docs), s.seq_length)
    b = batch_to_tensors(BlockCollator(sp)(list(held[:samples]), np.random.default_rng(seed), mode="bert"))

    def first_logp(ids: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(model(ids, b["position_ids"], b["sep"])[0].float(), -1)

    base, kls = first_logp(b["input_ids"]), {k: [] for k in OFFSETS}
    replacement, fallback = (tok.encode(w, add_special_tokens=False).ids[0] for w in (" the", " a"))
    for i in range(len(b["input_ids"])):
        sep, ids = int(b["sep"][i]), b["input_ids"][i]
        firsts = [t for t in range(sep, len(ids)) if ids[t] == sp.sop and b["loss_mask"][i, t] == 1]
        for t in firsts[:SPANS_PER_SAMPLE]:
            p = int(b["position_ids"][i, 0, t])
            for kind, offsets in OFFSETS.items():
                for d in offsets:
                    q = p + d
                    if not 0 <= q < sep or int(ids[q]) in (sp.mask, sp.cls, sp.eos):
                        continue
                    changed = b["input_ids"].clone()
                    changed[i, q] = replacement if int(ids[q]) != replacement else fallback
                    lp = first_logp(changed)
                    kls[kind].append(float((base[i, t].exp() * (base[i, t] - lp[i, t])).sum()))
    return {f"kl_{kind}": float(np.mean(v)) for kind, v in kls.items()} | {
        f"n_{kind}": len(v) for kind, v in kls.items()
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("corpus")
    ap.add_argument("--samples", type=int, default=8, help="held-out samples (up to 4 spans each)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    print(sensitivity(args.checkpoint, args.corpus, args.samples))


if __name__ == "__main__":
    main()
