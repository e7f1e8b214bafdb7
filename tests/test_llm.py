"""llm.py and tokenizer.py: text in, text out on a tiny random model with the tiny tokenizer."""

from __future__ import annotations

import json
import shutil

import pytest

from slimlm.checkpoint import load_model
from slimlm.generate import SamplingParams, generate_tokens
from slimlm.llm import LLM, Completion
from slimlm.tokenizer import StopStringText, StreamDecoder, Tokenizer

PROMPT = "hello world"  # on the shared tiny Llama (seed 1) this yields mostly whole-word pieces


@pytest.fixture(scope="module")
def llm(tiny_llama) -> LLM:
    folder, _ = tiny_llama
    return LLM(load_model(folder)[2], Tokenizer.from_pretrained(folder), folder)


@pytest.fixture(scope="module")
def free_run(llm) -> tuple[Completion, list[str]]:
    """Greedy output with no stop strings and stop tokens ignored: the reference the stop tests cut."""
    c = llm.complete([PROMPT], max_new_tokens=30, ignore_eos=True)[0]
    pieces = list(llm.stream(PROMPT, max_new_tokens=30, ignore_eos=True))
    assert len(c.text) > 30 and len(pieces) > 8, "the tiny model should produce some text"
    return c, pieces


def chatml(messages, generation_prompt=True) -> str:
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if generation_prompt else "")


# --- tokenizer -------------------------------------------------------------------------------------------------


def test_tokenizer_stop_ids_and_pad(tokenizer_dir, tiny_llama, hf_tokenizer, tmp_path):
    vocab = hf_tokenizer.get_vocab()
    tok = Tokenizer.from_pretrained(tokenizer_dir)  # no generation_config.json here
    assert tok.stop_token_ids == {vocab["<|im_end|>"], vocab["<|endoftext|>"]}
    assert tok.pad_id == vocab["<|endoftext|>"] and tok.vocab_size == 384
    folder = shutil.copytree(tiny_llama[0], tmp_path / "m")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 77, 78]}))
    assert Tokenizer.from_pretrained(folder).stop_token_ids == {0, 2, 77, 78}
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 99}))
    assert Tokenizer.from_pretrained(folder).stop_token_ids == {0, 2, 99}


