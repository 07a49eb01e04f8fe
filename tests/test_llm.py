import numpy as np
import pytest
import torch

from timecma.llm import build_tiny_llm, encode_last_token, load_llm
from timecma.tokens import PromptTooLongError, check_lengths, encode_prompts


def test_from_pretrained_dir_roundtrip(tiny_llm_dir):
    llm = load_llm(tiny_llm_dir)
    again = load_llm(tiny_llm_dir)
    assert llm.info.weights_digest == again.info.weights_digest
    assert llm.info.namespace == again.info.namespace
    assert llm.info.d_llm == 32 and llm.info.max_positions == 1024


def test_batched_equals_one_at_a_time(tiny_llm_dir):
    llm = load_llm(tiny_llm_dir)
    prompts = [
        "From 01/07/2016 00:00 to 01/07/2016 03:00, the values were 5, 5, 7, 7 every hour. The total trend value was 2.000000",
        "short",
        "From 01/07/2016 00:00 to 04/07/2016 23:00, the values were " + ", ".join(str(i % 13) for i in range(96))
        + " every hour. The total trend value was -3.818000",
    ]
    ids = encode_prompts(llm.backend, prompts)
    assert len({len(i) for i in ids}) == 3  # really different lengths
    batched = encode_last_token(llm, ids)
    single = np.concatenate([encode_last_token(llm, [i]) for i in ids])
    np.testing.assert_allclose(batched, single, atol=1e-5, rtol=0)
    # the gathered vector is the hidden state of the last real token
    with torch.no_grad():
        full = llm.encoder.model(input_ids=torch.from_numpy(ids[1])[None]).last_hidden_state[0, -1].numpy()
    np.testing.assert_allclose(batched[1], full, atol=1e-5)


def test_prompt_longer_than_positions_is_an_error(tmp_path):
    llm = load_llm(build_tiny_llm(tmp_path / "short", n_positions=16))
    ids = encode_prompts(llm.backend, ["a b c", "From 01/07/2016 00:00 to 04/07/2016 23:00, the values were 1, 2, 3, 4, 5"])
    with pytest.raises(PromptTooLongError, match=r"window 7, variable 'OT' has \d+ tokens .* at most 16"):
        check_lengths(ids, llm.info.max_positions, lambda i: "window 7, variable 'OT'")
