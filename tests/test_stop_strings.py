"""Stop strings through the engine on the bundled model: a span ends where its text first holds one, which is cut
off in the span and in the filled text, and a stream shows exactly the span's text (a tail that may begin a stop
string is held back, and given with the span event when the stop string never comes). The HTTP routes' side is in
tests/test_serve_api.py."""

from __future__ import annotations


def test_a_stop_string_ends_the_span_and_is_cut_off_in_the_span_and_the_text():
    """greedy through the engine: the span ends at the token whose text completes the stop string; span.text and
    the result's text stop before it; the stream never showed any of it (a tail that may begin it is held)."""
    from glm_runtime.generate import fill_blanks
    from glm_runtime.session import open_model

    session, tok = open_model(None)
    prompt = "The capital of France is [MASK]. It is known for [MASK]."
    (free,) = fill_blanks(session, tok, [prompt], max_new_tokens=10)
    first = free.spans[0].text
    stop = first[1:4]
    events = []
    (got,) = fill_blanks(session, tok, [prompt], max_new_tokens=10, stop=[stop], stream=events.append)
    cut = got.spans[0]
    assert cut.stop == "stop" and cut.text == first[: first.find(stop)]
    assert got.text.startswith("The capital of France is" + cut.text + ".")
    shown = "".join(e.text for e in events if e.kind == "token" and e.blank == 0)
    assert shown == cut.text and stop not in shown
    assert len(got.spans) == 2  # the next blank is still filled


def test_text_held_back_for_a_stop_string_that_never_comes_is_in_the_span_event():
    """The answer's last character begins a stop string that never completes: token events held it back, and
    the span event's `rest` carries it, so a stream's texts still add up to the span's."""
    from glm_runtime.generate import fill_blanks
    from glm_runtime.session import open_model

    session, tok = open_model(None)
    prompt = "The capital of France is [MASK]."
    (free,) = fill_blanks(session, tok, [prompt], max_new_tokens=6)
    whole = free.spans[0].text
    events = []
    (got,) = fill_blanks(session, tok, [prompt], max_new_tokens=6, stop=[whole[-1] + "\u2603"], stream=events.append)
    assert got.spans[0].text == whole and got.spans[0].stop == free.spans[0].stop
    shown = "".join(e.text for e in events if e.kind == "token")
    (span_event,) = [e for e in events if e.kind == "span"]
    assert shown == whole[:-1] and span_event.rest == whole[-1]
