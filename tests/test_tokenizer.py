from dmm.zoo.build import vocabulary
from dmm.zoo.tokenizer import BOS, EOS, build_tokenizer


def test_known_words_are_single_tokens_and_anything_else_still_tokenizes(tmp_path):
    tok = build_tokenizer(vocabulary(), tmp_path, max_length=16)
    ids = tok("a large red triangle at the top left").input_ids
    toks = tok.convert_ids_to_tokens(ids)
    assert toks[0] == BOS and toks[-1] == EOS
    assert toks[1:-1] == [w + "</w>" for w in "a large red triangle at the top left".split()]
    odd = tok("Zebra-ünïcode!").input_ids
    assert len(odd) > 3 and tok.unk_token_id not in odd[1:-1]
    padded = tok(["x"], padding="max_length", max_length=16).input_ids[0]
    assert len(padded) == 16


def test_tokenizer_files_reload(tmp_path):
    from transformers import CLIPTokenizer

    build_tokenizer(vocabulary(), tmp_path, max_length=16)
    tok = CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert tok.model_max_length == 16