def test_tokenizer_chat_template(tokenizer_dir, hf_tokenizer):
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    ids = tok.apply_chat_template(msgs)
    assert ids == hf_tokenizer.encode(chatml(msgs), add_special_tokens=False)
    assert ids.count(hf_tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3
    assert tok.prompt_ids("hello world", chat=True) == tok.apply_chat_template(
        [{"role": "user", "content": "hello world"}]
    )
    assert tok.prompt_ids("hello world", chat=False) == hf_tokenizer.encode("hello world")
    assert tok.decode(ids, skip_special_tokens=False) == chatml(msgs)


def test_tokenizer_without_chat_template(tokenizer_dir, tmp_path):
    cfg_path = shutil.copytree(tokenizer_dir, tmp_path / "t") / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    (tmp_path / "t" / "chat_template.jinja").unlink(missing_ok=True)
    tok = Tokenizer.from_pretrained(tmp_path / "t")
    assert not tok.has_chat_template
    with pytest.raises(ValueError, match="has no chat template"):
        tok.prompt_ids([{"role": "user", "content": "hi"}])


def test_stream_decoder_multibyte_utf8(tokenizer_dir):
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    text = "café 日本語 😀 Grüße € hello 🚀Ωμέγα"
    ids = tok.encode(text, add_special_tokens=False)
    # the test only means something if some characters are split over several byte tokens
    assert sum("\ufffd" in tok.decode([i]) for i in ids) >= 4
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text
    assert pieces.count("") > 0  # incomplete characters were held back


def test_stream_decoder_skips_special_tokens(tokenizer_dir, hf_tokenizer):
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    ids = (
        tok.encode("the cat", add_special_tokens=False)
        + [hf_tokenizer.convert_tokens_to_ids("<|im_end|>")]
        + tok.encode(" sat 日本", add_special_tokens=False)
    )
    dec = StreamDecoder(tok)
    assert "".join(dec.push(i) for i in ids) == "the cat sat 日本"
    dec = StreamDecoder(tok, skip_special_tokens=False)
    assert "".join(dec.push(i) for i in ids) == "the cat<|im_end|> sat 日本"


# --- LLM -------------------------------------------------------------------------------------------------------


def test_generate_matches_token_loop_and_tokenizer(llm, free_run):
    c, _ = free_run
    ids = llm.tokenizer.prompt_ids(PROMPT, chat=True)
    steps = generate_tokens(llm.model, [ids], SamplingParams(max_new_tokens=30, ignore_eos=True))
    expected = [s[0] for s in steps]
    assert c.token_ids == expected
    full = llm.tokenizer.decode(expected)
    # the streamed text is the tokenizer's decode, except that trailing bytes that do not form a character
    # (a random model emits some) are held back rather than shown as U+FFFD
    assert full.startswith(c.text) and set(full[len(c.text) :]) <= {"\ufffd"}
    assert "\ufffd" in c.text  # (complete but invalid sequences in the middle do decode to U+FFFD)
    assert llm.generate(PROMPT, max_new_tokens=30, ignore_eos=True) == c.text


def test_stream_pieces_join_to_generate_text(llm, free_run):
    c, pieces = free_run
    assert "".join(pieces) == c.text
    assert all(pieces)


def test_stop_string_inside_one_piece(llm, free_run):
    c, pieces = free_run
    k = next(i for i, p in enumerate(pieces) if i > 2 and len(p.strip()) >= 3)
    stop = pieces[k].strip()[1:3]
    expected = c.text[: c.text.find(stop)]
    out = llm.complete([PROMPT], max_new_tokens=30, ignore_eos=True, stop=[stop])[0]
    assert out.text == expected and out.finish_reason == "stop"
    assert out.completion_tokens < 30
    assert "".join(llm.stream(PROMPT, max_new_tokens=30, ignore_eos=True, stop=[stop])) == expected


def test_several_stop_strings_cut_at_the_first(llm, free_run):
    c, _ = free_run
    late, early = c.text[-4:], c.text[10:13]
    expected = c.text[: min(c.text.find(late), c.text.find(early))]
    assert llm.generate(PROMPT, max_new_tokens=30, ignore_eos=True, stop=[late, early]) == expected


def test_stop_string_spanning_pieces(llm, free_run):
    c, pieces = free_run
    # a stop string that begins in one piece and ends in the next
    offsets = [sum(len(p) for p in pieces[: i + 1]) for i in range(len(pieces))]
    b = next(o for o, p, q in zip(offsets, pieces, pieces[1:]) if o > 3 and len(p) >= 2 and len(q) >= 2)
    stop = c.text[b - 2 : b + 2]
    expected = c.text[: c.text.find(stop)]
    assert "".join(llm.stream(PROMPT, max_new_tokens=30, ignore_eos=True, stop=[stop])) == expected
    assert llm.generate(PROMPT, max_new_tokens=30, ignore_eos=True, stop=[stop]) == expected


def test_stop_string_text_unit():
    t = StopStringText(["o w"])
    assert t.add("hello world") == ("hell", True) and t.text == "hell"
    t = StopStringText(["xyz"])
    assert t.add("hel") == ("hel", False)  # no end of "hel" can begin "xyz": nothing is held back
    assert t.add("lox") == ("lo", False) and t.flush() == "x"  # "x" might begin "xyz" until the row ends
    t = StopStringText(["bc"])
    assert t.add("ab") == ("a", False)
    assert t.add("cd") == ("", True) and t.text == "a"  # the stop spans the two pieces: "b" is never emitted
    t = StopStringText(["cb", "b"])
    assert t.add("a") == ("a", False)
    assert t.add("bcbc") == ("", True) and t.text == "a"
    t = StopStringText([])
    assert t.add("abc") == ("abc", False) and t.flush() == ""


def test_chat_messages_use_the_chat_template(llm, hf_tokenizer):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat sat"}]
    c = llm.complete([msgs], max_new_tokens=5, ignore_eos=True)[0]
    expected_ids = hf_tokenizer.encode(chatml(msgs), add_special_tokens=False)
    assert c.prompt_tokens == len(expected_ids)
    steps = generate_tokens(llm.model, [expected_ids], SamplingParams(max_new_tokens=5, ignore_eos=True))
    assert c.token_ids == [s[0] for s in steps]
    assert llm.generate(msgs, max_new_tokens=5, ignore_eos=True) == c.text
    # a plain string is one user turn by default (the tokenizer has a template), raw text with chat=False
    user = llm.complete(["the cat sat"], max_new_tokens=1)[0]
    assert user.prompt_tokens == len(
        hf_tokenizer.encode(chatml([{"role": "user", "content": "the cat sat"}]), add_special_tokens=False)
    )
    raw = llm.complete(["the cat sat"], max_new_tokens=1, chat=False)[0]
    assert raw.prompt_tokens == len(hf_tokenizer.encode("the cat sat"))


def test_completion_counts_and_length_finish(llm):
    c = llm.complete([PROMPT], max_new_tokens=7, ignore_eos=True)[0]
    assert c.finish_reason == "length" and c.completion_tokens == 7 and len(c.token_ids) == 7
    assert c.prompt_tokens == len(llm.tokenizer.prompt_ids(PROMPT, chat=True))
    assert c.prefill_s > 0 and c.decode_s > 0 and c.decode_tokens_per_s > 0


def _first_new_token_index(ids: list[int]) -> int:
    return next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])


