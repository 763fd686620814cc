"""The token finder, on the real SDXL tokenizer shipped with the host."""
import pytest

from training.host import pack_module, setup_comfyui

core = pack_module("nested_core")


@pytest.fixture(scope="module")
def tokenizer():
    setup_comfyui(cpu=True)
    import comfy.sdxl_clip

    return comfy.sdxl_clip.SDXLTokenizer()


def chunks_of(tokenizer, text):
    return [[t[0] for t in chunk] for chunk in tokenizer.tokenize_with_weights(text)["l"]]


def ids(tokenizer, word):
    return tokenizer.clip_l.tokenizer(word)["input_ids"][1:-1]


def test_positions_follow_chunks(tokenizer):
    text = "a person, " + " ".join(["x"] * 80) + " person"
    chunks = chunks_of(tokenizer, text)
    assert len(chunks) == 2
    found = core.find_token_positions(chunks, ids(tokenizer, "person"), word="person")
    assert found[0] == 2  # BOS, "a", "person"
    c, p = divmod(found[1], core.CHUNK_LEN)
    assert c == 1 and chunks[1][p] == ids(tokenizer, "person")[0]


def test_occurrence_picks_one(tokenizer):
    chunks = chunks_of(tokenizer, "a person next to another person")
    every = core.find_token_positions(chunks, ids(tokenizer, "person"), word="person", occurrence=0)
    assert len(every) == 2
    assert core.find_token_positions(chunks, ids(tokenizer, "person"), word="person", occurrence=2) == [every[1]]
    with pytest.raises(ValueError, match="has 'person' 2 time"):
        core.find_token_positions(chunks, ids(tokenizer, "person"), word="person", occurrence=3)


def test_weights_syntax_and_case_do_not_matter(tokenizer):
    chunks = chunks_of(tokenizer, "a photo of a (Person:1.3)")
    assert core.find_token_positions(chunks, ids(tokenizer, "person"), word="person") == [5]


def test_plural_is_another_word(tokenizer):
    with pytest.raises(ValueError, match="'person' is not in the prompt"):
        core.find_token_positions(chunks_of(tokenizer, "two persons"), ids(tokenizer, "person"), word="person")


def test_multi_token_word_says_what_to_do(tokenizer):
    word_ids = ids(tokenizer, "photomaker")
    assert len(word_ids) > 1
    with pytest.raises(ValueError, match="'photomaker' is .* CLIP tokens.*single-token word"):
        core.find_token_positions(chunks_of(tokenizer, "a photomaker man"), word_ids, word="photomaker")


def test_repeated_positions():
    assert core.repeated_positions([3, 10], 77, 231) == [3, 10, 80, 87, 157, 164]
    with pytest.raises(ValueError, match="cannot be repeated"):
        core.repeated_positions([3], 77, 100)
