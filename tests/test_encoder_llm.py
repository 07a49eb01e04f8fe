"""Encoder LLMs (BERT family) load through the project's loader as they did before `--llm-layers`: without
it, nothing about the model's layers is required."""

import numpy as np
import pytest

from timecma.core.errors import InputError


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> str:
    """A random-weight BertModel (2 layers x 32) and a WordPiece fast tokenizer trained on prompt-like text,
    both saved with save_pretrained, as a user's local BERT-family directory would be."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    from timecma.llm import _tiny_corpus

    out = str(tmp_path_factory.mktemp("tiny_bert"))
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    tok.train_from_iterator(_tiny_corpus(0)[:50], trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials,
                                                                            show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]")
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, max_position_embeddings=512))
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


def test_a_bert_model_loads_without_llm_layers_as_before(tiny_bert_dir):
    """`keep_first_layers` ran for every model and raised for one whose layers are not at `h` or `layers`
    (BertModel keeps them at `encoder.layer`): `timecma-export --llm <a BERT directory>` failed."""
    from timecma.llm import WRAPPER_VERSION, encode_last_token, load_llm

    llm = load_llm(tiny_bert_dir)
    assert llm.info.d_llm == 32 and llm.info.max_positions == 512
    assert llm.info.wrapper_version == WRAPPER_VERSION  # the store namespace it always had
    assert llm.info.extra["model_type"] == "bert" and llm.info.extra["layers"] == 2
    ids = [np.asarray(llm.tokenizer(t)["input_ids"]) for t in ("From 01/01/2020 the values were 1, 2", "every hour")]
    emb = encode_last_token(llm, ids)
    assert emb.shape == (2, 32) and np.isfinite(emb).all()


def test_llm_layers_on_a_bert_model_is_refused_by_name(tiny_bert_dir):
    from timecma.llm import load_llm

    with pytest.raises(InputError, match="cannot find the decoder layers of a BertModel"):
        load_llm(tiny_bert_dir, layers=1)
