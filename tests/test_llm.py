import numpy as np
import pytest
import torch

from timecma.llm import build_tiny_llm, encode_last_token, load_llm
from timecma.core.tokens import PromptTooLongError, check_lengths, encode_prompts


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


def test_last_position_only_equals_the_plain_forward(tiny_llm_dir):
    """The last-block shortcut (what is exported and precomputed) is the same function as the
    unmodified Hugging Face forward, on a ragged right-padded batch with a 1-token prompt."""
    from timecma.llm import LastTokenEncoder
    from timecma.core.tokens import pad_right

    llm = load_llm(tiny_llm_dir)
    assert llm.encoder.last_position_only
    plain = LastTokenEncoder(llm.encoder.model, last_position_only=False)
    rng = np.random.default_rng(0)
    ids = [rng.integers(1, 500, size=n) for n in (40, 1, 57, 3, 57)]
    a, m = (torch.from_numpy(t) for t in pad_right(ids, llm.info.pad_id))
    with torch.inference_mode():
        fast, ref = llm.encoder(a, m).numpy(), plain(a, m).numpy()
    np.testing.assert_allclose(fast, ref, atol=1e-5, rtol=0)
    assert np.abs(ref).max() > 0.1  # not a trivially small output
    # the shortcut does not register (or export) the weights twice
    assert len(llm.encoder.state_dict()) == len(llm.encoder.model.state_dict())


def test_plan_llm_batches_is_optimal_and_complete():
    """Against brute force over every contiguous split of the length-sorted prompts."""
    import itertools

    from timecma.core.tokens import plan_llm_batches

    rng = np.random.default_rng(3)
    for _ in range(60):
        n, max_batch, cost = int(rng.integers(1, 8)), int(rng.integers(1, 5)), int(rng.integers(0, 40))
        lengths = rng.integers(1, 120, size=n).tolist()
        plan = plan_llm_batches(lengths, max_batch, cost)
        assert sorted(i for g in plan for i in g) == list(range(n)) and all(len(g) <= max_batch for g in plan)
        got = sum(len(g) * max(lengths[i] for i in g) + cost for g in plan)
        s = sorted(lengths)
        best = min(
            sum((b - a) * s[b - 1] + cost for a, b in zip((0,) + cuts, cuts + (n,)))
            for k in range(n) for cuts in itertools.combinations(range(1, n), k)
            if all(b - a <= max_batch for a, b in zip((0,) + cuts, cuts + (n,)))
        )
        assert got == best
    # one long outlier gets its own call instead of padding six prompts to its length
    plan = plan_llm_batches([226, 227, 322, 226, 228, 226, 228], 64)
    assert [sorted(g.tolist()) for g in plan] == [[0, 1, 3, 4, 5, 6], [2]]


def test_plan_llm_batches_keeps_the_token_budget():
    from timecma.core.tokens import plan_llm_batches

    rng = np.random.default_rng(3)
    lengths = rng.integers(20, 400, 200).tolist() + [900]
    plan = plan_llm_batches(lengths, 64, max_tokens=1000)
    assert sorted(int(i) for g in plan for i in g) == list(range(len(lengths)))  # every prompt once
    for g in plan:
        assert len(g) * max(lengths[i] for i in g) <= 1000 or len(g) == 1
    assert any(len(g) > 1 for g in plan)