def test_stop_token_from_generation_config(tiny_llama, free_run, tmp_path):
    c, _ = free_run
    k = _first_new_token_index(c.token_ids)
    stop_tok = c.token_ids[k]
    folder = shutil.copytree(tiny_llama[0], tmp_path / "m")
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, stop_tok]}))
    llm = LLM(load_model(folder)[2], Tokenizer.from_pretrained(folder), folder)
    out = llm.complete([PROMPT], max_new_tokens=30)[0]
    assert out.finish_reason == "stop"
    assert out.completion_tokens == k + 1  # the stop token is counted ...
    assert out.token_ids == c.token_ids[:k]  # ... but not returned
    assert out.text == llm.tokenizer.decode(c.token_ids[:k])
    # ignore_eos generates through it
    assert llm.complete([PROMPT], max_new_tokens=30, ignore_eos=True)[0].token_ids == c.token_ids


def test_batch_generate_equals_single(llm):
    prompts = ["hello world", "the quick brown fox jumps over the lazy dog", [{"role": "user", "content": "big"}]]
    single = [llm.generate(p, max_new_tokens=12) for p in prompts]
    assert llm.generate(prompts, max_new_tokens=12) == single
    assert llm.generate(prompts[:1], max_new_tokens=12) == single[:1]  # a list of one prompt gives a list


def test_params_and_kwargs_together_rejected(llm):
    with pytest.raises(ValueError, match="either params=SamplingParams"):
        llm.generate(PROMPT, SamplingParams(), max_new_tokens=3)


def test_seeded_sampling_through_llm(llm):
    a = llm.generate(PROMPT, max_new_tokens=15, temperature=1.2, top_p=0.95, seed=5)
    b = llm.generate(PROMPT, max_new_tokens=15, temperature=1.2, top_p=0.95, seed=5)
    assert a == b


def test_token_id_prompts(llm):
    ids = llm.tokenizer.encode("the cat sat on the mat")
    by_ids = llm.complete([ids], max_new_tokens=6, ignore_eos=True)[0]
    by_text = llm.complete(["the cat sat on the mat"], chat=False, max_new_tokens=6, ignore_eos=True)[0]
    assert by_ids.prompt_tokens == len(ids) and by_ids.token_ids == by_text.token_ids
    assert llm.generate(ids, max_new_tokens=6, ignore_eos=True) == by_ids.text
    with pytest.raises(ValueError, match="token ids must be in"):
        llm.complete([[llm.config.vocab_size]], max_new_tokens=1)


def test_compiled_model_gives_the_eager_tokens(tiny_llama):
    import slimlm

    eager = slimlm.load(str(tiny_llama[0]), dtype="fp32")
    ref = eager.complete(["hello there"], max_new_tokens=8, ignore_eos=True)[0].token_ids
    compiled = slimlm.load(str(tiny_llama[0]), dtype="fp32", compile=True)
    assert compiled.complete(["hello there"], max_new_tokens=8, ignore_eos=True)[0].token_ids == ref
