"""What the server tests share: a mix of requests and their one-by-one answers, and clients that ask at once."""

from __future__ import annotations

import threading
from collections.abc import Callable

PROMPTS = [
    "The capital of France is [MASK].",
    "He went to the [MASK] and bought [MASK] for dinner.",
    "The [sMASK] was very good.",
    "Water boils at [MASK] degrees.",
]


def mixed_request(i: int) -> tuple[str, int]:
    """Request i of a mix: (prompt, max_new_tokens), blanks and budgets varying with i."""
    return PROMPTS[i % len(PROMPTS)], 3 + i % 4


def one_by_one(n: int) -> list:
    """fill_blanks([prompt]) of requests 0..n-1 on the bundled model: what a server must answer for each."""
    from glm_runtime.generate import fill_blanks
    from glm_runtime.session import open_model

    session, tok = open_model(None, "onnxruntime")
    answers = []
    for i in range(n):
        prompt, max_new = mixed_request(i)
        (alone,) = fill_blanks(session, tok, [prompt], max_new_tokens=max_new)
        answers.append(alone)
    return answers


def concurrently(ask: Callable[[int], None], n: int, join_s: float = 120.0) -> None:
    """ask(0..n-1), each on its own thread, all started before any is waited for."""
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(join_s)
